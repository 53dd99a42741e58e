"""Capture files: the attention tensors of one generated image, saved for later relabelling.

One safetensors file per image, ``<id>.safetensors``:

- tensors ``features`` (D, h, w) float32 (head-wise PCA features, not normalised) and
  ``class_attention`` (K, h, w) float32 (one map per class of the label set; index 0 =
  background from the start token; all-zero maps for classes not in the image);
- since format_version 2, optionally ``image`` (3, H, W) uint8 RGB, channels first as the
  labeller takes it: the decoded image generate refined from (H, W multiples of h, w), so
  relabelling needs no image file and reproduces generate's masks exactly;
- since format_version 3, string metadata ``grid`` ("h,w": the labelling grid, which need not
  be square and equals the tensors' (h, w)) and ``halves`` ("2": the features hold both
  classifier-free-guidance halves' heads, unconditional first; "1": a guidance-free run, one
  half; "" if unknown); versions 1 and 2 (square grids, both halves) read as grid = the
  tensors' and halves = 2;
- optionally (format_version 3), Dataset Diffusion's inputs (``generate --labeler dd|fused``
  or ``--save-all-labelers``): ``dd_affinity`` (N2, N2) float16 or float32, the averaged
  self-attention probabilities at the half grid (N2 = h2 * w2, metadata ``dd_grid`` "h2,w2"),
  and ``dd_class_attention`` (K, h4, w4) float32, its class maps at the quarter grid; both or
  neither; files without them are read as before;
- string metadata ``format_version`` ("3"; "1" and "2" files are still read), ``label_set`` (the label set's name),
  ``label_classes`` (JSON list of the set's class names), ``prompt``, ``classes`` (JSON list
  of the image's class names, may repeat), ``seed`` and ``steps`` (decimal ints, "" if
  unknown) and ``model``.

:func:`read_capture` validates everything it reads and raises :class:`CaptureError`, a
one-line ``ValueError`` that starts with the file's path and says what was expected;
:func:`read_capture_info` reads only a file's header (metadata, whether it holds an image).
"""
from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as _st_save

from pccfast.data.fileio import atomic_write_bytes
from pccfast.data.labelsets import get_label_set
from pccfast.core.labelset import LabelSet

__all__ = ["FORMAT_VERSION", "READ_VERSIONS", "Capture", "CaptureInfo", "CaptureError", "write_capture", "encode_capture",
           "read_capture", "read_capture_info"]

FORMAT_VERSION = "3"  # what write_capture writes
READ_VERSIONS = ("1", "2", "3")  # what read_capture reads; version 1 has no ``image``, 3 adds ``grid`` and ``halves``
_TENSORS = ("features", "class_attention")
_IMAGE = "image"
_META = ("format_version", "label_set", "label_classes", "prompt", "classes", "seed", "model", "steps")
_META_V3 = ("grid", "halves")  # required from format_version 3 on
_DD = ("dd_affinity", "dd_class_attention")  # optional (format_version 3): Dataset Diffusion's inputs
_DD_GRID = "dd_grid"  # metadata "h2,w2" of dd_affinity's grid, written with the DD tensors


class CaptureError(ValueError):
    """A capture file that cannot be used; the message is one line starting with the path."""


