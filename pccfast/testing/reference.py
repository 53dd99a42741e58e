"""The reference PCC labeller, written the way the reference code does it (the baseline).

An independent reading of ``../shared/reference-pipeline.md`` sections 1-3 in numpy,
scikit-learn and scipy, one image at a time, with the reference's Python loops (per head,
per piece, per pixel) and its hand-off through pickles between three "scripts". It imports
nothing from pccfast's labeller, so it can serve as the yardstick for both speed and
fidelity.

Stages (one image):
1. :func:`pca_stage`: per layer (2*heads, S*S, d) attention outputs -> features (h*w, D):
   scikit-learn PCA(3) per head, reshape to (S, S, 3), nearest upsample to the grid.
2. :func:`blocky_stage`: features + class maps (K, h, w) -> blocky mask (h, w) uint8.
3. :func:`refine_stage`: blocky mask + image (H, W, 3) uint8 -> mask (H, W) uint8.

:func:`run_scripts` runs the three stages as separate steps that pass their results
through pickle files, like the reference's scripts, reading the image from disk.

Morphology: OpenCV's ``erode``/``dilate`` with a 3x3 kernel and default borders (the
border never erodes and never dilates) are :func:`scipy.ndimage.binary_erosion` with
``border_value=1`` and :func:`scipy.ndimage.binary_dilation` with ``border_value=0``.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

__all__ = [
    "REFERENCE",
    "sklearn14_solver",
    "pca_stage",
    "normalise_features",
    "cluster_pieces",
    "blocky_stage",
    "blocky_from_pieces",
    "vote",
    "refine_stage",
    "refine_from_clusters",
    "assign_pieces",
    "clean_up",
    "reference_label",
    "run_scripts",
]

# The reference's constants (reference-pipeline.md); kept here, not taken from PCCConfig,
# so that the baseline stays an independent reading of the spec.
REFERENCE = dict(
    n_components=3,
    ks=(4, 7, 10),
    thresholds=(0.3, 0.5, 0.8),
    background_factor=1.2,
    vote_min_share=0.56,
    refine_k=20,
    position_range=255.0,
    min_piece_pixels=10,
    dominance_ratio=2.0,
    erode_first=1,
    dilate_iters=5,
    erode_after=4,
    band_dilations=2,
    ignore=255,
)
EIGHT = np.ones((3, 3), dtype=int)  # 8-connectivity structure (the reference code)
KERNEL = np.ones((3, 3), dtype=bool)  # 3x3 morphology kernel


def sklearn14_solver(n_samples: int, n_features: int, n_components: int) -> str:
    """The solver scikit-learn 1.4's ``PCA(svd_solver='auto')`` picks (the reference ran 1.4;
    newer versions pick 'covariance_eigh' for tall data, so the choice is spelled out):
    'full' if the data is at most 500x500 or many components are asked for, else 'randomized'.
    For SD's 16x16 layers (256 x 64) that is 'full'; for 32x32 and 64x64 'randomized'."""
    if max(n_samples, n_features) <= 500 or n_components >= 0.8 * min(n_samples, n_features):
        return "full"
    return "randomized"


def pca_stage(layers, grid: int, seed: int = 0, n_components: int = 3) -> np.ndarray:
    """Head-wise PCA features of one image.

    Args:
        layers: per layer an array (heads, S*S, d) (all CFG halves, unconditional first),
            S*S pixels row-major; S divides ``grid``.
        grid: side of the feature grid (64 for SD at 512x512).
        seed: random_state of the randomized solver.
    Returns:
        (grid*grid, D) float32, D = n_components * total heads, layer by layer, head-major.
    """
    cols = []
    for x in layers:
        x = np.asarray(x, dtype=np.float32)
        heads, n, d = x.shape
        side = int(round(np.sqrt(n)))
        if side * side != n or grid % side != 0:
            raise ValueError(f"`layers` has to hold square maps whose side divides grid {grid} but has {n} pixels")
        solver = sklearn14_solver(n, d, n_components)
        f = grid // side
        for head in range(heads):
            if solver == "full":
                pca = PCA(n_components=n_components, svd_solver="full")
            else:
                pca = PCA(n_components=n_components, svd_solver="randomized", n_oversamples=10,
                          iterated_power=7, random_state=seed)
            p = pca.fit_transform(x[head])  # (S*S, 3)
            p = p.reshape(side, side, n_components)  # (S, S, 3)
            p = np.repeat(np.repeat(p, f, axis=0), f, axis=1)  # nearest upsample -> (grid, grid, 3)
            cols.append(p.reshape(grid * grid, n_components))
    return np.concatenate(cols, axis=1).astype(np.float32)


