"""One line for every error: each command, in-process through its ``main`` and as ``python -m``.

The cases a user found as tracebacks: an output path that is a folder or a file, an output in a
folder that is missing or is a file, permission denied and a full disk (simulated: the tests run
as root, which chmod does not stop), ``--device foo``, Ctrl-C inside the work, and standard
output closed by ``| head``. Every case ends in exactly one line on stderr (``error: ...`` or the
Ctrl-C line) and a non-zero exit status: 2 for an error, 130 for Ctrl-C, 141 (quiet) for a
closed standard output; where the check comes before any writing, nothing is left behind.
"""
import errno
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from pccfast.cli.common import BROKEN_PIPE_STATUS, one_line_errors
from pccfast.data.fileio import save_image, save_mask_png
from pccfast.data.labelsets import get_label_set
from pccfast.testing.fixtures import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOC = get_label_set("voc")
TINY = ["--model", "tiny", "--steps", "1", "--height", "64", "--width", "64", "--limit", "2", "--no-progress",
        "--device", "cpu"]
COMMANDS = ["generate", "relabel", "merge", "prompts", "inspect", "evaluate", "native"]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _main(name):
    import importlib

    return importlib.import_module(f"pccfast.cli.{name}").main


def call(name, argv):
    """Exit status of ``pccfast.cli.<name>.main(argv)``; whatever else escapes fails the test (a
    traceback for the user), KeyboardInterrupt included (it would stop pytest)."""
    try:
        return _main(name)(argv)
    except SystemExit as e:
        return e.code
    except BaseException as e:  # noqa: BLE001 - the point: nothing may escape
        raise AssertionError(f"{type(e).__name__} escaped main (a traceback): {e!r}") from None


def stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_error(capsys, code, expect=2):
    lines = stderr_lines(capsys)
    assert code == expect, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def tree(path):
    """Every path under ``path`` (files and folders), relative to it."""
    out = set()
    for d, dirs, files in os.walk(path):
        out.update(os.path.relpath(os.path.join(d, n), path) for n in dirs + files)
    return out


