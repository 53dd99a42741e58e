"""The backend table (``pccfast.backends.OPERATIONS``), ``resolve``, and the bindings' edges.

A "meta" tensor stands in for a tensor off the CPU (``resolve`` only reads its device), so the
"native on a GPU tensor" path is checked without a GPU.
"""
import importlib.util

import pytest
import torch

from pccfast.backends import BACKENDS, OPERATIONS, NativeUnavailable, kernels, native, rapids, resolve
from pccfast.core.config import PCCConfig

CPU = torch.zeros(1, 4, 4)
OFF_CPU = torch.zeros(1, 4, 4, device="meta")
CONFIG_FIELDS = {"kmeans": "kmeans_backend", "components": "components_backend", "cleanup": "cleanup_backend"}


def _available(op):
    return native.available(OPERATIONS[op].kernel, warn=False)


def test_table():
    assert BACKENDS == {
        "kmeans": ("auto", "torch", "native", "cuml"),
        "components": ("auto", "torch", "native", "cupy"),
        "cleanup": ("auto", "torch", "native"),
        "features": ("auto", "torch", "native"),
    }
    assert {op: spec.kernel for op, spec in OPERATIONS.items()} == {
        "kmeans": "kmeans", "components": "components", "cleanup": "morphology", "features": "features"}
    shipped = set(native.kernel_names())
    for op, spec in OPERATIONS.items():
        assert spec.kernel in shipped and spec.kernel in kernels.SIGNATURES, op
    assert set(kernels.SIGNATURES) == shipped  # every shipped kernel has its bindings


@pytest.mark.parametrize("op", sorted(CONFIG_FIELDS))
def test_config_accepts_what_the_table_lists(op):
    """PCCConfig validates its backend fields against the same names as the table."""
    field = CONFIG_FIELDS[op]
    for name in BACKENDS[op]:
        assert getattr(PCCConfig(**{field: name}), field) == name
    with pytest.raises(ValueError, match=f"`{field}` has to be one of {', '.join(map(repr, BACKENDS[op]))}"):
        PCCConfig(**{field: "nope"})


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_resolve_values(op):
    assert resolve(op, "torch", CPU) == "torch"
    assert resolve(op, "torch", OFF_CPU) == "torch"
    assert resolve(op, "auto", OFF_CPU) == "torch"  # never a kernel off the CPU
    assert resolve(op, "auto", CPU) == ("native" if _available(op) else "torch")
    assert resolve(op, "auto", CPU, fits=False) == "torch"  # an input the kernel does not take
    for extra in BACKENDS[op][3:]:  # optional backends are themselves (their modules check on use)
        assert resolve(op, extra, OFF_CPU) == extra
    if _available(op):
        assert resolve(op, "native", CPU) == "native"
        assert resolve(op, "native", CPU, fits=False) == "native"  # refusing a misfit is the caller's


@pytest.mark.parametrize("op, option", [("kmeans", "backend"), ("components", "backend"),
                                        ("cleanup", "cleanup_backend"), ("features", "backend")])
def test_resolve_exceptions(op, option):
    names = ", ".join(map(repr, BACKENDS[op]))
    with pytest.raises(ValueError, match=f"^`{option}` has to be one of {names} but is 'fast'$"):
        resolve(op, "fast", CPU)
    with pytest.raises(ValueError, match=f"^{op} backend 'native' runs on the CPU but the input is on meta; "
                                         f"use {option}='auto' or 'torch'$"):
        resolve(op, "native", OFF_CPU)


def test_resolve_unknown_operation():
    with pytest.raises(ValueError, match="^`op` has to be one of 'kmeans', 'components', 'cleanup', 'features' "
                                         "but is 'pca'$"):
        resolve("pca", "auto", CPU)


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_native_disabled(op, monkeypatch):
    """PCCFAST_NATIVE=0: "auto" is torch without a warning, "native" raises naming the switch."""
    monkeypatch.setenv("PCCFAST_NATIVE", "0")
    with _no_warning():
        assert resolve(op, "auto", CPU) == "torch"
    with pytest.raises(NativeUnavailable, match="native kernels are disabled by PCCFAST_NATIVE=0"):
        resolve(op, "native", CPU)