def normalise_features(features: np.ndarray, h: int, w: int) -> np.ndarray:
    """Min-max normalise each column over the pixels and append x and y in [0, 1].

    features: (h*w, D) -> (h*w, D + 2). A constant column becomes 0 (the reference would divide by 0)."""
    f = np.asarray(features, dtype=np.float64)
    lo, hi = f.min(axis=0), f.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    f = (f - lo) / span
    yy, xx = np.mgrid[0:h, 0:w]
    x = xx.reshape(-1, 1) / max(w - 1, 1)
    y = yy.reshape(-1, 1) / max(h - 1, 1)
    return np.concatenate([f, x, y], axis=1)


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed, tol=1e-4, max_iter=300)
    return km.fit_predict(points)


def cluster_pieces(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Split every cluster of a (h, w) label map into 8-connected pieces numbered 1..N."""
    pieces = np.zeros(labels.shape, dtype=np.int64)
    n = 0
    for c in np.unique(labels):
        lab, m = ndimage.label(labels == c, structure=EIGHT)
        pieces[lab > 0] = lab[lab > 0] + n
        n += m
    return pieces, n


def _classify(pieces: np.ndarray, n_pieces: int, maps: dict, t: float, background_factor: float, num_classes: int):
    """One label map for one clustering and one threshold: each piece's pixels get, per
    class, the piece's IoU with the class's binary map; each pixel takes the argmax."""
    scores = np.zeros((num_classes,) + pieces.shape, dtype=np.float64)
    for c, m in maps.items():
        binary = m > (background_factor * t if c == 0 else t)
        for p in range(1, n_pieces + 1):
            piece = pieces == p
            inter = np.logical_and(piece, binary).sum()
            if inter == 0:
                continue
            union = np.logical_or(piece, binary).sum()
            scores[c][piece] = inter / union
    return scores.argmax(axis=0)  # ties -> lower class; all zero -> 0 (background)


def blocky_stage(features: np.ndarray, class_attention: np.ndarray, seed: int = 0, *, p=REFERENCE) -> np.ndarray:
    """The blocky mask of one image (section 2).

    Args:
        features: (h*w, D) head-wise PCA features (not normalised).
        class_attention: (K, h, w) class maps (all-zero rows for absent classes).
        seed: random_state of the k-means.
    Returns:
        (h, w) uint8 labels, 255 where fewer than 56% of the 9 votes agree.
    """
    h, w = np.shape(class_attention)[1:]
    points = normalise_features(features, h, w)
    piece_maps = []
    for k in p["ks"]:
        labels = _kmeans(points, k, seed).reshape(h, w)
        piece_maps.append(cluster_pieces(labels))
    return blocky_from_pieces(piece_maps, class_attention, p=p)


def blocky_from_pieces(piece_maps, class_attention: np.ndarray, *, p=REFERENCE) -> np.ndarray:
    """Section 2 after the clustering: class maps, IoU per piece per threshold, vote.

    Args:
        piece_maps: per k a pair (pieces (h, w) numbered 1..N, N).
        class_attention: (K, h, w) class maps (float32 as captured).
    Returns:
        (h, w) uint8 labels.
    """
    class_attention = np.asarray(class_attention)
    num_classes = class_attention.shape[0]
    maps = {}
    for c in range(num_classes):  # min-max normalise each class map; skip all-zero classes
        m = class_attention[c]
        if not m.any():
            continue
        lo, hi = m.min(), m.max()
        maps[c] = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    votes = []
    for pieces, n in piece_maps:
        for t in p["thresholds"]:
            votes.append(_classify(pieces, n, maps, t, p["background_factor"], num_classes))
    return vote(np.stack(votes), p=p)  # (9, h, w) -> (h, w)


def vote(votes: np.ndarray, *, p=REFERENCE) -> np.ndarray:
    """Per-pixel majority of (V, h, w) label maps: the most frequent label (ties -> smaller),
    255 if its share of the V votes is below ``vote_min_share``. Returns (h, w) uint8."""
    _, h, w = votes.shape
    out = np.zeros((h, w), dtype=np.uint8)
    need = p["vote_min_share"] * len(votes)
    for i in range(h):  # per-pixel vote
        for j in range(w):
            counts = np.bincount(votes[:, i, j])
            best = counts.argmax()  # ties -> smaller label
            out[i, j] = best if counts[best] >= need else p["ignore"]
    return out


def _erode(m, n):
    return ndimage.binary_erosion(m, structure=KERNEL, iterations=n, border_value=1) if n > 0 else m


def _dilate(m, n):
    return ndimage.binary_dilation(m, structure=KERNEL, iterations=n, border_value=0) if n > 0 else m


def refine_stage(blocky: np.ndarray, image: np.ndarray, seed: int = 0, *, p=REFERENCE) -> np.ndarray:
    """Refine a blocky mask with the image (section 3).

    Args:
        blocky: (h, w) uint8 blocky labels (255 uncertain); h, w divide H, W.
        image: (H, W, 3) uint8 RGB.
    Returns:
        (H, W) uint8 labels, 255 uncertain.
    """
    image = np.asarray(image)
    H, W = image.shape[:2]
    h, w = blocky.shape
    big = np.repeat(np.repeat(blocky, H // h, axis=0), W // w, axis=1)  # nearest upsample (H, W)
    yy, xx = np.mgrid[0:H, 0:W]
    points = np.concatenate(
        [
            image.reshape(-1, 3).astype(np.float64),
            (xx.reshape(-1, 1) * p["position_range"] / W),
            (yy.reshape(-1, 1) * p["position_range"] / H),
        ],
        axis=1,
    )  # (H*W, 5)
    labels = _kmeans(points, p["refine_k"], seed).reshape(H, W)
    return refine_from_clusters(labels, big, p=p)


def refine_from_clusters(labels: np.ndarray, big: np.ndarray, *, p=REFERENCE) -> np.ndarray:
    """Section 3 after the image k-means: pieces, small-piece pool, per-piece label, clean-up.

    labels: (H, W) cluster ids; big: (H, W) upsampled blocky labels -> (H, W) uint8."""
    pieces, n = cluster_pieces(labels)
    # pool the small pieces into piece 0, renumber the others 1..M
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    new_id = np.zeros(n + 1, dtype=np.int64)
    m = 0
    for q in range(1, n + 1):
        if sizes[q] >= p["min_piece_pixels"]:
            m += 1
            new_id[q] = m
    pieces = new_id[pieces]
    return clean_up(assign_pieces(pieces, m, big, p=p), p=p)


def assign_pieces(pieces: np.ndarray, m: int, big: np.ndarray, *, p=REFERENCE) -> np.ndarray:
    """Label per piece (0..m, 0 = pooled small pieces) from the blocky labels ``big`` under it:
    a single label -> it; else the most frequent if more than twice the runner-up; else 255.
    pieces, big: (H, W). Returns (H, W) uint8."""
    H, W = big.shape
    refined = np.zeros((H, W), dtype=np.uint8)
    for q in range(0, m + 1):  # per piece: the blocky labels under it
        sel = pieces == q
        if not sel.any():
            continue
        values, counts = np.unique(big[sel], return_counts=True)
        if len(values) == 1:
            refined[sel] = values[0]
            continue
        order = np.argsort(-counts, kind="stable")
        first, second = counts[order[0]], counts[order[1]]
        refined[sel] = values[order[0]] if first > p["dominance_ratio"] * second else p["ignore"]
    return refined


def clean_up(refined: np.ndarray, *, p=REFERENCE) -> np.ndarray:
    """The morphological clean-up in ascending label order; 0 and 255 copied, 255 last.
    refined: (H, W) uint8 -> (H, W) uint8."""
    out = np.zeros(refined.shape, dtype=np.uint8)
    for v in np.unique(refined):
        if v == 0 or v == p["ignore"]:
            out[refined == v] = v
            continue
        mv = refined == v
        mv = _erode(mv, p["erode_first"])
        mv = _dilate(mv, p["dilate_iters"])
        mv = _erode(mv, p["erode_after"])
        band = _dilate(mv, p["band_dilations"])
        out[band] = p["ignore"]
        out[mv] = v
    return out


def reference_label(class_attention, image, *, layers=None, features=None, grid=None, seed: int = 0):
    """All three stages in memory for one image. Give ``layers`` (per layer (heads, S*S, d))
    or ``features`` ((h*w, D) or (D, h, w)). Returns (mask (H, W), blocky (h, w)) uint8."""
    class_attention = np.asarray(class_attention)
    h, w = class_attention.shape[1:]
    if features is None:
        if layers is None:
            raise ValueError("`layers` or `features` has to be given but both are None")
        features = pca_stage(layers, grid or h, seed)
    features = np.asarray(features)
    if features.ndim == 3:  # (D, h, w) -> (h*w, D)
        features = features.reshape(features.shape[0], -1).T
    blocky = blocky_stage(features, class_attention, seed)
    return refine_stage(blocky, image, seed), blocky


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def run_scripts(workdir: str, ids, *, stages=("pca", "blocky", "refine"), grid: int = 64, seed: int = 0,
                palette=None) -> None:
    """The reference's three scripts over files in ``workdir``, one image at a time.

    - "pca": ``layers/<id>.pkl`` (list of per-layer arrays) -> ``features/<id>.pkl``
      ({"features": (h*w, D)}); skipped if "pca" is not in ``stages``.
    - "blocky": ``features/<id>.pkl`` + ``class_attention/<id>.pkl`` ((K, h, w)) ->
      ``blocky/<id>.pkl``.
    - "refine": ``blocky/<id>.pkl`` + ``JPEGImages/<id>.jpg`` -> ``SegmentationClass/<id>.png``
      (palette PNG if ``palette`` (768 ints) is given, else greyscale).
    """
    for name in ("features", "blocky", "SegmentationClass"):
        os.makedirs(os.path.join(workdir, name), exist_ok=True)
    pj = os.path.join
    if "pca" in stages:
        for i in ids:
            layers = _load(pj(workdir, "layers", f"{i}.pkl"))
            _dump({"features": pca_stage(layers, grid, seed)}, pj(workdir, "features", f"{i}.pkl"))
    if "blocky" in stages:
        for i in ids:
            feats = _load(pj(workdir, "features", f"{i}.pkl"))["features"]
            ca = _load(pj(workdir, "class_attention", f"{i}.pkl"))
            _dump({"blocky": blocky_stage(feats, ca, seed)}, pj(workdir, "blocky", f"{i}.pkl"))
    if "refine" in stages:
        for i in ids:
            blocky = _load(pj(workdir, "blocky", f"{i}.pkl"))["blocky"]
            image = np.asarray(Image.open(pj(workdir, "JPEGImages", f"{i}.jpg")).convert("RGB"))
            mask = refine_stage(blocky, image, seed)
            im = Image.fromarray(mask, mode="P" if palette is not None else "L")
            if palette is not None:
                im.putpalette(palette)
            im.save(pj(workdir, "SegmentationClass", f"{i}.png"))
