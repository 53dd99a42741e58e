"""``python -m pccfast.export``: the summary, resume, and one-line errors."""
import importlib.util
import json
import subprocess
import sys

import pytest

from pccfast.cli.export import main
from pccfast.testing.planted_datasets import write_planted_voc


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "voc"
    write_planted_voc(str(path), 5, size=32)
    return path


def test_export_then_resume(src, tmp_path, capsys):
    out = tmp_path / "wds"
    assert main([str(src), "--to", "webdataset", str(out), "--shard-size", "2", "--no-progress"]) == 0
    assert "5 samples written, 0 already done, 0 failed" in capsys.readouterr().err
    assert json.loads((out / "shards.json").read_text())["samples"] == 5
    assert main([str(src), "--to", "webdataset", str(out), "--no-progress"]) == 0
    assert "0 samples written, 5 already done" in capsys.readouterr().err


def test_errors_are_one_line(src, tmp_path, capsys, monkeypatch):
    for argv, message in (
        ([str(tmp_path / "none"), "--to", "voc", str(tmp_path / "o")], "not a dataset folder (no such folder)"),
        ([str(src), "--to", "voc", str(src)], "is the source dataset; export into another folder"),
    ):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--no-progress"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main([str(src), "--to", "parquet", str(tmp_path / "p"), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.strip() == 'error: the parquet layout needs pyarrow: pip install "pccfast[parquet]" (or pip install pyarrow)'


def test_bad_option_values_are_refused_by_the_parser(src, tmp_path, capsys):
    for argv in (["--to", "tar"], ["--to", "voc", "--shard-size", "0"]):
        with pytest.raises(SystemExit) as info:
            main([str(src), *argv, str(tmp_path / "o")])
        assert info.value.code == 2
    assert "invalid choice: 'tar'" in capsys.readouterr().err


def test_runs_as_a_module(src, tmp_path):
    res = subprocess.run([sys.executable, "-m", "pccfast.export", str(src), "--to", "voc", str(tmp_path / "v"),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "v" / "SegmentationClass" / "000004.png").read_bytes() == \
        (src / "SegmentationClass" / "000004.png").read_bytes()
