"""Capture files with Dataset Diffusion's optional tensors (dd_affinity, dd_class_attention)."""
import pytest
import torch

from pccfast.data.captures import CaptureError, read_capture, read_capture_info, write_capture
from pccfast.testing.fixtures import good_metadata, write_raw_capture


def _tensors(k=21, grid=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(features=torch.rand(6, grid, grid, generator=g), class_attention=torch.rand(k, grid, grid, generator=g),
                image=torch.randint(0, 256, (3, 8 * grid, 8 * grid), generator=g, dtype=torch.uint8))


def _fields(**kw):
    return dict(label_set="voc", prompt="a cat", classes=["cat"], seed=1, model="tiny", steps=2, halves=2, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip(tmp_path, dtype):
    t = _tensors()
    aff = torch.rand(16, 16).softmax(-1).to(dtype)  # half grid 4x4
    cls = torch.rand(21, 2, 2)  # quarter grid 2x2
    path = str(tmp_path / "a.safetensors")
    write_capture(path, t["features"], t["class_attention"], image=t["image"], dd_affinity=aff,
                  dd_class_attention=cls, **_fields())
    cap = read_capture(path, "voc")
    assert cap.dd_affinity.dtype == torch.float32 and torch.equal(cap.dd_affinity, aff.float())
    assert torch.equal(cap.dd_class_attention, cls)
    assert cap.metadata["dd_grid"] == "4,4"
    assert read_capture_info(path).has_dd
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert f.get_tensor("dd_affinity").dtype == dtype  # saved as given (float16 halves the file)


def test_files_without_dd_tensors_read_as_before(tmp_path):
    t = _tensors()
    path = str(tmp_path / "a.safetensors")
    write_capture(path, t["features"], t["class_attention"], image=t["image"], **_fields())
    cap = read_capture(path)
    assert cap.dd_affinity is None and cap.dd_class_attention is None
    assert not read_capture_info(path).has_dd
    old = write_raw_capture(str(tmp_path / "v2.safetensors"), {k: t[k] for k in ("features", "class_attention")},
                            good_metadata())  # a format_version 2 file
    assert read_capture(old).dd_affinity is None


def test_exceptions(tmp_path):
    t = _tensors()
    path = str(tmp_path / "a.safetensors")
    aff, cls = torch.rand(16, 16), torch.rand(21, 2, 2)
    with pytest.raises(CaptureError, match=r"a.safetensors: `dd_affinity` and `dd_class_attention` have to be given together"):
        write_capture(path, t["features"], t["class_attention"], dd_affinity=aff, **_fields())
    with pytest.raises(CaptureError, match=r"'dd_affinity' has to be \(N2, N2\) with N2 = 4\*4 = 16 .* but has shape \(15, 15\)"):
        write_capture(path, t["features"], t["class_attention"], dd_affinity=aff[:15, :15], dd_class_attention=cls,
                      **_fields())
    with pytest.raises(CaptureError, match=r"'dd_class_attention' has to be \(K, h4, w4\) with K = 21 but has shape \(20, 2, 2\)"):
        write_capture(path, t["features"], t["class_attention"], dd_affinity=aff, dd_class_attention=cls[:20],
                      **_fields())
    bad = aff.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CaptureError, match=r"'dd_affinity' has to be finite but holds 1 NaN or inf values"):
        write_capture(path, t["features"], t["class_attention"], dd_affinity=bad, dd_class_attention=cls, **_fields())
    raw = {"features": t["features"], "class_attention": t["class_attention"], "dd_affinity": aff}
    lone = write_raw_capture(str(tmp_path / "lone.safetensors"), raw, good_metadata())
    with pytest.raises(CaptureError, match=r"lone.safetensors: tensor 'dd_affinity' without 'dd_class_attention'"):
        read_capture(lone)