@dataclass
class Capture:
    """One capture file's content, validated.

    ``metadata`` holds every string of the file, with ``label_classes`` and ``classes``
    parsed to lists of str and ``seed`` and ``steps`` to int (None if unknown).
    """

    path: str
    features: torch.Tensor  # (D, h, w) float32, CPU
    class_attention: torch.Tensor  # (K, h, w) float32, CPU
    metadata: dict = field(default_factory=dict)
    image: "torch.Tensor | None" = None  # (3, H, W) uint8, CPU; None if the file holds none (version 1)
    dd_affinity: "torch.Tensor | None" = None  # (N2, N2) float32, CPU; None if the file holds no DD tensors
    dd_class_attention: "torch.Tensor | None" = None  # (K, h4, w4) float32, CPU; likewise

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the capture grid."""
        return tuple(self.features.shape[-2:])


def _all_finite(t: torch.Tensor) -> bool:
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().numpy()).all())  # NumPy: far faster than torch here on the CPU
    return bool(torch.isfinite(t).all())


def _check_tensor(where: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise CaptureError(f"{where}: '{name}' has to be a torch.Tensor but is {type(t).__name__}")
    if t.ndim != 3:
        what = "(D, h, w)" if name == "features" else "(K, h, w)"
        raise CaptureError(f"{where}: '{name}' has to be {what} (3 dims) but has shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise CaptureError(f"{where}: '{name}' has an empty dimension: shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise CaptureError(f"{where}: '{name}' has to be a floating-point tensor but has dtype {t.dtype}")
    if not _all_finite(t):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise CaptureError(f"{where}: '{name}' has to be finite but holds {n_nan} NaN and {n_inf} inf values")


def _check_pair(where: str, features: torch.Tensor, class_attention: torch.Tensor, label_set: LabelSet | None) -> None:
    _check_tensor(where, "features", features)
    _check_tensor(where, "class_attention", class_attention)
    if features.shape[-2:] != class_attention.shape[-2:]:
        fh, fw = features.shape[-2:]
        ch, cw = class_attention.shape[-2:]
        raise CaptureError(
            f"{where}: 'features' and 'class_attention' have to share one grid but are {fh}x{fw} and {ch}x{cw}"
        )
    if label_set is not None and class_attention.shape[0] != label_set.num_classes:
        raise CaptureError(
            f"{where}: 'class_attention' has {class_attention.shape[0]} classes "
            f"but label set {label_set.name!r} has {label_set.num_classes}"
        )


def _check_image(where: str, image, grid: tuple[int, int]) -> None:
    if not isinstance(image, torch.Tensor):
        raise CaptureError(f"{where}: 'image' has to be a torch.Tensor but is {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise CaptureError(f"{where}: 'image' has to be (3, H, W) (RGB, channels first) but has shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        raise CaptureError(f"{where}: 'image' has to be uint8 but has dtype {image.dtype}")
    (height, width), (h, w) = image.shape[-2:], grid
    if height == 0 or width == 0 or height % h or width % w:
        raise CaptureError(
            f"{where}: 'image' is {width}x{height} (width x height) but has to be a multiple of the capture grid {w}x{h}"
        )


def _parse_grid(where: str, text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise CaptureError(f"{where}: metadata {_DD_GRID!r} has to be 'h,w' (two positive ints) but is {text[:40]!r}")
    return h, w


def _check_dd(where: str, affinity, class_maps, dd_grid: tuple[int, int], num_classes: int) -> None:
    """Dataset Diffusion's tensors: (N2, N2) float16/float32 with N2 = h2 * w2, (K, h4, w4) float, finite."""
    for name, t in (("dd_affinity", affinity), ("dd_class_attention", class_maps)):
        if not isinstance(t, torch.Tensor):
            raise CaptureError(f"{where}: '{name}' has to be a torch.Tensor but is {type(t).__name__}")
        if not t.is_floating_point():
            raise CaptureError(f"{where}: '{name}' has to be a floating-point tensor but has dtype {t.dtype}")
        if t.numel() == 0:
            raise CaptureError(f"{where}: '{name}' has an empty dimension: shape {tuple(t.shape)}")
    n2 = dd_grid[0] * dd_grid[1]
    if tuple(affinity.shape) != (n2, n2):
        raise CaptureError(f"{where}: 'dd_affinity' has to be (N2, N2) with N2 = {dd_grid[0]}*{dd_grid[1]} = {n2} "
                           f"(metadata {_DD_GRID!r}) but has shape {tuple(affinity.shape)}")
    if class_maps.ndim != 3 or class_maps.shape[0] != num_classes:
        raise CaptureError(f"{where}: 'dd_class_attention' has to be (K, h4, w4) with K = {num_classes} but has shape "
                           f"{tuple(class_maps.shape)}")
    for name, t in (("dd_affinity", affinity), ("dd_class_attention", class_maps)):
        if not _all_finite(t):
            raise CaptureError(f"{where}: '{name}' has to be finite but holds {int((~torch.isfinite(t)).sum())} "
                               f"NaN or inf values")


def _resolve_label_set(where: str, label_set) -> LabelSet:
    try:
        return get_label_set(label_set)
    except (TypeError, ValueError, OSError) as e:
        raise CaptureError(f"{where}: {e}") from None


