"""Synthetic PCC scenes with planted ground truth, for tests and benchmarks.

A scene stands in for one generated image: a few objects (rotated ellipses, later ones
occluding earlier ones) on a background with two parts (think sky and ground). From that
layout it draws everything the labeller reads, shaped as Stable Diffusion's:

- ``layers``: per up-block self-attention layer the per-head attention output
  ``(2 * heads, S * S, head_dim)`` (both classifier-free-guidance halves), where each head
  encodes the layout as low-rank structure: a code per region (some heads merge regions
  with the background), a positional term, and noise;
- ``class_attention``: ``(K, grid, grid)`` non-negative class maps, blurred blobs over the
  objects of each class with noise and some spill onto other objects; an all-zero row for
  every class not in the scene; row 0 (background) over the background;
- ``image``: ``(3, H, W)`` uint8, a distinct colour per object, a two-tone background,
  texture and noise;
- ``gt``: ``(H, W)`` uint8, the planted class of every pixel (no uncertain pixels).

All randomness comes from a local ``torch.Generator`` seeded by ``seed``; the same seed and
arguments give the same scene on every run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pccfast.core.config import PCCConfig

__all__ = [
    "SyntheticScene",
    "make_scene",
    "make_scenes",
    "stack_scenes",
    "layer_spec",
    "scene_features",
    "mask_miou",
    "pixel_agreement",
]


@dataclass
class SyntheticScene:
    """One synthetic scene. Shapes: S per layer, h = w = grid, H = W = image_size."""

    layers: list[torch.Tensor]  # per layer (2 * heads, S * S, head_dim) float32, row-major pixels
    class_attention: torch.Tensor  # (K, grid, grid) float32, >= 0, zero rows for absent classes
    image: torch.Tensor  # (3, H, W) uint8 RGB
    gt: torch.Tensor  # (H, W) uint8 planted class per pixel
    objects: torch.Tensor  # (H, W) long object index per pixel, 0 = background, 1..n
    object_classes: list[int]  # class of object i + 1
    classes: list[int]  # sorted distinct classes present, background (0) excluded
    grid: int  # side of the feature / class-map grid
    seed: int
    layout: dict = field(default_factory=dict, repr=False)  # ellipse parameters (for inspection)


def layer_spec(grid: int = 64, heads: tuple[int, ...] = (20, 10, 5), layers_per_scale: int = 3) -> list[tuple[int, int]]:
    """(side, heads) per layer, SD 2.1-base's up blocks scaled to ``grid``: sides grid/4,
    grid/2, grid with ``heads`` heads each (per CFG half), ``layers_per_scale`` layers each."""
    n = len(heads)
    if grid % (2 ** (n - 1)) != 0:
        raise ValueError(f"`grid` has to be divisible by {2 ** (n - 1)} for {n} scales but is {grid}")
    sides = [grid // 2 ** (n - 1 - i) for i in range(n)]  # smallest side first, as the up blocks
    return [(s, h) for s, h in zip(sides, heads) for _ in range(layers_per_scale)]


def _uniform(g: torch.Generator, lo: float, hi: float, size=()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(size, generator=g)


def _raster(ellipses: list[tuple[float, float, float, float, float]], side: int) -> torch.Tensor:
    """Object index (side, side) long at pixel centres; later ellipses occlude earlier ones."""
    c = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    y, x = torch.meshgrid(c, c, indexing="ij")  # (side, side) each
    out = torch.zeros(side, side, dtype=torch.long)
    for i, (cx, cy, rx, ry, th) in enumerate(ellipses):
        dx, dy = x - cx, y - cy
        u = dx * math.cos(th) + dy * math.sin(th)
        v = -dx * math.sin(th) + dy * math.cos(th)
        out[(u / rx) ** 2 + (v / ry) ** 2 <= 1.0] = i + 1
    return out


def _horizon(side: int, level: float, tilt: float) -> torch.Tensor:
    """(side, side) bool, True below a slightly tilted horizon (the 'ground' background part)."""
    c = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    y, x = torch.meshgrid(c, c, indexing="ij")
    return y > level + tilt * (x - 0.5)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (C, h, w) with reflect padding (separable)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    x = x[None]  # (1, C, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def _layout(g: torch.Generator, n_objects: int, min_area: float, grid: int):
    """Rotated ellipses whose visible parts each cover at least ``min_area`` of the grid."""
    for _ in range(200):
        ell = []
        for _ in range(n_objects):
            cx, cy = _uniform(g, 0.22, 0.78, (2,)).tolist()
            rx, ry = _uniform(g, 0.12, 0.3, (2,)).tolist()
            th = float(_uniform(g, 0.0, math.pi))
            ell.append((cx, cy, rx, ry, th))
        obj = _raster(ell, grid)
        areas = torch.bincount(obj.flatten(), minlength=n_objects + 1)[1:].float() / grid**2
        if bool((areas >= min_area).all()) and float((obj == 0).float().mean()) >= 0.2:
            return ell
    raise RuntimeError("could not place the objects; lower `n_objects` or `min_area`")


def _colours(g: torch.Generator, n: int) -> torch.Tensor:
    """(n, 3) float RGB colours with distinct hues (evenly spaced from a random start)."""
    h0 = float(torch.rand((), generator=g))
    hues = (h0 + torch.arange(n, dtype=torch.float32) / n) % 1.0
    hues = hues[torch.randperm(n, generator=g)]
    sat = _uniform(g, 0.55, 0.9, (n,))
    val = _uniform(g, 0.45, 0.95, (n,))
    # HSV -> RGB
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + hues[:, None] * 6) % 6  # (n, 3)
    rgb = val[:, None] - val[:, None] * sat[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return rgb * 255


def make_scene(
    seed: int,
    *,
    grid: int = 64,
    image_size: int = 512,
    heads: tuple[int, ...] = (20, 10, 5),
    layers_per_scale: int = 3,
    head_dim: int = 64,
    cfg_halves: int = 2,
    num_classes: int = 21,
    n_objects: int | None = None,
    max_objects: int = 3,
    min_area: float = 0.03,
    signal: tuple[float, float] = (0.15, 0.6),
    merge_prob: float = 0.3,
    position: float = 0.5,
    noise: float = 1.0,
    attention_noise: float = 0.08,
    spill: float = 0.35,
    image_noise: float = 10.0,
) -> SyntheticScene:
    """One synthetic scene (see the module docstring).

    Args:
        seed: seed of the scene's local generator.
        grid: side of the feature and class-map grid (64 for SD at 512x512).
        image_size: side of the image and ground truth; a multiple of ``grid``.
        heads, layers_per_scale: heads per CFG half at sides grid/4, grid/2, grid (see
            :func:`layer_spec`); ``cfg_halves`` copies of the heads per layer.
        head_dim: channels per head (64 in SD 2.1).
        num_classes: K, rows of ``class_attention`` (21 = VOC).
        n_objects: number of objects (default: 1..max_objects at random).
        min_area: least visible share of the image per object.
        signal: range of the per-head strength of the region codes (noise has std ``noise``).
        merge_prob: chance that a head does not tell a given region from the background.
        position: strength of the per-head positional term.
        attention_noise: std of the noise on the class maps (relative to a blob height ~1).
        spill: largest share of a class map that spills onto another object.
        image_noise: std of the per-pixel RGB noise.
    """
    if image_size % grid != 0:
        raise ValueError(f"`image_size` has to be a multiple of `grid` but is {image_size} (grid {grid})")
    if num_classes < 2:
        raise ValueError(f"`num_classes` has to be at least 2 but is {num_classes}")
    g = torch.Generator().manual_seed(int(seed))
    if n_objects is None:
        n_objects = int(torch.randint(1, max_objects + 1, (), generator=g))
    ell = _layout(g, n_objects, min_area, grid)
    object_classes = (torch.randperm(num_classes - 1, generator=g)[:n_objects] + 1).tolist()
    if n_objects > 1 and float(torch.rand((), generator=g)) < 0.15:  # sometimes two objects share a class
        object_classes[-1] = object_classes[0]
    level, tilt = float(_uniform(g, 0.35, 0.65)), float(_uniform(g, -0.3, 0.3))

    # --- attention outputs: regions 0 = sky, 1 = ground, 1 + i = object i ---
    n_reg = 2 + n_objects
    layers = []
    for side, h in layer_spec(grid, heads, layers_per_scale):
        nh = cfg_halves * h
        obj = _raster(ell, side)  # (S, S)
        reg = torch.where(obj > 0, obj + 1, _horizon(side, level, tilt).long()).flatten()  # (S*S,)
        rank = 3
        codes = torch.randn(nh, n_reg, rank, generator=g) @ torch.randn(nh, rank, head_dim, generator=g)  # (nh, R, d)
        codes = codes / math.sqrt(rank) * _uniform(g, *signal, (nh, 1, 1))
        merged = torch.rand(nh, n_reg, generator=g) < merge_prob  # region looks like the sky to this head
        merged[:, 0] = False
        codes = torch.where(merged[..., None], codes[:, :1], codes)
        c = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        pos = torch.stack([xx.flatten(), yy.flatten()], 1)  # (S*S, 2)
        pos_w = torch.randn(nh, 2, head_dim, generator=g) * position * _uniform(g, 0.0, 1.0, (nh, 1, 1))
        out = codes[:, reg] + pos @ pos_w + noise * torch.randn(nh, side * side, head_dim, generator=g)  # (nh, S*S, d)
        layers.append(out.float())

    # --- class attention at the grid ---
    obj_g = _raster(ell, grid)  # (grid, grid)
    masks = torch.stack([(obj_g == i + 1).float() for i in range(n_objects)])  # (n, grid, grid)
    sigma = max(0.7, grid / 40)
    blobs = _blur(masks, sigma) * _uniform(g, 0.6, 1.4, (n_objects, 1, 1))  # (n, grid, grid)
    ca = torch.zeros(num_classes, grid, grid)
    for i, c in enumerate(object_classes):
        m = blobs[i]
        if n_objects > 1:  # spill onto another object
            j = (i + 1 + int(torch.randint(0, n_objects - 1, (), generator=g))) % n_objects
            m = m + float(_uniform(g, 0.0, spill)) * blobs[j]
        ca[c] = torch.maximum(ca[c], m)
    bg = _blur((obj_g == 0).float()[None], sigma)[0] * float(_uniform(g, 0.6, 1.4))
    ca[0] = bg
    present = sorted(set([0] + object_classes))
    noise_map = attention_noise * torch.randn(len(present), grid, grid, generator=g).abs()
    ca[present] = (ca[present] + _blur(noise_map, 1.0) * 2).clamp_min(0)

    # --- image and ground truth ---
    H = image_size
    obj_img = _raster(ell, H)  # (H, H)
    ground = _horizon(H, level, tilt)
    cols = _colours(g, n_objects + 2)  # sky, ground, objects
    reg_img = torch.where(obj_img > 0, obj_img + 1, ground.long())  # (H, H)
    img = cols[reg_img].permute(2, 0, 1)  # (3, H, H)
    c = torch.arange(H, dtype=torch.float32) / H
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    freq = _uniform(g, 6.0, 20.0, (n_objects + 2,))
    phase = _uniform(g, 0.0, 2 * math.pi, (n_objects + 2,))
    texture = 12 * torch.sin(2 * math.pi * freq[reg_img] * (xx + 0.5 * yy) + phase[reg_img])  # (H, H)
    shade = 25 * (yy - 0.5)  # vertical lighting gradient
    img = img + texture + shade + image_noise * torch.randn(3, H, H, generator=g)
    image = img.round().clamp(0, 255).to(torch.uint8)
    lut = torch.tensor([0] + object_classes, dtype=torch.uint8)
    gt = lut[obj_img]
    return SyntheticScene(
        layers=layers,
        class_attention=ca.float(),
        image=image,
        gt=gt,
        objects=obj_img,
        object_classes=object_classes,
        classes=sorted(set(object_classes)),
        grid=grid,
        seed=int(seed),
        layout={"ellipses": ell, "horizon": (level, tilt)},
    )


def make_scenes(seeds, **kwargs) -> list[SyntheticScene]:
    """:func:`make_scene` for each seed."""
    return [make_scene(s, **kwargs) for s in seeds]


def stack_scenes(scenes: list[SyntheticScene]) -> dict:
    """Batch scenes of equal sizes: ``layers`` list of (B, 2*heads, S*S, d), ``class_attention``
    (B, K, h, w), ``images`` (B, 3, H, W) uint8, ``gt`` (B, H, W) uint8."""
    if not scenes:
        raise ValueError("`scenes` has to hold at least one scene but is empty")
    return {
        "layers": [torch.stack([s.layers[i] for s in scenes]) for i in range(len(scenes[0].layers))],
        "class_attention": torch.stack([s.class_attention for s in scenes]),
        "images": torch.stack([s.image for s in scenes]),
        "gt": torch.stack([s.gt for s in scenes]),
    }


def scene_features(layers: list[torch.Tensor], grid: int, cfg: PCCConfig | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Head-wise PCA features of per-layer attention outputs, through :mod:`pccfast.pca`.

    Args:
        layers: per layer (B, heads, S*S, d) or (heads, S*S, d).
    Returns:
        (B, D, grid, grid) or (D, grid, grid), D = n_components * sum(heads), layers in order.
    """
    from pccfast.core.pca import headwise_features

    unbatched = layers[0].dim() == 3
    layers = [x[None] if unbatched else x for x in layers]  # (B, heads, S*S, d) each
    c = (cfg or PCCConfig()).pca_components
    widths = [x.shape[1] * c for x in layers]
    out = torch.empty(layers[0].shape[0], sum(widths), grid, grid, device=layers[0].device)  # (B, D, grid, grid)
    start = 0
    for x, width in zip(layers, widths):  # each layer writes its channel slice, no concatenation
        headwise_features(x, grid, cfg, generator=generator, out=out[:, start:start + width])
        start += width
    return out[0] if unbatched else out


def mask_miou(a: torch.Tensor, b: torch.Tensor, *, skip: int | None = None) -> float:
    """Mean IoU between two label maps (H, W) over the labels present in either.

    ``skip=None`` treats every value (255 too) as a label of its own (agreement between two
    masks); ``skip=255`` leaves label 255 out of the mean, so a pixel that ``a`` marks 255 only
    counts against the class that ``b`` has there (a mask against the ground truth).
    """
    a = torch.as_tensor(a).reshape(-1).long()
    b = torch.as_tensor(b).reshape(-1).long()
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` have to hold as many pixels but hold {a.numel()} and {b.numel()}")
    conf = torch.bincount(a * 256 + b, minlength=256 * 256).reshape(256, 256)  # (a label, b label)
    inter = conf.diagonal().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    keep = union > 0
    if skip is not None:
        keep[skip] = False
    if not bool(keep.any()):
        return 1.0
    return float((inter[keep] / union[keep]).mean())


def pixel_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of pixels where two label maps hold the same value."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a.reshape(-1).long() == b.reshape(-1).long()).double().mean())
