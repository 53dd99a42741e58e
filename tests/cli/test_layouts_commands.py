"""inspect, evaluate and relabel on a tiny-model run written as WebDataset tars
(``generate --format webdataset``), and on its exports to VOC and Parquet."""
import os

import pytest

from pccfast.cli.evaluate import main as evaluate
from pccfast.cli.export import main as export
from pccfast.cli.generate import main as generate
from pccfast.cli.inspect import main as inspect
from pccfast.cli.relabel import main as relabel

TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--no-progress", "--batch", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-layouts")
    wds = str(root / "wds")
    assert generate(TINY + ["--limit", "3", "--format", "webdataset", "--shard-size", "2", "--save-blocky",
                            "--save-captures", "--out", wds]) == 0
    out = {"webdataset": wds, "voc": str(root / "voc"), "parquet": str(root / "pq"), "root": root}
    for to in ("voc", "parquet"):
        if to == "parquet":
            pytest.importorskip("pyarrow")
        assert export([wds, "--to", to, out[to], "--no-progress"]) == 0
    return out


def test_inspect_a_generated_tar_dataset_as_its_exports(run, capsys):
    texts = {}
    for lay in ("webdataset", "voc", "parquet"):
        assert inspect([run[lay], "--out", str(run["root"] / f"{lay}.png")]) == 0
        texts[lay] = capsys.readouterr().out.splitlines()
        assert "3 ids, 3 masks" in texts[lay][0] and not any("no mask file" in t for t in texts[lay])
    assert texts["webdataset"][1:] == texts["voc"][1:] == texts["parquet"][1:]


def test_evaluate_between_the_layouts(run, capsys):
    for pred, gt in (("webdataset", "voc"), ("parquet", "webdataset"), ("voc", "parquet")):
        assert evaluate([run[pred], run[gt]]) == 0
        assert "mIoU 100.00  mean acc 100.00  pixel acc 100.00  (3 images)" in capsys.readouterr().out


def test_relabel_refuses_tars_in_one_line_and_its_advice_works(run, capsys):
    wds = run["webdataset"]
    for captures in (wds, os.path.join(wds, "shards")):
        with pytest.raises(SystemExit) as info:
            relabel(["--captures", captures, "--out", str(run["root"] / "never")])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: `--captures` {captures!r} ")
        assert "webdataset dataset, whose captures are inside its tars" in err
        assert f"`python -m pccfast.export {wds} --to voc OUT` first" in err
    assert not os.path.exists(run["root"] / "never")
    if os.path.isdir(run["parquet"]):
        with pytest.raises(SystemExit):
            relabel(["--captures", os.path.join(run["parquet"], "data"), "--out", str(run["root"] / "never")])
        assert "is in a parquet dataset, whose captures are inside its parquet files" in capsys.readouterr().err
    # what the line says: the VOC export's captures relabel to generate's masks
    out = str(run["root"] / "relabelled")
    assert relabel(["--captures", os.path.join(run["voc"], "captures"), "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    assert evaluate([out, wds]) == 0
    assert "mIoU 100.00  mean acc 100.00  pixel acc 100.00  (3 images)" in capsys.readouterr().out
