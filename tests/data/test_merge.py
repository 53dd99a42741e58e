"""Static sharding (``--shard I/N``) and ``python -m pccfast.merge``.

Most tests drive :class:`DatasetWriter` directly with made-up samples (fast, no model): each
"shard" writes the files and manifest records that a sharded generate run would. The last
test runs the real generate CLI on the tiny model.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from pccfast.data.layout import sample_paths as dataset_paths
from pccfast.data.manifest import Manifest
from pccfast.data.writer import SampleWriter
from pccfast.data.merge import merge_datasets
from pccfast.data.fileio import read_jsonl
from pccfast.runs.plan import batches, select_shard
from pccfast.data.labelsets import get_label_set
from pccfast.cli.merge import main as merge_main
from pccfast.data.prompts import PromptEntry

def _dataset(out, label_set, shard=None, **kw):
    """The two roles of a generated dataset side by side: the driver's manifest and the worker's writer."""
    import types

    m, w = Manifest(out, label_set, shard), SampleWriter(out, label_set, **kw)
    return types.SimpleNamespace(write_files=w.write_files, done_ids=m.done_ids, commit=m.commit,
                                 finalize=m.finalize, write_plan=m.write_plan)


VOC = get_label_set("voc")


def _entries(n, start=0):
    return [PromptEntry(id=f"{i:06d}", prompt=f"a cat number {i}", classes=("cat",), index=i, source=f"test:{i}")
            for i in range(start, start + n)]


def _sample(e, size=16):
    """Deterministic image (H, W, 3) and mask (H, W) of an entry."""
    rng = np.random.default_rng(e.index)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 8, 255], dtype=np.uint8), (size, size))
    return image, mask


def _record(e):
    return dict(id=e.id, index=e.index, prompt=e.prompt, classes=list(e.classes), seed=2024 + e.index, model="fake",
                steps=2, seconds=0.1)


def _run(out, entries, shard=None, stop_after=None):
    """What generate does for ``entries`` (optionally one shard of them), stopping after ``stop_after`` samples."""
    writer = _dataset(str(out), VOC, shard=shard)
    mine = select_shard(entries, shard)
    writer.write_plan([e.id for e in mine])
    done = writer.done_ids()
    todo = [e for e in mine if e.id not in done][:stop_after]
    for e in todo:
        writer.write_files(e.id, *_sample(e))
        writer.commit(_record(e))
    writer.finalize()
    return [e.id for e in mine]


def _split(out):
    return (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def _manifest(out):
    return read_jsonl(str(out / "manifest.jsonl"))


def _same_files(a, b, ids):
    for i in ids:
        pa, pb = dataset_paths(str(a), i), dataset_paths(str(b), i)
        for key in ("image", "mask"):
            with open(pa[key], "rb") as fa, open(pb[key], "rb") as fb:
                assert fa.read() == fb.read(), (i, key)


# --- select_shard -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_the_prompts(n):
    entries = _entries(23, start=7)  # --start 7: indices are positions in the file
    parts = [select_shard(entries, (i, n)) for i in range(n)]
    ids = [e.id for p in parts for e in p]
    assert sorted(ids) == [e.id for e in entries]  # every prompt exactly once
    assert len(ids) == len(set(ids))
    for p in parts:  # same split whatever the batch size
        for size in (1, 3, 8):
            assert [e.id for b in batches(p, size) for e in b] == [e.id for e in p]


def test_select_shard_value():
    entries = _entries(7)
    assert [e.index for e in select_shard(entries, (1, 3))] == [1, 4]
    assert [e.index for e in select_shard(entries, (0, 3))] == [0, 3, 6]
    assert select_shard(entries, None) == entries


# --- merge --------------------------------------------------------------------------------
def test_shards_in_one_directory_merge_to_the_unsharded_dataset(tmp_path):
    entries = _entries(11)
    ref, shared = tmp_path / "ref", tmp_path / "shared"
    _run(ref, entries)
    _run(shared, entries, shard=(1, 2))  # order of the jobs does not matter
    _run(shared, entries, shard=(0, 2))
    assert not (shared / "manifest.jsonl").exists()  # shards write their own manifests
    assert merge_main([str(shared), "--quiet"]) == 0
    assert _split(shared) == _split(ref) == [e.id for e in entries]
    assert _manifest(shared) == _manifest(ref)
    _same_files(shared, ref, _split(ref))
    assert json.loads((shared / "labelset.json").read_text())["classes"] == list(VOC.classes)
    # merging again changes nothing
    assert merge_main([str(shared), "--quiet"]) == 0
    assert _manifest(shared) == _manifest(ref)


def test_shards_in_separate_directories_merge_into_out(tmp_path):
    entries = _entries(9)
    ref = tmp_path / "ref"
    _run(ref, entries)
    dirs = [tmp_path / f"job{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        _run(d, entries, shard=(i, 3))
    out = tmp_path / "merged"
    assert merge_main([*map(str, dirs), "--out", str(out), "--quiet"]) == 0
    assert _split(out) == _split(ref)
    assert _manifest(out) == _manifest(ref)
    _same_files(out, ref, _split(ref))


def test_gaps_are_reported_per_id_and_shard_then_filled(tmp_path, capsys):
    entries = _entries(10)
    shared = tmp_path / "shared"
    _run(shared, entries, shard=(0, 2))
    planned = _run(shared, entries, shard=(1, 2), stop_after=2)  # job 1 was killed after 2 samples
    assert merge_main([str(shared)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"missing {i} shard 1/2" for i in planned[2:]]
    assert "7 samples" in err and "3 gaps" in err
    assert _split(shared) == sorted(set(e.id for e in select_shard(entries, (0, 2)))
                                    | set(planned[:2]))
    _run(shared, entries, shard=(1, 2))  # the same job again resumes: only the 3 missing are written
    shard_manifest = read_jsonl(str(shared / "manifests" / "shard-1-of-2.jsonl"))
    assert len(shard_manifest) == 5 and len({r["id"] for r in shard_manifest}) == 5
    assert merge_main([str(shared)]) == 0
    assert _split(shared) == [e.id for e in entries]


def test_shard_that_never_started_is_reported(tmp_path, capsys):
    entries = _entries(6)
    shared = tmp_path / "shared"
    _run(shared, entries, shard=(0, 3))
    _run(shared, entries, shard=(2, 3))
    report = merge_datasets([str(shared)])
    assert report.missing_shards == ["1/3"] and report.missing == []
    assert merge_main([str(shared)]) == 1
    assert capsys.readouterr().out.splitlines() == ["missing-shard 1/3 (no plan file: the job never started)"]


def test_record_without_files_is_incomplete(tmp_path, capsys):
    entries = _entries(4)
    shared = tmp_path / "shared"
    _run(shared, entries, shard=(0, 1))
    os.remove(dataset_paths(str(shared), "000002")["mask"])
    assert merge_main([str(shared)]) == 1
    assert capsys.readouterr().out.splitlines() == ["missing 000002 shard 0/1"]
    assert _split(shared) == ["000000", "000001", "000003"]
    # an unsharded dataset (no plans) reports it as incomplete
    plain = tmp_path / "plain"
    _run(plain, entries)
    os.remove(dataset_paths(str(plain), "000001")["image"])
    assert merge_main([str(plain)]) == 1
    assert capsys.readouterr().out.splitlines() == ["incomplete 000001 (manifest record without its image or mask)"]


def test_torn_last_line_of_a_shard_manifest(tmp_path):
    """A job killed while appending its manifest line leaves a torn line: that sample is a gap, nothing breaks."""
    entries = _entries(4)
    shared = tmp_path / "shared"
    _run(shared, entries, shard=(0, 1))
    path = shared / "manifests" / "shard-0-of-1.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    report = merge_datasets([str(shared)])
    assert report.ids == ["000000", "000001", "000002"]
    assert report.missing_by_shard == {"0/1": ["000003"]}


def test_unsharded_train_txt_is_in_prompt_order(tmp_path):
    """Regression: train.txt followed completion order, which differs between Ray workers and one process."""
    entries = _entries(5)
    writer = _dataset(str(tmp_path), VOC)
    for e in [entries[i] for i in (3, 0, 4, 1, 2)]:
        writer.write_files(e.id, *_sample(e))
        writer.commit(_record(e))
    assert writer.finalize() == [e.id for e in entries]
    assert _split(tmp_path) == [e.id for e in entries]


def test_merge_errors(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, _entries(2), shard=(0, 1))
    _run(b, _entries(2), shard=(0, 1))
    with pytest.raises(SystemExit) as exc:
        merge_main([str(a), str(b)])
    assert exc.value.code == 2
    assert "needs `out` (--out DIR)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge_main([str(tmp_path / "nope")])
    assert "not a dataset directory" in capsys.readouterr().err
    coco = tmp_path / "coco"
    _dataset(str(coco), get_label_set("coco"))
    with pytest.raises(SystemExit):
        merge_main([str(a), str(coco), "--out", str(tmp_path / "m")])
    assert "differs from the other directories" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # refused before anything was written
    before = _tree(coco)  # a dataset (it has labelset.json) without a single sample
    assert merge_main([str(coco)]) == 1
    assert "no finished samples" in capsys.readouterr().err
    assert _tree(coco) == before


# --- dataset integrity: refuse before writing ---------------------------------------------
def _tree(path):
    """Every file and folder under ``path`` with its bytes (None for folders); {} if it does not exist."""
    tree = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            tree[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                tree[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return tree


def _refused(argv, capsys, *folders):
    """Run merge ``argv``; it has to exit 2 with one ``error:`` line and leave ``folders`` as they were."""
    before = [_tree(f) for f in folders]
    with pytest.raises(SystemExit) as exc:
        merge_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert [_tree(f) for f in folders] == before
    return err.strip()


def _unrelated(tmp_path):
    """Two datasets of 4 samples each with the same ids but other prompts (and images)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, _entries(4))
    _run(b, [PromptEntry(id=e.id, prompt=f"a dog number {e.index}", classes=("dog",), index=e.index + 100,
                         source=e.source) for e in _entries(4)])
    return a, b


