"""generate and relabel with --labeler dd|fused and --save-all-labelers on the tiny model, end to end:
the three mask folders, the fused rule on the files, captures with Dataset Diffusion's tensors
relabelling to the same masks, --append-classes, run.json, and the one-line errors."""
import json
import os

import numpy as np
import pytest
import torch

from pccfast.cli.generate import main as generate_main
from pccfast.cli.relabel import main as relabel_main
from pccfast.core.dd import fuse_masks
from pccfast.data.captures import read_capture
from pccfast.data.fileio import load_mask
from pccfast.data.layout import MANIFEST, MASKS, MASKS_DD, MASKS_PCC, RUN_FILE

TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--no-progress", "--device", "cpu"]


def _masks(folder: str, sub: str) -> dict:
    d = os.path.join(folder, sub)
    return {n: load_mask(os.path.join(d, n)) for n in sorted(os.listdir(d)) if n.endswith(".png")}


def _same(a: str, b: str, sub: str, sub_b: str | None = None) -> None:
    ma, mb = _masks(a, sub), _masks(b, sub_b or sub)
    assert sorted(ma) == sorted(mb) and ma
    for name in ma:
        np.testing.assert_array_equal(ma[name], mb[name], err_msg=f"{sub}/{name}")


def _defining(out: str) -> dict:
    with open(os.path.join(out, RUN_FILE)) as f:
        return json.load(f)["defining"]


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "fused")
    assert generate_main(["--out", out, "--limit", "4", "--batch", "2", "--labeler", "fused", "--save-all-labelers",
                          "--save-captures", "--append-classes", *TINY]) == 0
    return out


def test_generate_fused_writes_all_three_and_fuses(fused_run):
    fused, pcc, dd = (_masks(fused_run, s) for s in (MASKS, MASKS_PCC, MASKS_DD))
    assert sorted(fused) == sorted(pcc) == sorted(dd) == [f"{i}.png" for i in range(4)]
    for name in fused:
        want = fuse_masks(torch.tensor(pcc[name]), torch.tensor(dd[name])).numpy()
        np.testing.assert_array_equal(fused[name], want)
    assert any(len(set(np.unique(m)) - {0, 255}) for m in dd.values())  # DD labels prompt classes
    lab = _defining(fused_run)["labeller"]
    assert lab["labeler"] == "fused" and lab["dd"]["power"] == 4 and lab["append_classes"] is True
    with open(os.path.join(fused_run, MANIFEST)) as f:
        records = [json.loads(line) for line in f]
    for r in records:  # Dataset Diffusion's prompt convention, recorded as used
        assert r["prompt"].endswith("; " + " ".join(dict.fromkeys(c.replace("pottedplant", "potted plant")
                                                                   for c in r["classes"])))
    cap = read_capture(os.path.join(fused_run, "captures", "0.safetensors"))
    assert cap.dd_affinity.shape == (16, 16) and cap.dd_class_attention.shape == (21, 2, 2)  # 64 px: grid 8, 4, 2


def test_captures_relabel_to_the_same_masks(fused_run, tmp_path):
    """From the captures alone (image and DD tensors inside), relabel gives generate's masks of
    all three labellers bit for bit; --labeler dd gives the DD folder's masks."""
    caps = os.path.join(fused_run, "captures")
    rel = str(tmp_path / "R")
    assert relabel_main(["--captures", caps, "--out", rel, "--labeler", "fused", "--save-all-labelers",
                         "--no-progress", "--device", "cpu"]) == 0
    for sub in (MASKS, MASKS_PCC, MASKS_DD):
        _same(fused_run, rel, sub)
    only_dd = str(tmp_path / "D")
    assert relabel_main(["--captures", caps, "--out", only_dd, "--labeler", "dd", "--no-progress",
                         "--device", "cpu"]) == 0
    _same(fused_run, only_dd, MASKS_DD, MASKS)
    assert not os.path.exists(os.path.join(only_dd, MASKS_DD))
    other = str(tmp_path / "T")  # another DD constant changes the DD masks, read from the same captures
    assert relabel_main(["--captures", caps, "--out", other, "--labeler", "dd", "--dd-power", "1",
                         "--dd-threshold", "0.9", "--no-progress", "--device", "cpu"]) == 0
    assert any((a != b).any() for a, b in zip(_masks(only_dd, MASKS).values(), _masks(other, MASKS).values()))


def test_generate_dd_alone(tmp_path):
    out = str(tmp_path / "dd")
    assert generate_main(["--out", out, "--limit", "2", "--labeler", "dd", "--save-captures", *TINY]) == 0
    masks = _masks(out, MASKS)
    assert len(masks) == 2 and not os.path.exists(os.path.join(out, MASKS_DD))
    assert _defining(out)["labeller"]["labeler"] == "dd"
    assert read_capture(os.path.join(out, "captures", "0.safetensors")).dd_affinity is not None


def test_pcc_default_run_unchanged(tmp_path, capsys):
    """A default run records no labeller choice in run.json (datasets made before resume as
    before), and its captures hold no DD tensors, which relabel --labeler dd then names."""
    out = str(tmp_path / "p")
    assert generate_main(["--out", out, "--limit", "1", "--save-captures", *TINY]) == 0
    lab = _defining(out)["labeller"]
    assert "labeler" not in lab and "dd" not in lab and "append_classes" not in lab
    assert read_capture(os.path.join(out, "captures", "0.safetensors")).dd_affinity is None
    capsys.readouterr()
    code = relabel_main(["--captures", os.path.join(out, "captures"), "--out", str(tmp_path / "r"), "--labeler", "dd",
                         "--no-progress", "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "0.safetensors: holds no Dataset Diffusion tensors (dd_affinity, dd_class_attention)" in err
    # the same dataset with another labeller is refused (run.json), with one line
    with pytest.raises(SystemExit) as e:
        generate_main(["--out", out, "--limit", "1", "--labeler", "dd", *TINY])
    assert e.value.code == 2
    assert "run.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--dd-threshold", "0.4"], "error: `--dd-uncertain-threshold` and `--dd-threshold` have to satisfy"),
    (["--dd-power", "0"], "error: `--dd-power` has to be a positive int but is 0"),
    (["--labeler", "dd", "--save-blocky"], "error: `--save-blocky` writes PCC's blocky mask"),
    (["--save-all-labelers", "--format", "webdataset"], "error: `--save-all-labelers` writes SegmentationClassPCC/"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        generate_main(["--out", str(tmp_path / "x"), "--limit", "1", *argv, *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")
