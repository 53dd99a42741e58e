"""``python -m pccfast.native``: builds the C kernels ahead of a run."""
import pytest

from pccfast.backends import native
from pccfast.cli.native import main

needs_native = pytest.mark.skipif(not native.available("kmeans", warn=False), reason="needs a C compiler (cc) for the kernels")


@needs_native
def test_native_cli_builds_every_kernel(capsys, tmp_path, monkeypatch):
    """python -m pccfast.native (no names) builds every shipped kernel into the cache folder it
    is given and reports each; a cache folder that cannot be created falls back to the temp dir."""
    names = native.kernel_names()
    assert {"kmeans", "features", "components", "morphology"} <= set(names)
    monkeypatch.setenv("PCCFAST_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    assert main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == names
    for name, line in zip(names, out):
        assert line.startswith(f"{name}: ok ({tmp_path / 'cache' / name}-"), line
        assert list((tmp_path / "cache").glob(f"{name}-*.so")), name
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PCCFAST_KERNEL_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    monkeypatch.setattr(native, "_loaded", {})
    assert main(["kmeans"]) == 0
    assert "pccfast-kernels-" in capsys.readouterr().out


def test_native_cli_unknown_kernel_is_one_line(capsys, monkeypatch):
    """An unknown kernel name: one line saying it is unavailable and why, exit status 1."""
    monkeypatch.delenv("PCCFAST_NATIVE", raising=False)
    assert main(["no_such_kernel"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("no_such_kernel: unavailable: kernel source no_such_kernel.c not found")