def test_clashing_ids_are_refused(tmp_path, capsys):
    """Regression: two unrelated datasets with the same ids merged with exit 0 and 'no gaps'; the last one won."""
    a, b = _unrelated(tmp_path)
    out = tmp_path / "merged"
    err = _refused([str(a), str(b), "--out", str(out)], capsys, a, b)
    assert err == (f"error: 4 ids have different records in {a} and {b} (000000, 000001, 000002, 000003): "
                   f"merging would lose samples; use --on-conflict keep-first to keep {a}'s")
    assert not out.exists()


def test_clash_between_a_folders_manifest_and_its_shard_manifest(tmp_path):
    shared = tmp_path / "shared"
    _run(shared, _entries(3), shard=(0, 1))
    assert merge_main([str(shared), "--quiet"]) == 0  # manifest.jsonl now repeats the shard's records
    path = shared / "manifests" / "shard-0-of-1.jsonl"
    records = read_jsonl(str(path))
    records[1]["prompt"] = "something else"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError) as exc:
        merge_datasets([str(shared)])
    assert str(exc.value) == (
        f"1 ids have different records in {shared / 'manifest.jsonl'} and {path} (000001): merging would lose "
        f"samples; use --on-conflict keep-first to keep {shared / 'manifest.jsonl'}'s")


