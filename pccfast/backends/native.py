"""CPU kernels in C (``kernels/*.c``), compiled on first use and loaded with ctypes.

The torch path runs everywhere (CPU and CUDA). On the CPU, a few stages are memory-bound
chains of small torch ops (the k-means E-step writes and re-reads a (k, N) score matrix per
iteration); ``benchmarks/bench_labeller.py`` measured that fused C loops pay there, so the
``"auto"`` backends use these kernels for CPU tensors and the torch path for everything else.

A kernel is compiled once per source, compiler and CPU (``-O3 -march=native -fopenmp``) into
a cache folder and reused by every later process:

- ``PCCFAST_KERNEL_CACHE``: cache folder (default ``$XDG_CACHE_HOME/pccfast/kernels`` or
  ``~/.cache/pccfast/kernels``);
- ``PCCFAST_NATIVE=0``: never build or load a kernel (the ``"auto"`` backends use torch);
- ``CC``: the C compiler (default ``cc``, then ``gcc``).

Without a compiler, ``"auto"`` falls back to torch (with one warning) and an explicit
``"native"`` backend raises ``NativeUnavailable`` with the reason in one line (the rules are
``pccfast.backends.resolve``; the ctypes bindings are ``pccfast.backends.kernels``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["NativeUnavailable", "available", "build_kernels", "kernel_names", "kernel_source", "load", "num_threads", "ptr",
           "typed"]

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-fno-math-errno"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_failed: dict[str, str] = {}
_warned: set[str] = set()


class NativeUnavailable(RuntimeError):
    """A C kernel could not be built or loaded (the message says why, in one line)."""


def kernel_source(name: str) -> Path:
    """Path of ``kernels/<name>.c``: the installed ``pccfast.kernels`` package data, or the
    ``kernels/`` folder of a source checkout."""
    candidates = []
    try:
        from importlib import resources

        candidates.append(Path(str(resources.files("pccfast.kernels") / f"{name}.c")))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "kernels" / f"{name}.c")
    for path in candidates:
        if path.is_file():
            return path
    raise NativeUnavailable(f"kernel source {name}.c not found (looked in {', '.join(map(str, candidates))})")


def _cache_dir() -> Path:
    env = os.environ.get("PCCFAST_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pccfast" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags (a cache folder shared by
    different machines must not hand one CPU's binary to another)."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    sig += line
    except OSError:
        pass
    return sig


def _compiler() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    raise NativeUnavailable("no C compiler found (set CC, or install gcc; the torch backends work without one)")


def _build(name: str) -> Path:
    src = kernel_source(name)
    code = src.read_bytes()
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"C compiler {cc!r} does not run: {e}") from None
    digest = hashlib.sha256(code + " ".join(_FLAGS).encode() + version.encode() + _cpu_signature().encode())
    out_dir = _cache_dir()
    target = out_dir / f"{name}-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"{out_dir} is not writable")
    except OSError as e:  # e.g. a read-only home: a private folder under the temp dir
        import tempfile

        fallback = Path(tempfile.gettempdir()) / f"pccfast-kernels-{os.getuid() if hasattr(os, 'getuid') else 'u'}"
        try:
            fallback.mkdir(parents=True, exist_ok=True)
        except OSError:
            raise NativeUnavailable(f"kernel cache folder {out_dir} cannot be created: {e}") from None
        out_dir, target = fallback, fallback / target.name
        if target.is_file():
            return target
    tmp = out_dir / f".{target.name}.{platform.node()}.{os.getpid()}.tmp"
    cmd = [cc, *_FLAGS, str(src), "-o", str(tmp), "-lm"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"compiling {src.name} failed: {e}") from None
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:200])
        raise NativeUnavailable(f"compiling {src.name} with {cc} failed: {first}")
    os.replace(tmp, target)  # atomic: a concurrent process sees the old state or the whole file
    return target


def load(name: str) -> ctypes.CDLL:
    """The compiled kernel ``kernels/<name>.c`` (built on first use, then cached).

    Raises:
        NativeUnavailable: disabled by ``PCCFAST_NATIVE=0``, no compiler, or a build error.
    """
    if os.environ.get("PCCFAST_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise NativeUnavailable("native kernels are disabled by PCCFAST_NATIVE=0")
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            raise NativeUnavailable(_failed[name])
        try:
            lib = ctypes.CDLL(str(_build(name)))
        except NativeUnavailable as e:
            _failed[name] = str(e)
            raise
        except OSError as e:
            _failed[name] = f"loading the compiled {name} kernel failed: {e}"
            raise NativeUnavailable(_failed[name]) from None
        _loaded[name] = lib
        return lib


def available(name: str, warn: bool = True) -> bool:
    """Whether ``load(name)`` works; on a failure, warn once per reason (no C compiler is one
    warning for all the kernels, not one per kernel): the torch path is used."""
    try:
        load(name)
        return True
    except NativeUnavailable as e:
        reason = str(e)
        if warn and reason not in _warned and "PCCFAST_NATIVE=0" not in reason:
            _warned.add(reason)
            warnings.warn(f"pccfast: {reason}; using the slower torch path on the CPU", RuntimeWarning, stacklevel=3)
        return False


def typed(name: str, signatures: dict) -> ctypes.CDLL:
    """``load(name)`` with ctypes argument and result types set once per library.

    signatures: {function name: (argtypes list, restype)}
    """
    lib = load(name)
    if not getattr(lib, "_pcc_typed", False):
        for fn, (args, res) in signatures.items():
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = res
        lib._pcc_typed = True
    return lib


def num_threads() -> int:
    """Threads a kernel may use: torch's intra-op setting, so one knob controls both."""
    return max(1, torch.get_num_threads())


def ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    """Raw data pointer of a contiguous CPU tensor (NULL for None)."""
    if t is None:
        return ctypes.c_void_p(None)
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"native kernels take contiguous CPU tensors but got device {t.device}, "
                         f"contiguous={t.is_contiguous()}")
    return ctypes.c_void_p(t.data_ptr())


def kernel_names() -> list[str]:
    """Names of every kernel source shipped (``kernels/*.c``)."""
    return sorted(p.stem for p in kernel_source("kmeans").parent.glob("*.c"))


def build_kernels(names: Optional[list[str]] = None) -> list[tuple[str, Optional[Path], Optional[str]]]:
    """Build (or find in the cache) and load kernels, e.g. once per machine before a large run.

    names: kernels to build (default: every one of ``kernel_names()``) -> one
    (name, path of the built library or None, why it is unavailable or None) per kernel
    """
    out = []
    for n in names or kernel_names():
        try:
            load(n)
            out.append((n, _build(n), None))
        except NativeUnavailable as e:
            out.append((n, None, str(e)))
    return out
