"""``python -m pccfast.train``: it learns, resumes bit for bit, reads VOC and pccfast folders, fails in one line.

The learning tests train the small model (deeplabv3_mobilenet_v3_large, from scratch) on planted
coloured shapes and score it on a held-apart planted split laid out as a VOC2012 folder. The
default suite runs a short schedule that still has to learn (far above the all-background
mIoU of about 0.2); ``PCCFAST_LONG_TRAINING=1`` runs the full one, which has to reach 0.8
mIoU, with and without ``--ema-decay`` (a few minutes each on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from pccfast.cli.train import main
from pccfast.tools.evaluate import evaluate_dirs

from conftest import write_planted

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = os.environ.get("PCCFAST_LONG_TRAINING") == "1"
SMALL = ["--arch", "deeplabv3_mobilenet_v3_large", "--backbone-weights", "none", "--bn-momentum", "0.1",
         "--no-progress"]


def _log(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def _learn(planted, out, iters, lr, *extra, eval_every=None):
    train, voc = planted
    code = main([train, "--val", voc, "--out", out, *SMALL, "--iters", str(iters), "--batch", "8", "--crop", "64",
                 "--scale-range", "1.5,2.5", "--lr", str(lr), "--eval-every", str(eval_every or iters), "--log-every", "10", "--workers", "0", *extra])
    assert code == 0
    log = _log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    mious = [r["val_miou"] for r in log if "val_miou" in r]
    return losses, mious


@pytest.mark.skipif(LONG, reason="the long version runs instead")
def test_short_run_learns(planted, tmp_path):
    """60 steps: the loss falls to under half and val mIoU is well above predicting background everywhere
    (about 0.19 here; this run measured 0.64)."""
    losses, mious = _learn(planted, str(tmp_path / "run"), 60, 0.02)
    assert losses[-1] < 0.5 * losses[0], losses
    assert mious[-1] >= 0.45, mious


@pytest.mark.skipif(not LONG, reason="set PCCFAST_LONG_TRAINING=1 (a few minutes on 2 CPU cores)")
@pytest.mark.parametrize("ema", [False, True])
def test_full_run_reaches_0_8_miou(planted, tmp_path, ema):
    """400 steps, evaluated every 100: the best evaluation (what best.pt keeps) reaches 0.8 mIoU. Measured
    here: without EMA 0.71, 0.82, 0.54, 0.80 (the live weights' scores swing while the learning rate is
    high); with --ema-decay 0.98 0.19, 0.21, 0.78, 0.81 (the average lags, then is steadier)."""
    extra = ["--ema-decay", "0.98"] if ema else []
    losses, mious = _learn(planted, str(tmp_path / "run"), 400, 0.05, *extra, eval_every=100)
    assert len(mious) == 4 and max(mious) >= 0.8, mious
    assert losses[-1] < 0.15 * losses[0], losses


def test_predict_writes_masks_that_evaluate_scores_as_the_run_did(planted, tmp_path):
    """--predict best.pt on the val images, scored by pccfast.evaluate, gives the run's own val mIoU; the
    run folder holds the log (loss and val records) and the PNG plot; --ema-decay runs."""
    train, voc = planted
    run = str(tmp_path / "run")
    _learn(planted, run, 20, 0.02, "--ema-decay", "0.9")
    log = _log(run)
    best = max(r["val_miou"] for r in log if "val_miou" in r)
    with Image.open(os.path.join(run, "curves.png")) as im:
        assert im.format == "PNG" and im.size[0] > 200
    masks = str(tmp_path / "masks")
    val_root = os.path.join(voc, "VOCdevkit", "VOC2012")
    assert main(["--predict", os.path.join(run, "best.pt"), val_root, "--out", masks, "--no-progress"]) == 0
    with Image.open(os.path.join(masks, "SegmentationClass", "p10000.png")) as im:
        assert im.mode == "P" and im.size == (128, 128)
    report = evaluate_dirs(masks, val_root, "voc")
    assert report.n_images == 40
    assert report.miou == pytest.approx(best, abs=1e-12)


def _cmd(out, *extra):
    return [sys.executable, "-m", "pccfast.train", out + "-data", "--out", out, *SMALL, "--iters", "12", "--batch",
            "2", "--crop", "32", "--lr", "0.01", "--ema-decay", "0.9", "--checkpoint-every", "4", "--log-every", "1",
            "--seed", "3", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _stop_after_checkpoint(cmd, sig, extra_wait: float = 0.0):
    """Start ``cmd``, send ``sig`` once its first periodic checkpoint exists; returns (process, stderr)."""
    out = cmd[cmd.index("--out") + 1]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.path.exists(os.path.join(out, "last.pt")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 300, "no checkpoint after 300 s"
        time.sleep(0.02)
    time.sleep(extra_wait)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc, err


def _state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"model.{k}": v for k, v in ckpt["model"].items()}
    flat.update({f"ema.{k}": v for k, v in (ckpt["ema"] or {}).items()})
    for i, s in ckpt["optimizer"]["state"].items():
        flat.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return ckpt["iteration"], flat


def test_sigkill_and_ctrl_c_resume_bit_identical(tmp_path):
    """A run killed with SIGKILL after a checkpoint, and one stopped with Ctrl-C, both resumed by the same
    command, end with the uninterrupted run's weights, EMA and optimiser state, bit for bit (CPU); the resumed
    runs read with a data-loading worker, the reference in-process, so the samples do not depend on it."""
    data = write_planted(str(tmp_path / "run-data"), range(8), size=40)
    for name in ("killed", "stopped"):
        os.symlink(data, str(tmp_path / f"{name}-data"))
    ref = str(tmp_path / "run")
    res = subprocess.run(_cmd(ref, "--workers", "0"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    it, want = _state(os.path.join(ref, "last.pt"))
    assert it == 12

    killed = str(tmp_path / "killed")
    proc, _ = _stop_after_checkpoint(_cmd(killed, "--workers", "1"), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert _state(os.path.join(killed, "last.pt"))[0] < 12

    stopped = str(tmp_path / "stopped")
    proc, err = _stop_after_checkpoint(_cmd(stopped, "--workers", "1"), signal.SIGINT, extra_wait=0.3)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"interrupted; finished work is kept in {stopped}: run the same command "
                                            "again to resume")
    assert "Traceback" not in err

    for run in (killed, stopped):
        res = subprocess.run(_cmd(run, "--workers", "1"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "resuming" in res.stderr
        it, got = _state(os.path.join(run, "last.pt"))
        assert it == 12 and got.keys() == want.keys()
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert different == [], different[:5]
        iters = [r["iter"] for r in _log(run) if "loss" in r]
        assert iters == list(range(1, 13)), iters  # records past the checkpoint were dropped, then redone

    # the same run folder with another recipe is refused in one line, before anything loads
    res = subprocess.run(_cmd(ref, "--workers", "0") + ["--lr", "0.02"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {os.path.join(ref, 'last.pt')}: the run was made with lr 0.01 "
                                               "but this one has 0.02: use another --out to start a new run"]


def test_val_reads_a_pccfast_dataset(planted, tmp_path):
    """--val takes a pccfast dataset folder (no val.txt: all its masks) as well as a VOC folder."""
    train, _ = planted
    val = write_planted(str(tmp_path / "gen"), range(20_000, 20_006), split="train", ext=".png")
    out = str(tmp_path / "run")
    assert main([train, "--val", val, "--out", out, *SMALL, "--iters", "2", "--batch", "2", "--crop", "32",
                 "--eval-every", "2", "--workers", "0"]) == 0
    evals = [r for r in _log(out) if "val_miou" in r]
    assert len(evals) == 1 and evals[0]["iter"] == 2


@pytest.mark.parametrize("argv,line", [
    (["{tmp}/none", "--out", "{tmp}/r"], "error: `DATASET` '{tmp}/none' is not a folder"),
    (["{tmp}", "--out", "{tmp}/r"], "error: `DATASET` '{tmp}' is not a dataset folder: it has no JPEGImages/ and "
     "SegmentationClass/ (expected a pccfast dataset, a VOC2012 folder or a folder holding VOCdevkit/VOC2012)"),
    (["{train}", "--val", "{tmp}", "--out", "{tmp}/r"], "error: `--val` '{tmp}' is not a dataset folder"),
    (["{train}", "--out", "{tmp}/r", "--arch", "deeplabv3_mobilenet_v3_large", "--workers", "0"],
     "error: no backbone weights: torchvision is not importable here"),
    (["{train}", "--out", "{tmp}/r", "--backbone-weights", "{tmp}/w.pth", "--workers", "0"],
     "error: `--backbone-weights` '{tmp}/w.pth': no such file"),
    (["--predict", "{tmp}/x.pt", "{train}", "--out", "{tmp}/m"], "error: `CKPT` '{tmp}/x.pt': no such file"),
    (["{train}", "--predict", "a", "b", "--out", "{tmp}/m"], "error: `--predict` takes no DATASET"),
    (["--out", "{tmp}/r"], "error: DATASET is missing"),
    (["{train}", "--out", "{tmp}/r", "--batch", "1"], "error: `batch` has to be at least 2"),
])
def test_errors_are_one_line(planted, tmp_path, capsys, argv, line):
    from pccfast.training.models import torchvision_model

    if "torchvision" in line and torchvision_model("deeplabv3_mobilenet_v3_large", 21) is not None:
        pytest.skip("torchvision imports here")
    train, _ = planted
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{train}", train)  # noqa: E731
    with pytest.raises(SystemExit) as info:
        main([fill(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(fill(line)), err


def test_webdataset_layout_trains_like_its_voc_folder(planted, tmp_path):
    """DATASET and --val in pccfast's webdataset layout (export --to webdataset) give the run of the VOC folder
    they were exported from, to the bit."""
    from pccfast.cli.export import main as export

    train, voc = planted
    small = str(tmp_path / "voc-small")
    write_planted(small, range(8), size=40)
    wds, wds_val = str(tmp_path / "wds"), str(tmp_path / "wds-val")
    val_root = os.path.join(voc, "VOCdevkit", "VOC2012")
    assert export([small, "--to", "webdataset", wds, "--no-progress"]) == 0
    assert export([val_root, "--to", "webdataset", wds_val, "--no-progress"]) == 0
    runs = []
    for data, val in ((small, voc), (wds, wds_val)):
        out = str(tmp_path / f"run{len(runs)}")
        assert main([data, "--val", val, "--out", out, *SMALL, "--iters", "2", "--batch", "2", "--crop", "32",
                     "--eval-every", "2", "--workers", "0"]) == 0
        runs.append(out)
    a, b = (_state(os.path.join(r, "last.pt"))[1] for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev = [[r["val_miou"] for r in _log(run) if "val_miou" in r] for run in runs]
    assert ev[0] == ev[1] and len(ev[0]) == 1


def test_max_pairs_takes_the_first_ids(tmp_path, capsys):
    """--max-pairs (syntagen: 10,000) trains on the first N pairs by id and says so."""
    data = write_planted(str(tmp_path / "d"), range(6), size=32)
    out = str(tmp_path / "run")
    assert main([data, "--out", out, *SMALL, "--iters", "1", "--batch", "2", "--crop", "32", "--max-pairs", "4",
                 "--workers", "0"]) == 0
    assert "using the first 4 of 6 pairs" in capsys.readouterr().err
    with open(os.path.join(out, "train.json")) as f:
        assert json.load(f)["pairs"] == 4