def write_capture(path: str, features: torch.Tensor, class_attention: torch.Tensor, **fields) -> None:
    """Write one capture file atomically (a crash leaves the old file or none, never half);
    the arguments are :func:`encode_capture`'s."""
    atomic_write_bytes(path, encode_capture(path, features, class_attention, **fields))


def encode_capture(
    path: str,
    features: torch.Tensor,
    class_attention: torch.Tensor,
    *,
    label_set: "str | LabelSet",
    prompt: str,
    classes: "list[str] | tuple[str, ...]",
    seed: "int | None",
    model: str,
    steps: "int | None",
    image: "torch.Tensor | None" = None,
    halves: "int | None" = None,
    dd_affinity: "torch.Tensor | None" = None,
    dd_class_attention: "torch.Tensor | None" = None,
    dd_grid: "tuple[int, int] | None" = None,
) -> bytes:
    """The bytes of one capture file (a webdataset shard stores them as ``<id>.safetensors``).

    Args:
        path: target file, normally ``<id>.safetensors`` (named in the errors).
        features: (D, h, w) float, any device (saved as CPU float32).
        class_attention: (K, h, w) float, K = ``label_set.num_classes``.
        label_set: name, file or :class:`LabelSet` the class maps follow.
        prompt: the generation prompt.
        classes: the image's class names (may repeat).
        seed, steps: generation seed and number of denoising steps (None if unknown).
        model: the model id or path.
        image: (3, H, W) uint8 RGB, any device: the decoded image the masks were refined from
            (H, W multiples of h, w); None writes no image (relabel then needs the image file).
        halves: 2 if the features hold both guidance halves' heads, 1 for a guidance-free run,
            None if unknown.
        dd_affinity: (N2, N2) Dataset Diffusion affinity, saved as float16 if it is float16,
            else float32; with ``dd_class_attention`` (K, h4, w4) (saved float32) and
            ``dd_grid`` (h2, w2), N2 = h2 * w2 (default: twice the class grid). All or none.
    Raises:
        CaptureError: the tensors break the format (message names ``path``).
    """
    ls = _resolve_label_set(path, label_set)
    _check_pair(path, features, class_attention, ls)
    if image is not None:
        _check_image(path, image, tuple(features.shape[-2:]))
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise CaptureError(f"{path}: `classes` has to be a list of class names but is {classes!r}")
    ints = {}
    for name, v in (("seed", seed), ("steps", steps), ("halves", halves)):
        try:  # ints of any kind (Python, NumPy, 0-dim tensor), not bools or floats
            ints[name] = None if v is None else operator.index(v)
        except TypeError:
            ints[name] = v
        if isinstance(v, bool) or not (ints[name] is None or isinstance(ints[name], int)):
            raise CaptureError(f"{path}: `{name}` has to be an int or None but is {v!r}")
    if ints["halves"] not in (None, 1, 2):
        raise CaptureError(f"{path}: `halves` has to be 1, 2 or None but is {halves!r}")
    if (dd_affinity is None) != (dd_class_attention is None):
        raise CaptureError(f"{path}: `dd_affinity` and `dd_class_attention` have to be given together")
    if dd_affinity is not None:
        if dd_grid is None and isinstance(dd_class_attention, torch.Tensor) and dd_class_attention.ndim == 3:
            dd_grid = (2 * dd_class_attention.shape[1], 2 * dd_class_attention.shape[2])
        dd_grid = _parse_grid(path, ",".join(str(v) for v in (dd_grid or ())))
        _check_dd(path, dd_affinity, dd_class_attention, dd_grid, ls.num_classes)
    tensors = {
        "features": features.detach().to("cpu", torch.float32).contiguous(),
        "class_attention": class_attention.detach().to("cpu", torch.float32).contiguous(),
    }
    if image is not None:
        tensors[_IMAGE] = image.detach().to("cpu").contiguous()
    if dd_affinity is not None:
        keep = torch.float16 if dd_affinity.dtype == torch.float16 else torch.float32
        tensors["dd_affinity"] = dd_affinity.detach().to("cpu", keep).contiguous()
        tensors["dd_class_attention"] = dd_class_attention.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "format_version": FORMAT_VERSION,
        "label_set": ls.name,
        "label_classes": json.dumps(list(ls.classes)),
        "prompt": str(prompt),
        "classes": json.dumps(list(classes)),
        "seed": "" if ints["seed"] is None else str(ints["seed"]),
        "model": str(model),
        "steps": "" if ints["steps"] is None else str(ints["steps"]),
        "grid": "{},{}".format(*features.shape[-2:]),
        "halves": "" if ints["halves"] is None else str(ints["halves"]),
    }
    if dd_affinity is not None:
        metadata[_DD_GRID] = "{},{}".format(*dd_grid)
    return _st_save(tensors, metadata=metadata)


