"""The blocky mask (reference section 2): cluster pieces voted into classes on the grid.

For every k in ``cfg.cluster_ks`` the assembled features are clustered, the clusters split
into connected pieces, and every piece takes, per threshold, the class whose thresholded
class map it overlaps with the highest IoU. The 3 k x 3 thresholds label maps vote per pixel.
Everything is counted with ``scatter_add`` over (image, map, class, piece) indices.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pccfast.backends import resolve
from pccfast.core.checks import check_tensor, local_generator
from pccfast.core.components import connected_components
from pccfast.core.config import PCCConfig
from pccfast.core.features import assemble_features, clustering_points
from pccfast.core.kmeans import NARROW_D, PreparedPoints, kmeans, kmeans_many, prepare_points
from pccfast.core.seeding import SeedingCache

__all__ = ["normalise_class_maps", "binary_class_maps", "piece_iou_labels", "vote", "cluster_pieces",
           "blocky_mask"]


def normalise_class_maps(class_attention: Tensor) -> tuple[Tensor, Tensor]:
    """Min-max normalise every class map over its image.

    Args:
        class_attention: (B, K, h, w).

    Returns:
        normalised maps (B, K, h, w) in [0, 1], and ``usable`` (B, K) bool: False for a class
        that is skipped, i.e. an all-zero map (class absent) or a constant map (whose min-max
        normalisation is undefined; 0/0 would make its binary maps empty in the reference).
    """
    b, k = class_attention.shape[:2]
    flat = class_attention.float().reshape(b, k, -1)  # (B, K, h*w)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)  # (B, K, 1)
    span = hi - lo
    usable = (span > 0).squeeze(-1)  # (B, K); an all-zero map has span 0 too
    norm = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(flat))
    return norm.view_as(class_attention), usable


def binary_class_maps(norm: Tensor, usable: Tensor, thresholds, background_factor: float) -> Tensor:
    """Thresholded class maps: ``map > t``, for class 0 (background) ``map > factor * t``.

    norm: (B, K, h, w), usable: (B, K) -> (B, T, K, h*w) bool (all False for skipped classes)
    """
    b, k = norm.shape[:2]
    t = torch.tensor(thresholds, dtype=norm.dtype, device=norm.device)  # (T,)
    factor = torch.ones(k, dtype=norm.dtype, device=norm.device)
    factor[0] = background_factor
    cut = t[:, None] * factor[None, :]  # (T, K)
    flat = norm.reshape(b, 1, k, -1)  # (B, 1, K, h*w)
    return (flat > cut[None, :, :, None]) & usable[:, None, :, None]  # (B, T, K, h*w)


def piece_iou_labels(pieces: Tensor, binary: Tensor, n_pieces: Optional[int] = None) -> Tensor:
    """Per-pixel class of the highest piece-vs-map IoU, for every piece map and threshold.

    Args:
        pieces: (B, M, P) long piece ids in [0, n) per map (M piece maps, e.g. one per k;
            P pixels).
        binary: (B, T, K, P) bool thresholded class maps.
        n_pieces: a bound on the ids (the tables' size), e.g. P + 1 for connected-component
            ids 1..N <= P: a static size, no host sync; None: ``max(pieces) + 1`` (one sync).

    Returns:
        (B, M, T, P) long class per pixel: argmax over classes of IoU(pixel's piece, map);
        ties -> lower class index; all IoUs zero -> 0 (background).
    """
    b, m, p = pieces.shape
    t, k = binary.shape[1:3]
    n = int(pieces.max()) + 1 if n_pieces is None else n_pieces
    src = binary.reshape(b, 1, t * k, p).expand(b, m, t * k, p).float()  # (B, M, T*K, P)
    idx = pieces[:, :, None, :].expand(b, m, t * k, p)  # (B, M, T*K, P)
    inter = torch.zeros(b, m, t * k, n, device=pieces.device).scatter_add_(3, idx, src)  # (B, M, T*K, n)
    size = torch.zeros(b, m, n, device=pieces.device).scatter_add_(
        2, pieces, torch.ones_like(pieces, dtype=torch.float32))  # (B, M, n) piece sizes
    area = binary.sum(-1, dtype=torch.float32).reshape(b, 1, t * k, 1)  # (B, 1, T*K, 1)
    union = size[:, :, None, :] + area - inter  # (B, M, T*K, n)
    iou = torch.where(inter > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    piece_class = iou.view(b, m, t, k, n).argmax(dim=3)  # (B, M, T, n), first max = lower class
    return torch.gather(piece_class, 3, pieces[:, :, None, :].expand(b, m, t, p))  # (B, M, T, P)


def vote(labels: Tensor, n_classes: int, min_share: float, ignore_index: int) -> Tensor:
    """Per-pixel majority over label maps.

    Args:
        labels: (B, V, P) long label maps in [0, n_classes).
        n_classes: number of classes K.
        min_share: the winner needs at least this share of the V votes, else ``ignore_index``.
        ignore_index: label of uncertain pixels.

    Returns:
        (B, P) long: the most frequent label (ties -> smaller label) or ``ignore_index``.
    """
    b, v, p = labels.shape
    counts = torch.zeros(b, n_classes, p, device=labels.device, dtype=torch.int32)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.int32))  # (B, K, P)
    top, winner = counts.max(dim=1)  # (B, P); first max = smaller label
    # min-share test in integers-as-floats: 5/9 = 0.5556 < 0.56 fails, 6/9 passes
    return torch.where(top.double() / v < min_share, torch.full_like(winner, ignore_index), winner)



def cluster_pieces(
    feats: Tensor, h: int, w: int, cfg: PCCConfig, generator: Optional[torch.Generator] = None,
    prepared: Optional[PreparedPoints] = None, cache: Optional[SeedingCache] = None,
) -> Tensor:
    """k-means for every k in ``cfg.cluster_ks``, then connected pieces of every clustering.

    feats: (B, h*w, D') assembled features; prepared: optional ``prepare_points(feats)`` (or
    ``features.clustering_points``) shared by every k; cache: optional ``SeedingCache`` for
    k-means++ -> (B, len(ks), h*w) long piece ids 1..N
    """
    # centring, norms and variance once for all k (one initialisation, not cuML)
    backend = resolve("kmeans", cfg.kmeans_backend, feats, fits=feats.dtype != torch.float64)
    if prepared is None and backend != "cuml" and cfg.kmeans_n_init == 1:
        work = feats.float() if backend == "native" or feats.dtype != torch.float64 else feats
        # the C kernel takes wide points as rows: no transpose
        prepared = prepare_points(work, transpose=backend == "torch" or feats.shape[-1] <= NARROW_D)
    b = feats.shape[0]
    # a fresh seed per k, as the reference
    gens = [local_generator(generator, cfg.kmeans_seed, feats.device) for _ in cfg.cluster_ks]
    if cfg.kmeans_n_init == 1:  # the torch backend runs the k-means of every k in one loop
        labels = kmeans_many(feats, cfg.cluster_ks, max_iter=cfg.kmeans_max_iter, tol=cfg.kmeans_tol,
                             generators=gens, seed=cfg.kmeans_seed, backend=backend, prepared=prepared,
                             cache=cache, check_every=cfg.kmeans_check_every)
    else:
        labels = [kmeans(feats, k, max_iter=cfg.kmeans_max_iter, tol=cfg.kmeans_tol, generator=g,
                         n_init=cfg.kmeans_n_init, seed=cfg.kmeans_seed, backend=backend,
                         check_every=cfg.kmeans_check_every, prepared=prepared, cache=cache)[0]
                  for k, g in zip(cfg.cluster_ks, gens)]
    # the pieces of every clustering in one call: (len(ks)*B, h, w), clustering-major
    pieces = connected_components(torch.cat(labels, 0).view(-1, h, w), cfg.connectivity,
                                  backend=cfg.components_backend)
    return pieces.view(len(labels), b, h * w).transpose(0, 1)  # (B, len(ks), h*w)


def blocky_mask(
    features: Tensor,
    class_attention: Tensor,
    cfg: Optional[PCCConfig] = None,
    generator: Optional[torch.Generator] = None,
    cache: Optional[SeedingCache] = None,
) -> Tensor:
    """Section 2: the blocky label mask on the feature grid.

    Args:
        features: (B, D, h, w) head-wise PCA features (not normalised).
        class_attention: (B, K, h, w) class maps, class 0 = background.
        cfg: constants (reference defaults when None).
        generator: k-means++ generator (default: a fresh one seeded ``cfg.kmeans_seed`` per k).
        cache: optional ``SeedingCache`` for the k-means++ random numbers (same result).

    Returns:
        (B, h, w) uint8 labels in [0, K) or ``cfg.ignore_index`` (uncertain).
    """
    cfg = cfg or PCCConfig()
    check_tensor(features, "features", 4, floating=True)
    check_tensor(class_attention, "class_attention", 4, floating=True, batch=features.shape[0])
    b, _, h, w = features.shape
    k = class_attention.shape[1]
    if class_attention.shape[-2:] != features.shape[-2:]:
        raise ValueError(
            f"`class_attention` has to have the grid of `features` {(h, w)} but has shape "
            f"{tuple(class_attention.shape)}"
        )
    if not 1 <= k <= min(cfg.ignore_index, 255):
        raise ValueError(
            f"`class_attention` has to hold 1 to {min(cfg.ignore_index, 255)} classes (dimension 1) "
            f"but holds {k}"
        )
    backend = resolve("kmeans", cfg.kmeans_backend, features, fits=features.dtype != torch.float64)
    if backend != "cuml" and cfg.kmeans_n_init == 1:
        # normalised, centred points straight from the features, shared by every k; k-means
        # is translation invariant, so the centred points cluster as the assembled ones
        prepared = clustering_points(features, transpose=backend == "torch")
        pieces = cluster_pieces(prepared.x, h, w, cfg, generator, prepared, cache)  # (B, len(ks), h*w)
    else:
        pieces = cluster_pieces(assemble_features(features), h, w, cfg, generator,
                                cache=cache)  # (B, len(ks), h*w)
    norm, usable = normalise_class_maps(class_attention)  # (B, K, h, w), (B, K)
    binary = binary_class_maps(norm, usable, cfg.thresholds, cfg.background_factor)  # (B, T, K, h*w)
    labels = piece_iou_labels(pieces, binary, h * w + 1)  # (B, len(ks), T, h*w); ids <= h*w
    voted = vote(labels.reshape(b, -1, h * w), k, cfg.vote_min_share, cfg.ignore_index)  # (B, h*w)
    return voted.view(b, h, w).to(torch.uint8)