def small_dataset(root, ids=("0", "1")):
    """A finished VOC-layout dataset: images, masks, manifest.jsonl and labelset.json."""
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for i in ids:
        save_image(os.path.join(root, "JPEGImages", f"{i}.jpg"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        mask = np.zeros((64, 64), np.uint8)
        mask[10:40, 12:50] = VOC.index("dog")
        save_mask_png(os.path.join(root, "SegmentationClass", f"{i}.png"), mask, VOC.flat_palette())
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
        f.writelines(json.dumps({"id": i, "prompt": "a dog", "classes": ["dog"]}) + "\n" for i in ids)
    with open(os.path.join(root, "labelset.json"), "w") as f:
        json.dump(VOC.to_json(), f)
    return str(root)


def _raise(exc):
    def raiser(*args, **kwargs):
        raise exc

    return raiser


def deny(monkeypatch):
    """Permission denied for every new file, folder and link (what a folder of another account
    gives; an existing folder still counts as there for ``os.makedirs(exist_ok=True)``)."""
    denied = PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", _raise(denied))
    monkeypatch.setattr(os, "mkdir", _raise(denied))
    monkeypatch.setattr(os, "link", _raise(denied))
    real_open = open

    def guarded(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", file)
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", guarded)


def disk_full(monkeypatch):
    """A full disk: the data cannot be made durable (fsync, and os.write for unbuffered writers)."""
    monkeypatch.setattr(os, "fsync", _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))


# ------------------------------------------------------------------------------------------
# the decorator itself
# ------------------------------------------------------------------------------------------
def test_decorator_value(capsys):
    """Each escaping exception -> its line and exit status; SystemExit and return values pass."""
    def main_raising(exc):
        @one_line_errors
        def main(argv=None):
            raise exc

        return main

    assert main_raising(PermissionError(errno.EACCES, "Permission denied", "/x/y"))([]) == 2
    assert capsys.readouterr().err == "error: /x/y: Permission denied\n"
    assert main_raising(KeyboardInterrupt())([]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert main_raising(BrokenPipeError(errno.EPIPE, "Broken pipe"))([]) == BROKEN_PIPE_STATUS == 141
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as info:
        main_raising(SystemExit(2))([])
    assert info.value.code == 2
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        main_raising(ZeroDivisionError("bug"))([])

    @one_line_errors
    def fine(argv=None):
        """doc"""
        print("ok")
        return 0

    assert fine([]) == 0 and fine.__doc__ == "doc" and capsys.readouterr().out == "ok\n"


def test_decorator_resumable_names_out(capsys):
    """With the command's parser, Ctrl-C says that the finished work in ``--out`` is kept."""
    import argparse

    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--out", default="out")
        return p

    @one_line_errors(resumable=parser)
    def main(argv=None):
        parser().parse_args(argv)
        raise KeyboardInterrupt

    assert main(["--out", "/data/run"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted; finished work is kept in /data/run: run the same command again to resume"]


def test_decorator_broken_pipe_elsewhere_is_an_error(tmp_path, capsys, monkeypatch):
    """A broken pipe that is not standard output's (stdout a file, still open): an error line."""
    with open(tmp_path / "stdout", "w") as f:
        monkeypatch.setattr(sys, "stdout", f)

        @one_line_errors
        def main(argv=None):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe", "worker-socket")

        assert main([]) == 2
    assert capsys.readouterr().err == "error: worker-socket: Broken pipe\n"


# ------------------------------------------------------------------------------------------
# per command: argv for a run whose output goes to OUT, and what each case patches
# ------------------------------------------------------------------------------------------
OWNED_ELSEWHERE = set()  # commands whose main lacks @one_line_errors (none left)


def xfail(reason):
    return pytest.mark.xfail(reason=reason, strict=True)


NO_DECORATOR = "its main has no @one_line_errors yet (pccfast.cli.common)"


@pytest.fixture
def inputs(tmp_path):
    """Inputs of every command under tmp_path/in; outputs go elsewhere in tmp_path."""
    base = tmp_path / "in"
    base.mkdir()
    data = small_dataset(str(base / "ds"))
    captures, images, _ = make_dataset(str(base / "scenes"), n=2)
    shard = small_dataset(str(base / "shard"), ids=("2",))
    return {"dataset": data, "captures": captures, "images": images, "shard": shard}


def argv_for(name, inputs, out):
    """argv of ``name`` writing to ``out`` (a folder for generate/relabel/merge, else a file)."""
    return {
        "generate": TINY + ["--out", out],
        "relabel": ["--captures", inputs["captures"], "--images", inputs["images"], "--out", out, "--device", "cpu",
                    "--no-progress"],
        "merge": [inputs["dataset"], inputs["shard"], "--out", out, "--quiet"],
        "prompts": ["--per-class", "1", "--out", out],
        "inspect": [inputs["dataset"], "--out", out],
        "evaluate": [inputs["dataset"], inputs["dataset"], "--json", out],
    }[name]


WRITERS = ["generate", "relabel", "merge", "prompts", "inspect", "evaluate"]
FILE_OUT = {"prompts": "p.jsonl", "inspect": "sheet.png", "evaluate": "scores.json"}


@pytest.fixture
def warm(tiny_pipe):
    """The tiny model is loaded once per process before these tests: its first load prints
    library warnings on stderr, which are not the lines under test."""


@pytest.mark.parametrize("name", WRITERS)
def test_output_exists_as_the_wrong_kind(name, inputs, tmp_path, capsys, warm):
    """The output is a file where a folder is written (generate, relabel, merge), or a folder
    where a file is written (prompts, inspect, evaluate): one line, 2, nothing written."""
    if name in FILE_OUT:
        out = tmp_path / FILE_OUT[name]
        out.mkdir()
    else:
        out = tmp_path / "out"
        out.write_text("")
    before = tree(tmp_path)
    line = assert_one_error(capsys, call(name, argv_for(name, inputs, str(out))))
    assert str(out) in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", WRITERS)
def test_output_inside_a_file(name, inputs, tmp_path, capsys, warm):
    """The output's folder is a file: one line naming it, 2, nothing written."""
    (tmp_path / "blocker").write_text("")
    out = tmp_path / "blocker" / FILE_OUT.get(name, "out")
    before = tree(tmp_path)
    line = assert_one_error(capsys, call(name, argv_for(name, inputs, str(out))))
    assert "blocker" in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["inspect", "evaluate"])
def test_output_file_in_a_missing_folder(name, inputs, tmp_path, capsys):
    """inspect --out / evaluate --json in a folder that does not exist: one line, 2; the
    folder is not made (a mistyped path should not create folders)."""
    out = tmp_path / "nope" / FILE_OUT[name]
    line = assert_one_error(capsys, call(name, argv_for(name, inputs, str(out))))
    assert line == f"error: {tmp_path / 'nope'}: no such folder for `{argv_for(name, inputs, '')[-2]}` (create it first)"
    assert not (tmp_path / "nope").exists()


def test_inspect_json_checked_before_work(inputs, tmp_path, capsys):
    """inspect --json that cannot be written fails before the stats are printed, and a bad
    --json keeps --out from being written (both are checked first)."""
    (tmp_path / "blocker").write_text("")
    code = call("inspect", [inputs["dataset"], "--json", str(tmp_path / "blocker" / "s.json"),
                            "--out", str(tmp_path / "sheet.png")])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and out.err.count("\n") == 1 and "`--json`" in out.err
    assert not (tmp_path / "sheet.png").exists()
    code = call("inspect", [inputs["dataset"], "--json", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.json")])
    assert_one_error(capsys, code)


@pytest.mark.parametrize("name", WRITERS)
def test_permission_denied(name, inputs, tmp_path, capsys, monkeypatch, warm):
    """The output folder exists but nothing can be created in it (root is not stopped by
    chmod, so creating files, folders and links is patched to fail): one line, 2, nothing
    left behind."""
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / FILE_OUT[name] if name in FILE_OUT else tmp_path / "out"
    before = tree(tmp_path)
    deny(monkeypatch)
    line = assert_one_error(capsys, call(name, argv_for(name, inputs, str(out))))
    monkeypatch.undo()
    assert "Permission denied" in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", WRITERS)
def test_disk_full(name, inputs, tmp_path, capsys, monkeypatch, warm):
    """No space left while writing: one line that says so, 2; no temporary files left behind
    (the writes are atomic)."""
    out = tmp_path / "out"
    if name in FILE_OUT:
        out.mkdir()
        out = out / FILE_OUT[name]
    disk_full(monkeypatch)
    line = assert_one_error(capsys, call(name, argv_for(name, inputs, str(out))))
    monkeypatch.undo()
    assert "No space left on device" in line
    assert not [p for p in tree(tmp_path) if os.path.basename(p).startswith(".tmp-")]
    if name in FILE_OUT:
        assert not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("name", ["generate", "relabel"])
def test_device_foo(name, inputs, tmp_path, capsys):
    """--device foo: one line naming the option, 2, before anything is written."""
    argv = [a if a != "cpu" else "foo" for a in argv_for(name, inputs, str(tmp_path / "out"))]
    line = assert_one_error(capsys, call(name, argv))
    assert "`--device`" in line and "'foo'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["merge", "prompts", "inspect", "evaluate", "native"])
def test_device_foo_is_not_an_option(name, inputs, tmp_path, capsys):
    """Commands without --device: argparse's own refusal (usage and one error line), 2."""
    argv = {"merge": [inputs["dataset"]], "prompts": [], "inspect": [inputs["dataset"]],
            "evaluate": [inputs["dataset"], inputs["dataset"]], "native": []}[name]
    assert call(name, argv + ["--device", "foo"]) == 2
    lines = stderr_lines(capsys)
    # (native takes foo for a kernel name)
    assert lines[-1].startswith(f"python -m pccfast.{name}: error: unrecognized arguments: --device"), lines
    assert not any("Traceback" in line for line in lines)


WORK = {  # the function doing each command's work, as its main looks it up
    "generate": "pccfast.runs.generate.run_generation",
    "relabel": "pccfast.runs.relabel.relabel_dir",
    "merge": "pccfast.cli.merge.merge_datasets",
    "prompts": "pccfast.cli.prompts.prompt_bank",
    "inspect": "pccfast.cli.inspect.dataset_stats",
    "evaluate": "pccfast.cli.evaluate.evaluate_dirs",
    "native": "pccfast.cli.native.build_kernels",
}


@pytest.mark.parametrize("name", [
    "generate", "relabel",
    "merge",
    "prompts",
    "inspect", "evaluate", "native",
])
def test_ctrl_c(name, inputs, tmp_path, capsys, monkeypatch):
    """Ctrl-C inside the work: one line, 130. generate and relabel (a re-run resumes) say where
    the finished work is kept; the others print ``interrupted``; nothing half-written is left."""
    out = tmp_path / "out"
    if name in FILE_OUT:
        out.mkdir()
        out = out / FILE_OUT[name]
    argv = argv_for(name, inputs, str(out)) if name != "native" else []
    monkeypatch.setattr(WORK[name], _raise(KeyboardInterrupt()))
    code = call(name, argv)
    lines = stderr_lines(capsys)
    assert code == 130, (code, lines)
    if name in ("generate", "relabel"):
        assert lines == [f"interrupted; finished work is kept in {out}: run the same command again to resume"]
    else:
        assert lines == ["interrupted"]
    assert not [p for p in tree(tmp_path) if os.path.basename(p).startswith(".tmp-")]


def test_native_os_error(capsys, monkeypatch):
    """An OSError while building the kernels: one line, 2."""
    monkeypatch.setattr(WORK["native"], _raise(PermissionError(errno.EACCES, "Permission denied", "/cache/k.so")))
    assert assert_one_error(capsys, call("native", [])) == "error: /cache/k.so: Permission denied"


@pytest.mark.parametrize("name", ["inspect", "evaluate"])
def test_inputs_missing_or_not_a_dataset(name, tmp_path, capsys):
    """DATASET / PRED / GT missing, or a file: one line, 2."""
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "nope", tmp_path / "file"):
        argv = [str(path)] if name == "inspect" else [str(path), str(path)]
        assert str(path) in assert_one_error(capsys, call(name, argv))
    (tmp_path / "empty").mkdir()
    if name == "inspect":
        assert "not a dataset folder" in assert_one_error(capsys, call(name, [str(tmp_path / "empty")]))


# ------------------------------------------------------------------------------------------
# standard output closed by the reader (``... | head``), as python -m
# ------------------------------------------------------------------------------------------
def run_closed_stdout(name, argv, env=None):
    """``python -m pccfast.<name> argv`` whose standard output is a pipe nobody reads any more
    (``| head`` after its line): deterministic, unlike a real head."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", f"pccfast.{name}", *argv], stdout=w, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=180, env={**os.environ, **(env or {})})
    finally:
        os.close(w)


@pytest.mark.parametrize("name", [
    "inspect",
    "prompts",
    "evaluate",
    "merge",
    "native",
])
def test_closed_stdout_is_quiet(name, inputs, tmp_path):
    """``python -m pccfast.<name> ... | head``: no traceback and no "Exception ignored" at exit,
    nothing on stderr, exit status 141 (what a shell shows for a command its reader left)."""
    if name == "merge":  # a plan naming an id that was never finished: a gap line on stdout
        os.makedirs(os.path.join(inputs["dataset"], "manifests"))
        with open(os.path.join(inputs["dataset"], "manifests", "shard-0-of-2.plan"), "w") as f:
            f.write("0\n1\nghost\n")
    argv = {"inspect": [inputs["dataset"]], "prompts": ["--per-class", "50"],
            "evaluate": [inputs["dataset"], inputs["dataset"]], "merge": [inputs["dataset"], "--quiet"],
            "native": ["kmeans"]}[name]
    res = run_closed_stdout(name, argv, env={"PCCFAST_KERNEL_CACHE": str(tmp_path / "cache")})
    assert res.returncode == BROKEN_PIPE_STATUS and res.stderr == "", (res.returncode, res.stderr[-2000:])


def test_closed_stdout_under_head(inputs):
    """The user's pipeline itself: ``python -m pccfast.inspect DATASET | head -1``."""
    res = subprocess.run(["bash", "-o", "pipefail", "-c",
                          f"{sys.executable} -m pccfast.inspect {inputs['dataset']} | head -1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert res.stdout.startswith("dataset ") and res.stdout.count("\n") == 1
    assert res.returncode in (0, BROKEN_PIPE_STATUS) and res.stderr == "", res.stderr[-2000:]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=xfail(f"{n}: {NO_DECORATOR}")) if n in OWNED_ELSEWHERE else n for n in COMMANDS])
def test_every_main_is_wrapped(name):
    """Every command's main goes through one_line_errors (functools.wraps leaves __wrapped__)."""
    assert hasattr(_main(name), "__wrapped__")