def _read_header(where: str) -> tuple[dict, dict]:
    """``(__metadata__, tensor entries)`` of a safetensors file (8-byte little-endian header
    length, then a JSON header), read without touching the tensor data."""
    try:
        with open(where, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CaptureError(f"{where}: not a safetensors file (only {len(prefix)} bytes)")
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise CaptureError(
                    f"{where}: not a safetensors file or truncated (header of {n} bytes but the file has {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CaptureError(f"{where}: cannot read the capture: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CaptureError(f"{where}: not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise CaptureError(f"{where}: not a safetensors file (the header is not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CaptureError(f"{where}: '__metadata__' has to be a string map but is {type(meta).__name__}")
    return meta, {k: v for k, v in header.items() if k != "__metadata__"}


def _json_str_list(where: str, key: str, text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise CaptureError(f"{where}: metadata {key!r} has to be a JSON list of strings but is {text[:80]!r}")
    return value


def _opt_int(where: str, key: str, text: str) -> "int | None":
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise CaptureError(f"{where}: metadata {key!r} has to be an integer or empty but is {text[:40]!r}") from None


def _checked_metadata(path: str) -> tuple[dict, dict]:
    """The header's metadata (format version and keys checked) and tensor entries."""
    meta, entries = _read_header(path)
    version = meta.get("format_version")
    if version is None:
        raise CaptureError(f"{path}: metadata 'format_version' is missing (expected {FORMAT_VERSION!r})")
    if version not in READ_VERSIONS:
        raise CaptureError(f"{path}: unknown format_version {version!r} "
                           f"(this pccfast reads {', '.join(repr(v) for v in READ_VERSIONS[:-1])} and {READ_VERSIONS[-1]!r})")
    keys = _META + (_META_V3 if version not in ("1", "2") else ())
    missing = [k for k in keys if k not in meta]
    if missing:
        raise CaptureError(f"{path}: metadata {', '.join(repr(k) for k in missing)} missing (a capture holds {', '.join(keys)})")
    return meta, entries


def _grid_and_halves(path: str, meta: dict, grid: tuple) -> tuple[tuple, "int | None"]:
    """The recorded (h, w) grid (checked against the tensors' ``grid``) and halves; versions 1
    and 2 record neither: their grid is the tensors' and both halves were used."""
    if meta["format_version"] in ("1", "2"):
        return tuple(grid), 2
    text = meta["grid"]
    try:
        recorded = tuple(int(v) for v in text.split(","))
    except ValueError:
        recorded = ()
    if len(recorded) != 2:
        raise CaptureError(f"{path}: metadata 'grid' has to be 'h,w' but is {text[:40]!r}")
    if recorded != tuple(grid):
        raise CaptureError(f"{path}: metadata 'grid' says {recorded[0]}x{recorded[1]} but the tensors are "
                           f"{grid[0]}x{grid[1]} (h x w)")
    halves = _opt_int(path, "halves", meta["halves"])
    if halves not in (None, 1, 2):
        raise CaptureError(f"{path}: metadata 'halves' has to be 1, 2 or empty but is {meta['halves']!r}")
    return recorded, halves


@dataclass
class CaptureInfo:
    """What a capture's header says, read without its tensors (:func:`read_capture_info`)."""

    path: str
    label_set: str  # the label set's name
    label_classes: list  # its class names
    has_image: bool  # the file holds the decoded ``image`` (format_version 2)
    metadata: dict = field(default_factory=dict)  # every metadata string, as in the file
    grid: "tuple | None" = None  # (h, w) of the features, from the header
    has_dd: bool = False  # the file holds Dataset Diffusion's tensors (dd_affinity, dd_class_attention)


def read_capture_info(path: str) -> CaptureInfo:
    """Read only the header of a capture (a few kB, no tensor data): its label set and whether
    it holds an image. The tensors are not checked; :func:`read_capture` does that.

    Raises:
        CaptureError: one line starting with ``path`` (unreadable, not a capture, bad metadata).
    """
    meta, entries = _checked_metadata(path)
    classes = _json_str_list(path, "label_classes", meta["label_classes"])
    shape = entries.get("features", {}).get("shape") if isinstance(entries.get("features"), dict) else None
    grid = tuple(shape[-2:]) if isinstance(shape, list) and len(shape) == 3 else None
    return CaptureInfo(path, meta["label_set"], classes, _IMAGE in entries, dict(meta), grid,
                       all(k in entries for k in _DD))


def read_capture(path: str, label_set: "str | LabelSet | None" = None) -> Capture:
    """Read and validate one capture file.

    Args:
        path: a ``.safetensors`` capture.
        label_set: if given, the capture has to follow it (same class count and names).
    Returns:
        :class:`Capture` with CPU float32 ``features`` (D, h, w) and ``class_attention`` (K, h, w),
        and ``image`` (3, H, W) uint8 if the file holds one (else None).
    Raises:
        CaptureError: one line starting with ``path`` that says what was expected.
    """
    ls = None if label_set is None else _resolve_label_set(path, label_set)
    meta, _ = _checked_metadata(path)

    try:
        with safe_open(path, framework="pt") as f:  # memory-mapped: no copy of the whole file
            names = sorted(f.keys())
            tensors = {k: f.get_tensor(k) for k in names if k in _TENSORS or k == _IMAGE or k in _DD}
    except Exception as e:  # safetensors raises its own error types for broken files
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CaptureError(f"{path}: corrupt safetensors file: {first}") from None
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise CaptureError(
            f"{path}: tensor {', '.join(repr(k) for k in missing)} missing "
            f"(a capture holds 'features' and 'class_attention'; found {names or 'none'})"
        )
    features, class_attention = tensors["features"], tensors["class_attention"]
    _check_pair(path, features, class_attention, ls)
    image = tensors.get(_IMAGE)
    if image is not None:
        _check_image(path, image, tuple(features.shape[-2:]))
    dd = [tensors.get(k) for k in _DD]
    if (dd[0] is None) != (dd[1] is None):
        there, absent = _DD if dd[1] is None else _DD[::-1]
        raise CaptureError(f"{path}: tensor {there!r} without {absent!r} (Dataset Diffusion's tensors come together)")
    if dd[0] is not None:
        if _DD_GRID in meta:
            dd_grid = _parse_grid(path, meta[_DD_GRID])
        else:
            dd_grid = (2 * dd[1].shape[1], 2 * dd[1].shape[2]) if dd[1].ndim == 3 else (0, 0)
        _check_dd(path, dd[0], dd[1], dd_grid, class_attention.shape[0])

    metadata = dict(meta)
    label_classes = _json_str_list(path, "label_classes", meta["label_classes"])
    metadata["label_classes"] = label_classes
    metadata["classes"] = _json_str_list(path, "classes", meta["classes"])
    metadata["seed"] = _opt_int(path, "seed", meta["seed"])
    metadata["steps"] = _opt_int(path, "steps", meta["steps"])
    metadata["grid"], metadata["halves"] = _grid_and_halves(path, meta, tuple(features.shape[-2:]))
    k = class_attention.shape[0]
    if len(label_classes) != k:
        raise CaptureError(
            f"{path}: 'class_attention' has {k} classes but metadata 'label_classes' lists {len(label_classes)}"
        )
    if ls is not None and tuple(label_classes) != tuple(ls.classes):
        i = next(i for i, (a, b) in enumerate(zip(label_classes, ls.classes)) if a != b)
        raise CaptureError(
            f"{path}: 'label_classes' disagree with label set {ls.name!r} at index {i}: "
            f"{label_classes[i]!r} in the file, {ls.classes[i]!r} in the set"
        )
    return Capture(
        path=path,
        features=features.to(torch.float32).contiguous(),
        class_attention=class_attention.to(torch.float32).contiguous(),
        metadata=metadata,
        image=image,
        dd_affinity=None if dd[0] is None else dd[0].to(torch.float32).contiguous(),
        dd_class_attention=None if dd[1] is None else dd[1].to(torch.float32).contiguous(),
    )