class _no_warning:
    """Context manager that fails on any warning raised inside it."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


def test_kernel_that_does_not_build(monkeypatch):
    """A kernel that cannot be built: "auto" warns once and runs torch; "native" raises the reason."""
    def broken(name):
        raise NativeUnavailable("no C compiler found (set CC, or install gcc; the torch backends work without one)")

    monkeypatch.delenv("PCCFAST_NATIVE", raising=False)
    monkeypatch.setattr(native, "load", broken)
    monkeypatch.setattr(native, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no C compiler found.*using the slower torch path on the CPU"):
        assert resolve("components", "auto", CPU) == "torch"
    with _no_warning():  # once per reason: no other kernel warns about the same missing compiler
        assert resolve("components", "auto", CPU) == "torch"
        assert resolve("cleanup", "auto", CPU) == "torch"
        assert resolve("kmeans", "auto", CPU) == "torch"
    with pytest.raises(NativeUnavailable, match="^no C compiler found"):
        resolve("components", "native", CPU)


def test_kernel_points_layout():
    narrow = torch.rand(2, 7, kernels.NARROW_D)  # (B, N, D)
    pts = kernels.kernel_points(narrow)
    assert pts.shape == (2, kernels.NARROW_D, 7) and pts.is_contiguous() and torch.equal(pts, narrow.transpose(1, 2))
    given = narrow.transpose(1, 2).contiguous()
    assert kernels.kernel_points(narrow, given) is given
    wide = torch.rand(2, 7, kernels.NARROW_D + 1)
    assert kernels.kernel_points(wide) is wide


def test_library_unknown_name():
    with pytest.raises(ValueError, match="^`name` has to be one of 'kmeans', 'features', 'components', 'morphology' "
                                         "but is 'pca'$"):
        kernels.library("pca")


@pytest.mark.skipif(not native.available("morphology", warn=False), reason="the C clean-up kernel does not build here")
def test_cleanup_binding_values():
    """The binding's own contract: uint8 out (values wrap as torch's cast), labels outside
    [0, 255] take the sorted-values path, the iteration counts arrive in order."""
    lab = torch.zeros(1, 9, 9, dtype=torch.long)
    lab[0, 2:7, 2:7] = 300  # a 5x5 square
    out = kernels.cleanup(lab, 255, 0, 0, 0, 0)  # no morphology: the labels themselves
    assert out.dtype == torch.uint8 and torch.equal(out, lab.to(torch.uint8))
    out = kernels.cleanup(lab, 255, 0, 0, 1, 0)  # erode once: the 3x3 core
    want = torch.zeros(1, 9, 9, dtype=torch.uint8)
    want[0, 3:6, 3:6] = 300 % 256
    assert torch.equal(out, want)
    out = kernels.cleanup(lab, 255, 0, 0, 1, 1)  # and a band one step around it: the uncertain label
    want[0, 2:7, 2:7] = torch.where(want[0, 2:7, 2:7] > 0, want[0, 2:7, 2:7], torch.tensor(255, dtype=torch.uint8))
    assert torch.equal(out, want)
    assert kernels.cleanup(torch.zeros(0, 3, 3, dtype=torch.long), 255, 1, 5, 4, 2).shape == (0, 3, 3)


@pytest.mark.skipif(not native.available("components", warn=False), reason="the C components kernel does not build")
def test_components_binding_value():
    lab = torch.tensor([[[1, 1, 0], [0, 1, 0], [2, -1, 0]]])
    assert torch.equal(kernels.components(lab, 4), torch.tensor([[[1, 1, 2], [3, 1, 2], [4, 0, 2]]]))


@pytest.mark.skipif(importlib.util.find_spec("cuml") is not None, reason="cuML is installed")
def test_cuml_missing_message():
    with pytest.raises(ImportError, match=r"^kmeans backend 'cuml' needs RAPIDS cuML, which is not installed: "
                                          r"pip install cuml-cu12"):
        rapids.kmeans_cuml(torch.zeros(1, 4, 2), 2, 300, 1e-4, 0, 1)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_cupy_missing_message():
    with pytest.raises(ImportError, match=r"^components backend 'cupy' needs CuPy, which is not installed: "
                                          r"pip install cupy-cuda12x"):
        rapids.components_cupy(torch.zeros(1, 3, 3, dtype=torch.long), 8)


def _fake_module(name, **attrs):
    import importlib.machinery
    import types

    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


@pytest.fixture
def fake_rapids(monkeypatch):
    """CuPy and cuML stand-ins over NumPy, scipy and scikit-learn (same calls, host arrays), to
    check the RAPIDS backends' plumbing and numbering where the libraries are absent."""
    import sys

    import numpy as np

    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    sk_cluster = pytest.importorskip("sklearn.cluster")
    cupy = _fake_module("cupy", asarray=np.asarray, zeros=np.zeros, where=np.where, unique=np.unique, ones=np.ones,
                        int64=np.int64, from_dlpack=np.from_dlpack)
    cupyx = _fake_module("cupyx")
    cupyx_scipy = _fake_module("cupyx.scipy", ndimage=scipy_ndimage)
    cupyx.scipy = cupyx_scipy

    class KMeans:
        def __init__(self, n_clusters, max_iter, tol, random_state, n_init, init, output_type):
            assert output_type == "cupy"  # results stay device arrays (DLPack), not NumPy
            self.model = sk_cluster.KMeans(n_clusters=n_clusters, max_iter=max_iter, tol=tol,
                                           random_state=random_state, n_init=n_init, init=init)

        def fit(self, data):
            self.model.fit(data)
            self.labels_, self.cluster_centers_ = self.model.labels_, self.model.cluster_centers_.astype(np.float32)

    cuml = _fake_module("cuml")
    cuml_cluster = _fake_module("cuml.cluster", KMeans=KMeans)
    cuml.cluster = cuml_cluster
    for name, mod in {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy, "cuml": cuml,
                      "cuml.cluster": cuml_cluster}.items():
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_cupy_components_number_as_the_torch_path(fake_rapids, connectivity):
    """CuPy labels each value apart and numbers pieces its own way; renumbered, the ids are the
    torch path's (1..N in raster order of the first pixel; masked pixels 0)."""
    from pccfast.core.components import connected_components

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (3, 12, 17), generator=g)  # (B, H, W)
    labels[1, 2:5, 3:9] = -1  # masked
    got = rapids.components_cupy(labels, connectivity)
    want = connected_components(labels, connectivity, backend="torch")
    assert got.dtype == torch.long and torch.equal(got, want)


def test_raster_order_value():
    x = torch.tensor([[[5, 5, 2], [0, 2, 6]], [[3, 1, 1], [3, 0, 4]]])
    assert rapids.raster_order(x).tolist() == [[[1, 1, 2], [0, 2, 3]], [[1, 2, 2], [1, 0, 3]]]


def test_cuml_kmeans_plumbing(fake_rapids):
    """Labels and centres come back as tensors on the input's device, one fit per batch item."""
    from sklearn.metrics import adjusted_rand_score

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 6.0], [0.0, 6.0]])
    x = torch.stack([centres[torch.randint(0, 3, (60,), generator=g)] + 0.1 * torch.randn(60, 2, generator=g)
                     for _ in range(2)])  # (2, 60, 2)
    labels, got = rapids.kmeans_cuml(x, 3, 100, 1e-4, 0, 1)
    assert labels.shape == (2, 60) and labels.dtype == torch.long and got.shape == (2, 3, 2)
    assert got.dtype == torch.float32
    truth = torch.cdist(x, centres).argmin(-1)  # (2, 60)
    for b in range(2):
        assert adjusted_rand_score(truth[b].numpy(), labels[b].numpy()) == 1.0