def test_identical_overlaps_are_merged_once(tmp_path):
    """The same samples reached twice (a re-run shard in two folders, one folder given twice) are no conflict;
    timings (``seconds``) do not count and the first input's record is kept."""
    entries = _entries(6)
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, entries, shard=(0, 2))
    _run(a, entries, shard=(1, 2))
    _run(b, entries, shard=(1, 2))  # shard 1 ran twice, once into each folder
    path = b / "manifests" / "shard-1-of-2.jsonl"
    path.write_text("".join(json.dumps({**r, "seconds": 9.5}) + "\n" for r in read_jsonl(str(path))))
    out = tmp_path / "merged"
    assert merge_main([str(a), str(b), "--out", str(out), "--quiet"]) == 0
    assert _split(out) == [e.id for e in entries]
    assert [r["seconds"] for r in _manifest(out)] == [0.1] * 6  # a's records, once each
    _same_files(out, a, _split(out))
    twice = tmp_path / "twice"
    assert merge_main([str(b), str(a), str(b), "--out", str(twice), "--quiet"]) == 0
    assert _split(twice) == [e.id for e in entries]
    assert [r["seconds"] for r in _manifest(twice)] == [0.1, 9.5, 0.1, 9.5, 0.1, 9.5]  # b's where it has them


def test_keep_first_keeps_the_first_inputs_samples(tmp_path, capsys):
    a, b = _unrelated(tmp_path)
    out = tmp_path / "merged"
    assert merge_main([str(a), str(b), "--out", str(out), "--on-conflict", "keep-first", "--quiet"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: 4 ids had different records in several inputs (000000, 000001, 000002, 000003): "
        "kept the first input's, dropped 4 records"]
    assert _manifest(out) == _manifest(a)
    _same_files(out, a, _split(a))
    report = merge_datasets([str(a), str(b)], str(tmp_path / "again"), on_conflict="keep-first")
    assert report.dropped == {i: [str(b)] for i in _split(a)}
    with pytest.raises(ValueError, match="`on_conflict` has to be one of fail, keep-first but is 'last'"):
        merge_datasets([str(a), str(b)], str(out), on_conflict="last")


def test_folder_that_is_not_a_dataset_is_refused(tmp_path, capsys):
    """Regression: merge wrote manifest.jsonl and ImageSets/ into a folder that is not a dataset, then failed."""
    folder = tmp_path / "photos"
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "notes.txt").write_text("not a dataset\n")
    assert _refused([str(folder)], capsys, folder) == (
        f"error: {folder}: not a dataset directory (no manifest.jsonl, manifests/ or labelset.json)")
    a = tmp_path / "a"
    _run(a, _entries(2))
    out = tmp_path / "merged"
    assert "not a dataset directory" in _refused([str(a), str(folder), "--out", str(out)], capsys, a, folder)
    assert not out.exists()


