"""Resume is safe: run.json and the manifest records say what defines the samples; a run that
would make other samples into a dataset is refused before anything is written, and
``--overwrite`` redoes exactly the samples whose records differ."""
import json
import os

import pytest

from pccfast.cli.generate import main
from pccfast.data.fileio import read_jsonl

TINY = ["--model", "tiny", "--steps", "1", "--height", "64", "--width", "64", "--batch", "3", "--no-progress"]


def _prompts(path, texts):
    path.write_text("".join(f"{i} | {t} | {c}\n" for i, (t, c) in enumerate(texts)))
    return str(path)


def _snapshot(out):
    return {os.path.relpath(os.path.join(d, f), out): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(out) for f in fs}


def _refused(argv, capsys, *needles):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_run_json_and_records_say_what_defines_the_samples(tmp_path):
    p = _prompts(tmp_path / "p.txt", [("a cat", "cat"), ("a dog", "dog")])
    out = tmp_path / "o"
    assert main(["--prompts", p, "--out", str(out), *TINY]) == 0
    run = json.loads((out / "run.json").read_text())
    d = run["defining"]
    assert (d["model"], d["height"], d["width"], d["steps"], d["guidance"], d["dtype"]) == ("tiny", 64, 64, 1, 7.5,
                                                                                          "float32")
    assert d["seed"] == "2024 + prompt index" and d["label_set"]["name"] == "voc" and d["jpeg_quality"] == 95
    assert "sha256:" in d["prompts"] and d["labeller"]["cluster_ks"] == [4, 7, 10]
    assert not any(k.endswith("_backend") or k == "kmeans_check_every" for k in d["labeller"])  # how, not what
    assert set(run["versions"]) == {"pccfast", "diffusers", "transformers", "torch"}
    rec = read_jsonl(str(out / "manifest.jsonl"))[0]
    assert {k: rec[k] for k in ("prompt", "classes", "seed", "height", "width", "steps", "model")} == dict(
        prompt="a cat", classes=["cat"], seed=2024, height=64, width=64, steps=1, model="tiny")


def test_resume_refuse_and_overwrite(tmp_path, capsys):
    p = _prompts(tmp_path / "p.txt", [("a cat", "cat"), ("a dog", "dog"), ("a bird", "bird")])
    out = tmp_path / "o"
    base = ["--prompts", p, "--out", str(out)]
    assert main(base + TINY) == 0
    capsys.readouterr()
    # the same command resumes (another batch size is not a defining setting)
    assert main(base + TINY + ["--batch", "1"]) == 0
    assert "0 images written, 3 already done" in capsys.readouterr().err
    before = _snapshot(out)
    # a changed setting is refused with its name and both values, nothing written
    _refused(base + [*TINY, "--steps", "2"], capsys, "run.json", "steps 1", "this run has 2", "--overwrite")
    _refused(base + [*TINY, "--guidance", "5"], capsys, "guidance 7.5", "--overwrite")
    _refused(base + [*TINY, "--thresholds", "0.4,0.6"], capsys, "labeller")
    assert _snapshot(out) == before
    # a changed prompt file is refused
    p2 = _prompts(tmp_path / "p.txt", [("a cat", "cat"), ("a black dog", "dog"), ("a bird", "bird")])
    _refused(["--prompts", p2, "--out", str(out), *TINY], capsys, "prompts", "--overwrite")
    assert _snapshot(out) == before
    # --overwrite redoes exactly the sample whose record differs
    assert main(["--prompts", p2, "--out", str(out), *TINY, "--overwrite"]) == 0
    assert "1 images written, 2 already done" in capsys.readouterr().err
    after = _snapshot(out)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert changed == ["ImageSets/Segmentation/train.txt", "JPEGImages/1.jpg", "SegmentationClass/1.png",
                       "manifest.jsonl", "run.json"], changed
    recs = {r["id"]: r for r in read_jsonl(str(out / "manifest.jsonl"))}
    assert recs["1"]["prompt"] == "a black dog"
    # and the dataset now records the new prompt file: the same command resumes
    assert main(["--prompts", p2, "--out", str(out), *TINY]) == 0
    assert "0 images written, 3 already done" in capsys.readouterr().err


def test_dataset_without_run_json_is_checked_record_by_record(tmp_path, capsys):
    """A dataset made before run.json existed: the manifest records still refuse other samples."""
    p = _prompts(tmp_path / "p.txt", [("a cat", "cat"), ("a dog", "dog")])
    out = tmp_path / "o"
    assert main(["--prompts", p, "--out", str(out), *TINY]) == 0
    os.remove(out / "run.json")
    _refused(["--prompts", p, "--out", str(out), *TINY, "--steps", "2"], capsys, "manifest.jsonl", "sample 0",
             "steps 1", "this run has 2")
    assert not (out / "run.json").exists()


def test_another_prompt_file_into_a_dataset_is_refused(tmp_path, capsys):
    """Regression: another prompt file into the same --out printed '0 images written, 3 already
    done' and kept the old prompts."""
    out = tmp_path / "o"
    assert main(["--prompts", _prompts(tmp_path / "a.txt", [("a cat", "cat")] * 3), "--out", str(out), *TINY]) == 0
    _refused(["--prompts", _prompts(tmp_path / "b.txt", [("a bus", "bus")] * 3), "--out", str(out), *TINY], capsys,
             "prompts")


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _refused(["--limit", "1", "--out", str(f), *TINY], capsys, str(f), "not a dataset folder")
    assert f.read_text() == "x"
