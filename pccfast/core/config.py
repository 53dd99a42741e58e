"""The one configuration dataclass of the PCC labeller, with the reference's defaults.

Every constant of ``../shared/reference-pipeline.md`` sections 1-3 lives here; nothing in
the core hard-codes a size or threshold.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["PCCConfig"]


@dataclass
class PCCConfig:
    """Constants of PCC segmentation (defaults = the reference implementation)."""

    # --- head-wise PCA (section 1) ---
    pca_components: int = 3  # principal components kept per attention head
    pca_method: str = "lowrank"  # "lowrank" (randomised, torch.pca_lowrank) or "eigh" (exact, covariance)
    pca_oversample: int = 3  # extra columns for the randomised solver: q = components + oversample (q=6 keeps ~99.98%)
    pca_niter: int = 7  # power iterations of the randomised solver (scikit-learn's value)
    pca_seed: int = 0  # seed of the randomised solver's local generator

    # --- blocky mask (section 2) ---
    cluster_ks: tuple[int, ...] = (4, 7, 10)  # k-means cluster counts on the attention features
    kmeans_max_iter: int = 300  # Lloyd iteration cap (scikit-learn default)
    kmeans_tol: float = 1e-4  # relative tolerance, scaled by the mean feature variance (scikit-learn)
    kmeans_seed: int = 0  # seed of k-means++ (the reference uses random_state=0)
    kmeans_n_init: int = 1  # k-means++ restarts, best inertia kept (the reference: 1)
    kmeans_check_every: int = 4  # the torch Lloyd loop reads convergence on the host every this many iterations
    kmeans_backend: str = "auto"  # "auto" (C kernel on the CPU if it builds, else torch), "torch", "native", "cuml"
    connectivity: int = 8  # 8 as the reference code (3x3 structure); the paper says 4
    components_backend: str = "auto"  # "auto" (C kernel on the CPU if it builds, else torch), "torch", "native", "cupy"
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.8)  # class-map thresholds
    background_factor: float = 1.2  # background threshold = factor * t
    vote_min_share: float = 0.56  # a pixel's majority label needs this share of the votes (6 of 9)

    # --- refinement with the image (section 3) ---
    refine: bool = True  # run section 3; False returns the upsampled blocky mask
    refine_k: int = 20  # k-means clusters on (R, G, B, x', y')
    refine_position_range: float = 255.0  # x and y are scaled to [0, range * (W-1)/W] as x * 255 / W
    min_piece_pixels: int = 10  # pieces smaller than this are pooled into one piece
    dominance_ratio: float = 2.0  # most frequent label wins if count > ratio * runner-up
    erode_first: int = 1  # opening: erode 3x3 this many times,
    dilate_iters: int = 5  # then dilate 3x3 this many times,
    erode_after: int = 4  # then erode 3x3 this many times
    band_dilations: int = 2  # the uncertain band = dilate(mask) this many times
    cleanup_backend: str = "auto"  # "auto" (C kernel on the CPU if it builds, else torch), "torch", "native"

    ignore_index: int = 255  # label of uncertain pixels (ignored in training)

    def __post_init__(self) -> None:
        self.cluster_ks = tuple(int(k) for k in self.cluster_ks)
        self.thresholds = tuple(float(t) for t in self.thresholds)
        if self.pca_components < 1:
            raise ValueError(f"`pca_components` has to be at least 1 but is {self.pca_components}")
        if self.pca_method not in ("lowrank", "eigh"):
            raise ValueError(f"`pca_method` has to be 'lowrank' or 'eigh' but is {self.pca_method!r}")
        if not self.cluster_ks or min(self.cluster_ks) < 1:
            raise ValueError(f"`cluster_ks` has to be a non-empty tuple of positive ints but is {self.cluster_ks}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"`connectivity` has to be 4 or 8 but is {self.connectivity}")
        if not self.thresholds:
            raise ValueError("`thresholds` has to hold at least one threshold but is empty")
        if not all(0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"`thresholds` have to lie strictly between 0 and 1 (a class covers the pixels where its "
                             f"min-max scaled map is above it) but are "
                             f"{','.join(f'{t:g}' for t in self.thresholds)}")
        if not 0.0 <= self.vote_min_share <= 1.0:
            raise ValueError(f"`vote_min_share` has to lie in [0, 1] but is {self.vote_min_share}")
        if self.kmeans_check_every < 1:
            raise ValueError(f"`kmeans_check_every` has to be at least 1 but is {self.kmeans_check_every}")
        if self.refine_k < 1:
            raise ValueError(f"`refine_k` has to be at least 1 but is {self.refine_k}")
        for name, allowed in (("kmeans_backend", ("auto", "torch", "native", "cuml")),
                              ("components_backend", ("auto", "torch", "native", "cupy")),
                              ("cleanup_backend", ("auto", "torch", "native"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` has to be one of {', '.join(map(repr, allowed))} "
                                 f"but is {getattr(self, name)!r}")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"`ignore_index` has to lie in [0, 255] but is {self.ignore_index}")

    def replace(self, **changes) -> "PCCConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
