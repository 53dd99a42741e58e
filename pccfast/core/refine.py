"""Refinement of the blocky mask with the image (reference section 3), batched over images.

1. k-means (k = 20) on (R, G, B, x * 255 / W, y * 255 / H) per pixel, x = column.
2. 8-connected pieces of the clusters; pieces under ``min_piece_pixels`` pooled into piece 0.
3. Every piece takes the blocky label that dominates it (``> ratio x`` the runner-up, the
   uncertain label counting like a class), else the uncertain label.
4. Clean-up per label value with OpenCV-default morphology, see ``cleanup`` (on the CPU a C
   kernel on bit-packed masks, ``kernels/morphology.c``; the torch path is the reference).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pccfast.backends import kernels, resolve
from pccfast.core.checks import check_tensor, local_generator
from pccfast.core.components import connected_components
from pccfast.core.config import PCCConfig
from pccfast.core.kmeans import kmeans
from pccfast.core.seeding import SeedingCache

__all__ = ["refine_points", "pool_small_pieces", "piece_majority", "dilate", "erode", "cleanup",
           "refine_mask"]


def refine_points(images: Tensor, position_range: float = 255.0) -> Tensor:
    """Clustering points of section 3.

    images: (B, 3, H, W) in [0, 255] -> (B, H*W, 5) float32: R, G, B, x * range / W, y * range / H
    (a transposed view of a contiguous (B, 5, H*W) tensor)
    """
    b, _, h, w = images.shape
    ys = torch.arange(h, device=images.device, dtype=torch.float32) * (position_range / h)  # (H,)
    xs = torch.arange(w, device=images.device, dtype=torch.float32) * (position_range / w)  # (W,)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    pts = torch.empty(b, 5, h * w, device=images.device, dtype=torch.float32)  # (B, 5, H*W)
    pts[:, :3] = images.reshape(b, 3, h * w)  # R, G, B planes, row-major pixels
    pts[:, 3] = xx.reshape(-1)
    pts[:, 4] = yy.reshape(-1)
    # a transposed view: the coordinates of a pixel are strided, each feature plane is
    # contiguous (the layout the k-means kernel takes, so it needs no copy)
    return pts.transpose(1, 2)


def pool_small_pieces(pieces: Tensor, min_pixels: int, n_pieces: Optional[int] = None) -> Tensor:
    """Pieces of fewer than ``min_pixels`` pixels all become piece 0.

    pieces: (B, P) long ids in [0, n_pieces); n_pieces: a bound on the ids, by default P + 1
    (connected-component ids, 1..N <= P), a static size, no host sync -> (B, P) long
    """
    n = pieces.shape[-1] + 1 if n_pieces is None else n_pieces
    size = torch.zeros(pieces.shape[0], n, dtype=torch.long, device=pieces.device)
    size.scatter_add_(1, pieces, torch.ones_like(pieces))  # (B, n) pixels per piece
    small = torch.gather(size, 1, pieces) < min_pixels  # (B, P)
    return torch.where(small, torch.zeros_like(pieces), pieces)


def piece_majority(pieces: Tensor, labels: Tensor, ratio: float, ignore_index: int) -> Tensor:
    """Every piece takes its dominant label.

    A piece's label histogram counts every label value (``ignore_index`` like a class). A piece
    with a single label takes it; otherwise the most frequent label if its count is more than
    ``ratio`` times the runner-up's, else ``ignore_index`` (a tie for first never dominates).

    Args:
        pieces: (B, P) long piece ids >= 0 (0 = the pool of small pieces, also one piece).
        labels: (B, P) long labels in [0, 255].

    Returns:
        (B, P) long relabelled pixels.
    """
    b, p = pieces.shape
    lo = hi = n = n_lab = None
    if labels.numel():  # a table of the 256 values, no sort; one host sync for all the sizes
        table = torch.arange(256, device=labels.device)  # (256,)
        present = torch.zeros(256, dtype=torch.bool, device=labels.device).scatter_(
            0, labels.reshape(-1).clamp(0, 255), True)  # (256,)
        # an explicit copy to the host, which a dispatch counter sees on the CPU too
        lo, hi, n, n_lab = torch.stack([labels.min(), labels.max(), pieces.max() + 1,
                                        present.sum()]).to("cpu", copy=True).tolist()
    if lo is not None and 0 <= lo and hi <= 255:
        values = torch.where(present, table, 256).sort().values[:n_lab]  # (L,) ascending
        compact = (torch.cumsum(present, 0) - 1)[labels]  # (B, P) in [0, L)
    else:
        values, compact = torch.unique(labels, return_inverse=True)  # (L,), (B, P) in [0, L)
        n_lab = values.numel()
        n = int(pieces.max()) + 1 if n is None else n
    hist = torch.zeros(b, n * n_lab, dtype=torch.int32, device=pieces.device)
    hist.scatter_add_(1, pieces * n_lab + compact, torch.ones_like(compact, dtype=torch.int32))
    hist = hist.view(b, n, n_lab)  # (B, n, L) label counts per piece
    if n_lab == 1:
        return labels.clone()
    top = hist.topk(2, dim=-1)  # values/indices (B, n, 2)
    first, second = top.values[..., 0], top.values[..., 1]  # (B, n)
    dominant = first.double() > ratio * second.double()  # (B, n); a single label has second = 0
    piece_label = torch.where(dominant, values[top.indices[..., 0]], torch.full_like(first, ignore_index,
                                                                                     dtype=torch.long))
    return torch.gather(piece_label, 1, pieces)  # (B, P)


def _step(m: Tensor, dim: int, grow: bool) -> Tensor:
    """One 3-wide step along ``dim`` of a bool mask: dilation (OR, outside = background) or
    erosion (AND, outside = foreground, so the border never erodes). m: (..., H, W) bool."""
    n = m.shape[dim]
    out = m.clone()
    if n < 2:
        return out
    lo, hi = m.narrow(dim, 0, n - 1), m.narrow(dim, 1, n - 1)
    if grow:
        out.narrow(dim, 1, n - 1).logical_or_(lo)
        out.narrow(dim, 0, n - 1).logical_or_(hi)
    else:
        out.narrow(dim, 1, n - 1).logical_and_(lo)
        out.narrow(dim, 0, n - 1).logical_and_(hi)
    return out


def _morph(m: Tensor, iterations: int, grow: bool) -> Tensor:
    m = m.bool() if m.dtype != torch.bool else m
    for dim in (-1, -2):  # a 3x3 square is a 3-wide row step then a 3-tall column step
        for _ in range(max(iterations, 0)):
            m = _step(m, dim, grow)
    return m


def dilate(m: Tensor, iterations: int) -> Tensor:
    """3x3 dilation applied ``iterations`` times; outside the image counts as background.

    Equals one (2n+1)-square dilation (OpenCV's iterated dilate). m: (..., H, W) -> bool
    """
    return _morph(m, iterations, grow=True)


def erode(m: Tensor, iterations: int) -> Tensor:
    """3x3 erosion applied ``iterations`` times; outside the image counts as foreground, so the
    border never erodes (OpenCV's default border value for erosion). m: (..., H, W) -> bool"""
    return _morph(m, iterations, grow=False)


def _cleanup_native(labels: Tensor, cfg: PCCConfig) -> Tensor:
    """``cleanup`` in the C kernel (bit-packed masks, per-value row ranges, OpenMP).

    labels: (B, H, W) integer CPU -> (B, H, W) uint8
    """
    return kernels.cleanup(labels, cfg.ignore_index, max(cfg.erode_first, 0), max(cfg.dilate_iters, 0),
                           max(cfg.erode_after, 0), max(cfg.band_dilations, 0))


def cleanup(labels: Tensor, cfg: PCCConfig) -> Tensor:
    """The reference's clean-up loop, vectorised over the label values present.

    The reference fills an output that starts all 0, going through the label values v in
    ascending order: 0 and the uncertain label are copied as they are; any other class gets
    m = (labels == v), m = erode(m, 1); m = dilate(m, 5); m = erode(m, 4), then
    band = dilate(m, 2), and writes the uncertain label on band, then v on m.
    Reading of the spec: the band is dilated from the *opened* m (the text's m after the
    morphology; "pixels of a class that the opening removed and no band covers stay 0" only
    makes sense so), and v is written on the opened m.

    Vectorised: every value gets a channel (the uncertain label's channel is its raw mask for
    both m and band; 0 is first and a no-op on a zero output). A pixel's final value comes
    from the last (largest) value whose band covers it (band contains m): that value if the
    pixel is in its m, else the uncertain label; pixels no band covers stay 0.

    Backend ``cfg.cleanup_backend``: "torch" (this vectorised form, any device), "native" (the C
    kernel ``kernels/morphology.c``, CPU only, bit-identical), "auto" (native for CPU tensors
    when the kernel builds, else torch).

    labels: (B, H, W) long -> (B, H, W) uint8
    """
    if resolve("cleanup", cfg.cleanup_backend, labels) == "native":
        return _cleanup_native(labels, cfg)
    return _cleanup_torch(labels, cfg)


def _cleanup_torch(labels: Tensor, cfg: PCCConfig) -> Tensor:
    """The torch path of ``cleanup`` (every value a channel of a (B, C, H, W) bool stack).

    labels: (B, H, W) long -> (B, H, W) uint8
    """
    b, h, w = labels.shape
    ignore = cfg.ignore_index
    values = torch.unique(labels)  # (C,) ascending; the one host sync
    if values.numel() == 0:
        return torch.zeros(b, h, w, dtype=torch.uint8, device=labels.device)
    raw = labels[:, None] == values[None, :, None, None]  # (B, C, H, W) bool
    m = erode(dilate(erode(raw, cfg.erode_first), cfg.dilate_iters), cfg.erode_after)  # opened
    band = dilate(m, cfg.band_dilations)  # (B, C, H, W)
    is_ignore = (values == ignore)[None, :, None, None]  # (1, C, 1, 1)
    m = torch.where(is_ignore, raw, m)
    # 0's channel covers nothing (as if dropped, without a data-dependent mask on the host)
    band = torch.where(is_ignore, raw, band) & (values != 0)[None, :, None, None]
    rank = torch.arange(1, values.numel() + 1, device=labels.device)[None, :, None, None]  # (1, C, 1, 1)
    last = (band * rank).amax(dim=1)  # (B, H, W): 1 + channel of the last covering value, 0 none
    idx = (last - 1).clamp_min(0)[:, None]  # (B, 1, H, W)
    in_m = torch.gather(m, 1, idx)[:, 0]  # (B, H, W)
    out = torch.where(in_m, values[idx[:, 0]], torch.full_like(last, ignore))
    return torch.where(last > 0, out, torch.zeros_like(out)).to(torch.uint8)


def refine_mask(
    images: Tensor,
    blocky_full: Tensor,
    cfg: Optional[PCCConfig] = None,
    generator: Optional[torch.Generator] = None,
    cache: Optional[SeedingCache] = None,
) -> Tensor:
    """Section 3: refine the upsampled blocky mask with the image.

    Args:
        images: (B, 3, H, W) uint8 or float in [0, 255].
        blocky_full: (B, H, W) integer blocky labels at image resolution (uncertain included).
        cfg: constants (reference defaults when None).
        generator: k-means++ generator (default: fresh, seeded ``cfg.kmeans_seed``).
        cache: optional ``SeedingCache`` for the k-means++ random numbers (same result; a
            caller labelling many batches keeps one to draw them once).

    Returns:
        (B, H, W) uint8 refined labels (``cfg.ignore_index`` uncertain).
    """
    cfg = cfg or PCCConfig()
    check_tensor(images, "images", 4, min_size=(None, 3))
    check_tensor(blocky_full, "blocky_full", 3, integer=True, batch=images.shape[0])
    b, c, h, w = images.shape
    if c != 3 or blocky_full.shape[-2:] != (h, w):
        raise ValueError(
            f"`images` (B, 3, H, W) and `blocky_full` (B, H, W) have to agree but have shapes "
            f"{tuple(images.shape)} and {tuple(blocky_full.shape)}"
        )
    points = refine_points(images, cfg.refine_position_range)  # (B, H*W, 5)
    generator = local_generator(generator, cfg.kmeans_seed, images.device)
    clusters, _ = kmeans(points, min(cfg.refine_k, h * w), max_iter=cfg.kmeans_max_iter, tol=cfg.kmeans_tol,
                         generator=generator, n_init=cfg.kmeans_n_init, seed=cfg.kmeans_seed,
                         backend=cfg.kmeans_backend, cache=cache,
                         check_every=cfg.kmeans_check_every)  # (B, H*W)
    pieces = connected_components(clusters.view(b, h, w), cfg.connectivity,
                                  backend=cfg.components_backend)  # (B, H, W)
    pieces = pool_small_pieces(pieces.view(b, h * w), cfg.min_piece_pixels, h * w + 1)  # (B, H*W)
    relabelled = piece_majority(pieces, blocky_full.reshape(b, h * w).long(), cfg.dominance_ratio,
                                cfg.ignore_index)  # (B, H*W)
    return cleanup(relabelled.view(b, h, w), cfg)