def test_out_that_is_a_file_or_an_input_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, _entries(4), shard=(0, 2))
    _run(b, _entries(4), shard=(1, 2))
    out = tmp_path / "merged.txt"
    out.write_text("keep me\n")
    assert _refused([str(a), str(b), "--out", str(out)], capsys, a, b, tmp_path) == (
        f"error: --out {out}: is a file, not a directory")
    assert _refused([str(a), str(b), "--out", str(a)], capsys, a, b) == (
        f"error: --out {a}: is one of the input directories; merge several directories into a new folder")


def test_run_settings_that_differ_are_refused(tmp_path, capsys):
    """``run.json`` (the settings that define the samples) has to agree; where only some inputs have one, the
    first found goes into --out."""
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, _entries(4), shard=(0, 2))
    _run(b, _entries(4), shard=(1, 2))
    run = lambda height, written: json.dumps({"defining": {"model": "fake", "height": height, "width": 512},  # noqa: E731
                                              "versions": {"pccfast": written}, "written": written})
    (a / "run.json").write_text(run(512, "2024-01-01"))
    (b / "run.json").write_text(run(512, "2024-02-02"))  # versions and times are not compared
    assert merge_datasets([str(a), str(b)], str(tmp_path / "same")).ids == [e.id for e in _entries(4)]
    (b / "run.json").write_text(run(768, "2024-02-02"))
    out = tmp_path / "merged"
    assert _refused([str(a), str(b), "--out", str(out)], capsys, a, b) == (
        f"error: {b / 'run.json'}: the samples were made with height 768 but those of {a / 'run.json'} with 512; "
        "samples made with other settings are not one dataset")
    assert not out.exists()
    (b / "run.json").write_text("[]")
    assert _refused([str(a), str(b), "--out", str(out)], capsys, a, b) == (
        f"error: {b / 'run.json'}: has to be a JSON object with a 'defining' object")
    (b / "run.json").unlink()
    assert merge_main([str(a), str(b), "--out", str(out), "--quiet"]) == 0
    assert (out / "run.json").read_bytes() == (a / "run.json").read_bytes()
    assert _split(out) == [e.id for e in _entries(4)]


