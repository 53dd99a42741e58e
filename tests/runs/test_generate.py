"""End to end: ``python -m pccfast.generate`` on the tiny model (noise images, real machinery)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pccfast.cli.generate import main

TINY = ["--model", "tiny", "--steps", "2", "--height", "128", "--width", "128", "--no-progress"]


def _ids(out):
    return (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def _masks(out, ids):
    return {i: np.asarray(Image.open(out / "SegmentationClass" / f"{i}.png")) for i in ids}


def _agreement(a, b):
    assert a.keys() == b.keys()
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    total = sum(a[k].size for k in a)
    return same / total


def _check_valid(out, ids):
    for i in ids:
        with Image.open(out / "JPEGImages" / f"{i}.jpg") as im:
            im.verify()
        with Image.open(out / "SegmentationClass" / f"{i}.png") as m:
            assert m.mode == "P" and m.size == (128, 128)
            vals = set(np.unique(np.asarray(m)).tolist())
            assert vals <= set(range(21)) | {255}
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]
    assert leftovers == []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shared_prompts):
    """The uninterrupted run: 16 shared prompts, batch 8."""
    out = tmp_path_factory.mktemp("ref")
    code = main(["--prompts", shared_prompts, "--limit", "16", "--batch", "8", "--out", str(out), "--save-blocky",
                 "--save-captures", *TINY])
    assert code == 0
    return out


def test_end_to_end_shared_prompts(reference_run, shared_prompts):
    out = reference_run
    ids = _ids(out)
    assert len(ids) == 16
    _check_valid(out, ids)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in manifest] == ids
    entries = json.load(open(shared_prompts))[:16]
    for r, e in zip(manifest, entries):
        assert r["prompt"] == e["prompt_sd"] and r["classes"] == e["classes"]
        assert r["seed"] == 2024 + r["index"]
        assert r["model"] == "tiny" and r["steps"] == 2 and r["seconds"] > 0
    assert (out / "SegmentationClassBlocky" / f"{ids[0]}.png").exists()
    assert (out / "captures" / f"{ids[0]}.safetensors").exists()
    # re-running the same command does nothing more (resume)
    code = main(["--prompts", shared_prompts, "--limit", "16", "--batch", "8", "--out", str(out), *TINY])
    assert code == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 16


def test_kill_and_resume(reference_run, shared_prompts, tmp_path):
    """kill -9 mid-run, then the same command again: same files, all valid, masks agree."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pccfast.generate", "--prompts", shared_prompts, "--limit", "16", "--batch", "8",
           "--out", str(out), *TINY]
    # the same thread count as this process (conftest): float results depend on it, and the
    # masks are compared with the in-process reference run
    threads = str(torch.get_num_threads())
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        n = len(manifest.read_text().splitlines()) if manifest.exists() else 0
        if n >= 8:  # the first batch is committed; kill during the second
            proc.send_signal(signal.SIGKILL)
            killed_at = n
            break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None and killed_at < 16, "the run ended before it could be killed"
    code = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr[-2000:]
    ids = _ids(out)
    assert sorted(ids) == sorted(_ids(reference_run))
    _check_valid(out, ids)
    assert _agreement(_masks(out, ids), _masks(reference_run, ids)) >= 0.999


def test_batch_invariance(reference_run, shared_prompts, tmp_path):
    """Prompt i at --batch 1 and at --batch 8: the same image up to float noise, the same masks.

    The UNet's float results depend slightly on the batch size (about 1e-5), which flips a few
    uint8 pixel values by 1. The attention (blocky) masks must not move. The refined masks
    re-cluster the pixel colours (k-means, k=20); on the tiny model's noise images that is
    ill-conditioned, and the few flipped pixels move 0-2% of a mask (measured: 99.5% over 16
    prompts; scikit-learn's k-means moves as much under the same perturbation). The 99.9%
    refined-mask requirement is checked on structured scenes in tests/core/test_batch_invariance.py.
    """
    out = tmp_path / "b1"
    assert main(["--prompts", shared_prompts, "--limit", "4", "--batch", "1", "--out", str(out), "--save-blocky",
                 *TINY]) == 0
    ids = _ids(out)
    assert len(ids) == 4
    blocky = {i: np.asarray(Image.open(out / "SegmentationClassBlocky" / f"{i}.png")) for i in ids}
    blocky_ref = {i: np.asarray(Image.open(reference_run / "SegmentationClassBlocky" / f"{i}.png")) for i in ids}
    assert _agreement(blocky, blocky_ref) >= 0.999
    assert _agreement(_masks(out, ids), _masks(reference_run, ids)) >= 0.97
    for i in ids:
        a = np.asarray(Image.open(out / "JPEGImages" / f"{i}.jpg"), dtype=np.int16)
        b = np.asarray(Image.open(reference_run / "JPEGImages" / f"{i}.jpg"), dtype=np.int16)
        assert np.abs(a - b).mean() < 0.5


def test_builtin_prompts_and_text_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat on a sofa | cat, sofa\n# comment\na dog | dog\n")
    out = tmp_path / "o"
    assert main(["--prompts", str(p), "--batch", "2", "--out", str(out), *TINY]) == 0
    assert len(_ids(out)) == 2
    out2 = tmp_path / "o2"
    assert main(["--limit", "2", "--batch", "2", "--out", str(out2), *TINY]) == 0
    assert len(_ids(out2)) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompts", "/nonexistent/p.json"], "/nonexistent/p.json"),
        (["--shard", "3/2"], "--shard"),
        (["--height", "100"], "multiples of 8"),
        (["--height", "64", "--width", "100"], "`height` and `width` have to be positive multiples of 8"),
        (["--guidance", "-1"], "`guidance` has to be at least 0"),
        (["--workers", "2"], "`--workers` 2 needs --ray"),
        (["--batch", "0"], "`--batch` has to be at least 1 but is 0"),
        (["--device", "foo"], "`--device` has to be a torch device such as cpu, cuda or cuda:1 but is 'foo'"),
        (["--compile", "foo"], "`--compile` has to be a torch.compile backend ("),
        (["--dtype", "float16", "--device", "cpu"], "float16 needs a CUDA device"),
        (["--model", "/nonexistent/model"], "--model tiny"),
    ],
)
def test_bad_input_one_line_error(argv, message, tmp_path, capsys):
    base = ["--model", "tiny", "--steps", "1", "--height", "64", "--width", "64", "--limit", "1", "--no-progress",
            "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(base + argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err
    assert err[-1].startswith("error: ")
    if message != "--model tiny":  # settings are checked before anything is written
        assert not (tmp_path / "o").exists()