def test_oserror_is_one_line(tmp_path, capsys, monkeypatch):
    """An unreadable input or an --out that cannot be written is one ``error: FILE: reason`` line, exit 2
    (permissions are simulated: the tests may run as root, which chmod does not stop)."""
    import builtins
    import errno

    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, _entries(4), shard=(0, 2))
    _run(b, _entries(4), shard=(1, 2))
    locked = str(b / "manifests" / "shard-1-of-2.jsonl")
    real_open, real_makedirs = builtins.open, os.makedirs

    def open_(path, *args, **kw):
        if str(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    out = tmp_path / "merged"
    before = _tree(a), _tree(b)
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", open_)
        with pytest.raises(SystemExit) as exc:
            merge_main([str(a), str(b), "--out", str(out)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {locked}: Permission denied"]
    assert (_tree(a), _tree(b)) == before and not out.exists()

    def makedirs(path, *args, **kw):
        if str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_makedirs(path, *args, **kw)

    monkeypatch.setattr(os, "makedirs", makedirs)
    assert _refused([str(a), str(b), "--out", str(out)], capsys, a, b) == (
        f"error: {out}: cannot write files here: Permission denied")
    assert not out.exists()


# --- end to end on the tiny model ----------------------------------------------------------
TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--no-progress", "--batch", "4"]


@pytest.mark.slow
def test_generate_shards_then_merge_equal_unsharded(tmp_path, shared_prompts, tiny_pipe):
    """Shard 0/2 through the CLI, shard 1/2 (another batch size) and the unsharded run through
    run_generation with one loaded pipeline (as the CLI does); the merge equals the unsharded run."""
    from pccfast.cli.generate import main as generate_main
    from pccfast.core.config import PCCConfig
    from pccfast.data.prompts import read_prompts
    from pccfast.data.provenance import file_digest
    from pccfast.diffusion.settings import GenerationConfig
    from pccfast.runs.generate import run_generation

    ref, shared = tmp_path / "ref", tmp_path / "shared"
    assert generate_main(["--prompts", shared_prompts, "--limit", "8", *TINY, "--out", str(shared), "--shard", "0/2"]) == 0
    entries = read_prompts(shared_prompts, VOC, limit=8)
    settings, cfg = GenerationConfig(model="tiny", steps=2, height=64, width=64), PCCConfig()
    pipe = tiny_pipe
    source = f"{os.path.abspath(shared_prompts)} {file_digest(shared_prompts)}"  # what the CLI records in run.json
    assert run_generation(entries, settings, cfg, VOC, str(ref), batch=4, progress=False, pipe=pipe,
                          prompts=source).done == 8
    # the split ignores the batch size
    assert run_generation(select_shard(entries, (1, 2)), settings, cfg, VOC, str(shared), batch=3, shard=(1, 2),
                          progress=False, pipe=pipe, prompts=source).done == 4
    plans = [(shared / "manifests" / f"shard-{i}-of-2.plan").read_text().split() for i in range(2)]
    assert sorted(plans[0] + plans[1]) == _split(ref) and not set(plans[0]) & set(plans[1])
    assert merge_main([str(shared), "--quiet"]) == 0
    assert _split(shared) == _split(ref)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(_manifest(shared)) == strip(_manifest(ref))
    same = total = 0
    for i in _split(ref):
        ma = np.asarray(Image.open(dataset_paths(str(shared), i)["mask"]))
        mb = np.asarray(Image.open(dataset_paths(str(ref), i)["mask"]))
        same, total = same + int((ma == mb).sum()), total + ma.size
        ia = np.asarray(Image.open(dataset_paths(str(shared), i)["image"]), dtype=np.int16)
        ib = np.asarray(Image.open(dataset_paths(str(ref), i)["image"]), dtype=np.int16)
        assert np.abs(ia - ib).mean() < 0.5
    assert same / total >= 0.999
