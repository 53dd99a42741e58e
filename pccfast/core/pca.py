"""Head-wise PCA of attention outputs (reference section 1), batched over heads and images.

Every batch item is one attention head of one image: its (N, d) matrix of per-pixel outputs
is centred and projected on its first principal components. Two solvers:

* ``"lowrank"``: a randomised range finder (Halko et al.) with ``q = n_components +
  oversample`` columns and ``niter`` power iterations, QR-orthonormalised, started from a
  local ``torch.Generator`` (``torch.pca_lowrank`` would use the global RNG); run on the
  small (d x d) scatter matrix, see ``_components_lowrank``.
* ``"eigh"``: exact, from the (d x d) covariance matrix, eigen-decomposed in float64.

Signs are made deterministic: each component's largest-|loading| coordinate is positive.
"""
from __future__ import annotations

import numbers

from typing import Optional

import torch
from torch import Tensor

from pccfast.core.checks import check_tensor, local_generator
from pccfast.core.config import PCCConfig
from pccfast.core.resize import resize

__all__ = ["headwise_pca", "headwise_features", "grouped_headwise_features", "pca_components"]


def _flip_signs(components: Tensor) -> Tensor:
    """Make each component's largest-|loading| coordinate positive.

    components: (B, c, d) -> (B, c, d)
    """
    idx = components.abs().argmax(dim=-1, keepdim=True)  # (B, c, 1)
    sign = torch.sign(torch.gather(components, -1, idx))  # (B, c, 1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return components * sign


_MAX_MEAN_RATIO = 10.0  # mean^2 / variance up to which a head's scatter comes from the raw Gram


def _centred_gram(x: Tensor, mean: Tensor, n_valid: int) -> Tensor:
    """Scatter matrix of the centred data, without a host sync.

    ``(x - m)^T (x - m) = x^T x - N m^T m``: one float32 matmul on the raw data and a float64
    correction. The correction cancels digits when a column's mean is large against its
    spread (relative error about 4e-6 * (1 + mean^2 / var)); heads with some column over
    ``_MAX_MEAN_RATIO`` take the scatter of explicitly centred data instead, so the leading
    subspace stays within ~2e-5 of the exact one (a float64 SVD; tested). The choice is a
    ``torch.where`` over a second matmul on ``x - redo * m`` (the other heads' rows are left
    uncentred), not an index of the heads to redo, which would wait for the device.

    x: (B, N, d) float32, mean: (B, 1, d) -> (B, d, d) float32
    """
    raw = (x.transpose(1, 2) @ x).double()  # (B, d, d)
    m = mean.double()  # (B, 1, d)
    gram = raw - n_valid * (m.transpose(1, 2) @ m)  # (B, d, d)
    var = torch.diagonal(gram, dim1=1, dim2=2) / n_valid  # (B, d)
    ratio = (m[:, 0] ** 2 / var.clamp_min(torch.finfo(torch.float64).tiny)).amax(dim=-1)  # (B,)
    redo = (ratio > _MAX_MEAN_RATIO)[:, None, None]  # (B, 1, 1) heads to centre explicitly
    xc = x - mean * redo.to(x.dtype)  # (B, N, d): centred where redone
    gram = torch.where(redo, (xc.transpose(1, 2) @ xc).double(), gram)  # (B, d, d)
    return gram.to(x.dtype)


def _components_eigh(gram: Tensor, n_components: int) -> Tensor:
    """Exact leading eigenvectors of the scatter matrix. gram: (B, d, d) -> (B, c, d)."""
    _, evecs = torch.linalg.eigh(gram.double())  # ascending eigenvalues; evecs (B, d, d)
    top = evecs[..., -n_components:].flip(-1)  # (B, d, c), descending
    return top.transpose(1, 2).to(gram.dtype)  # (B, c, d)


def _lowrank_start(d: int, q: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """The randomised solver's orthonormal (d, q) start, drawn from ``generator`` (float64,
    then ``like``'s dtype and device); shared by all items, so none depends on its batch."""
    omega = torch.randn((d, q), generator=generator, device=generator.device, dtype=torch.float64)
    return torch.linalg.qr(omega.to(device=like.device, dtype=like.dtype)).Q  # (d, q)


def _lowrank_subspace(gram: Tensor, start: Tensor, niter: int) -> tuple[Tensor, Tensor]:
    """Power iterations from ``start``: gram (B, d, d), start (d, q) -> basis (B, d, q) and the
    Rayleigh-Ritz matrix basis^T gram basis (B, q, q) float64."""
    b, d, _ = gram.shape
    basis = start.expand(b, d, start.shape[1])  # (B, d, q)
    for _ in range(niter + 1):  # power iterations, re-orthonormalised each step
        basis = torch.linalg.qr(gram @ basis).Q  # (B, d, q)
    return basis, (basis.transpose(1, 2) @ gram @ basis).double()  # (B, d, q), (B, q, q)


def _ritz_components(basis: Tensor, evecs: Tensor, n_components: int) -> Tensor:
    """basis (B, d, q), ascending eigenvectors (B, q, q) of the Ritz matrix -> (B, c, d)."""
    top = basis @ evecs[..., -n_components:].flip(-1).to(basis.dtype)  # (B, d, c), descending
    return top.transpose(1, 2)  # (B, c, d)


def _components_lowrank(
    gram: Tensor, n: int, n_components: int, oversample: int, niter: int, generator: torch.Generator
) -> Tensor:
    """Randomised leading right singular vectors of the centred data (N rows) from its
    scatter matrix. gram: (B, d, d) -> (B, c, d).

    The randomised subspace iteration of ``torch.pca_lowrank`` (Halko et al., algorithm 4.4)
    applied through the (d x d) scatter matrix G = xc^T xc: ``torch.pca_lowrank(niter=n)``
    spans G^(n+1) Omega, so here Q <- orth(G Q) runs n+1 times, followed by Rayleigh-Ritz on
    Q^T G Q. With d = 64 this costs one (N d^2) matmul per head plus tiny float64 work, instead
    of 2n+2 passes over the (N x d) data with tall QRs. The iteration runs in float32 (as
    ``torch.pca_lowrank`` on float32 data); the final (q x q) eigenproblem in float64.
    """
    d = gram.shape[-1]
    q = min(n_components + oversample, n, d)
    basis, small = _lowrank_subspace(gram, _lowrank_start(d, q, generator, gram), niter)
    _, evecs = torch.linalg.eigh(small)  # ascending; (B, q, q)
    return _ritz_components(basis, evecs, n_components)


def _validate(x: Tensor, n_components: int, method: str, oversample: int, niter: int) -> None:
    check_tensor(x, "x", 3, floating=True)
    n, d = x.shape[1:]
    if not 1 <= n_components <= min(n, d):
        raise ValueError(
            f"`n_components` has to lie in [1, min(N, d)] = [1, {min(n, d)}] but is {n_components}"
        )
    if method not in ("lowrank", "eigh"):
        raise ValueError(f"`method` has to be 'lowrank' or 'eigh' but is {method!r}")
    if oversample < 0 or niter < 0:
        raise ValueError(f"`oversample` and `niter` have to be >= 0 but are {oversample} and {niter}")


def _pca(
    x: Tensor, n_components: int, method: str, oversample: int, niter: int,
    generator: Optional[torch.Generator],
) -> tuple[Tensor, Tensor, Tensor]:
    """x: (B, N, d) -> data (B, N, d) float32 (not centred), components (B, c, d), mean (B, 1, d)."""
    _validate(x, n_components, method, oversample, niter)
    x = x.float()
    mean = x.mean(dim=1, keepdim=True)  # (B, 1, d)
    gram = _centred_gram(x, mean, x.shape[1])  # (B, d, d)
    if method == "eigh":
        comps = _components_eigh(gram, n_components)
    else:
        generator = local_generator(generator, 0, x.device)
        comps = _components_lowrank(gram, x.shape[1], n_components, oversample, niter, generator)
    return x, _flip_signs(comps), mean


def pca_components(
    x: Tensor,
    n_components: int = 3,
    *,
    method: str = "lowrank",
    oversample: int = 3,
    niter: int = 7,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Principal axes and means of a batch of data matrices.

    Args:
        x: (B, N, d) data, one matrix per batch item.
        n_components: components kept (at most min(N, d)).
        method: "lowrank" (randomised) or "eigh" (exact).
        oversample, niter: randomised solver settings (``q = n_components + oversample``).
        generator: local generator of the randomised solver (default: seeded with 0).

    Returns:
        components (B, n_components, d) float32 with deterministic signs, mean (B, 1, d).
    """
    _, comps, mean = _pca(x, n_components, method, oversample, niter, generator)
    return comps, mean


def headwise_pca(
    x: Tensor,
    n_components: int = 3,
    *,
    method: str = "lowrank",
    oversample: int = 3,
    niter: int = 7,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Centred PCA projections of every batch item (one item = one head of one image).

    Args:
        x: (B, N, d) per-head data (N pixels, d head dimensions), any float dtype.
        n_components, method, oversample, niter, generator: see ``pca_components``.

    Returns:
        (B, N, n_components) float32 projections on the leading principal axes.
    """
    return _projections(x, n_components, method, oversample, niter, generator).transpose(1, 2)  # (B, N, c)


def _projections(
    x: Tensor, n_components: int, method: str, oversample: int, niter: int,
    generator: Optional[torch.Generator],
) -> Tensor:
    """x: (B, N, d) -> projections (B, c, N) float32 (components-major: the cheaper matmul)."""
    x, comps, mean = _pca(x, n_components, method, oversample, niter, generator)
    # comps (x - mean)^T without a centred copy of x
    return torch.baddbmm(-(comps @ mean.transpose(1, 2)), comps, x.transpose(1, 2))  # (B, c, N)


def _hw(value, name: str) -> tuple[int, int]:
    """An int side or an (h, w) pair -> (h, w), each at least 1."""
    if isinstance(value, numbers.Integral):
        if value < 1:
            raise ValueError(f"`{name}` has to be at least 1 but is {value}")
        return int(value), int(value)
    hw = tuple(int(v) for v in value)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"`{name}` has to be a side or an (h, w) pair, each at least 1, but is {value}")
    return hw


def _layer_hw(n: int, size, name: str) -> tuple[int, int]:
    """(h_l, w_l) of a layer of n pixels: ``size`` if given (checked), else the square side."""
    if size is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"`{name}` has to hold a square number of pixels (dimension 2) but holds {n}; "
                             f"pass its (h, w) for a non-square layer")
        return side, side
    hl, wl = _hw(size, f"size of {name}")
    if hl * wl != n:
        raise ValueError(f"`{name}` holds {n} pixels (dimension 2) but its size is {hl}x{wl}")
    return hl, wl


def headwise_features(
    x: Tensor,
    grid,
    cfg: Optional[PCCConfig] = None,
    generator: Optional[torch.Generator] = None,
    out: Optional[Tensor] = None,
    size=None,
) -> Tensor:
    """One layer's head-wise PCA features, upsampled to the labelling grid.

    Args:
        x: (B, heads, h_l*w_l, d) per-head attention outputs of B images (row-major pixels).
        grid: output (h, w), or one side for a square grid (64 in the reference);
            nearest-neighbour upsampling from (h_l, w_l).
        cfg: supplies ``pca_components``, ``pca_method``, ``pca_oversample``, ``pca_niter``
            and ``pca_seed`` (reference defaults when None).
        generator: overrides the generator seeded with ``cfg.pca_seed``.
        out: optional (B, heads * n_components, h, w) float32 tensor (e.g. a channel
            slice of all layers' features) to write into instead of a new tensor.
        size: the layer's (h_l, w_l); None for a square layer.

    Returns:
        (B, heads * n_components, h, w) float32, head-major channels
        (head0 comp0..c-1, head1 comp0..c-1, ...) (``out`` when given).
    """
    cfg = cfg or PCCConfig()
    check_tensor(x, "x", 4, floating=True)
    b, heads, n, d = x.shape
    hl, wl = _layer_hw(n, size, "x")
    gh, gw = _hw(grid, "grid")
    c = cfg.pca_components
    generator = local_generator(generator, cfg.pca_seed, x.device)
    proj = _projections(
        x.reshape(b * heads, n, d),  # (B*heads, S*S, d)
        c, cfg.pca_method, cfg.pca_oversample, cfg.pca_niter, generator,
    )  # (B*heads, c, S*S)
    proj = proj.reshape(b, heads * c, hl, wl)  # (B, heads*c, h_l, w_l), head-major, row-major pixels
    if out is None:
        out = torch.empty(b, heads * c, gh, gw, device=x.device, dtype=torch.float32)
    elif tuple(out.shape) != (b, heads * c, gh, gw) or out.dtype != torch.float32:
        raise ValueError(f"`out` has to be a float32 tensor of shape {(b, heads * c, gh, gw)} but is "
                         f"{out.dtype} {tuple(out.shape)}")
    if (hl, wl) == (gh, gw):
        out.copy_(proj)
    else:
        resize(proj, (gh, gw), mode="nearest", out=out)  # (B, heads*c, h, w)
    return out


def _check_layer(x: Tensor, name: str, cfg: PCCConfig, size=None) -> tuple[int, int, int, int, tuple]:
    """A (B, heads, h_l*w_l, d) layer of ``grouped_headwise_features``; returns (B, heads, N, d, (h_l, w_l))."""
    check_tensor(x, name, 4, floating=True)
    b, heads, n, d = x.shape
    hw = _layer_hw(n, size, name)
    if b == 0 or heads == 0:
        raise ValueError(f"`{name}` has to hold at least one image and head but has shape {tuple(x.shape)}")
    _validate(x.select(0, 0), cfg.pca_components, cfg.pca_method, cfg.pca_oversample, cfg.pca_niter)  # (heads, N, d)
    return b, heads, n, d, hw


def _eigh_grouped(mats: list) -> list:
    """Ascending eigenvectors of every (B_i, m_i, m_i) float64 stack in ``mats``, one
    ``torch.linalg.eigh`` (one error-check sync on a GPU) per distinct size m."""
    out = [None] * len(mats)
    by_size: dict = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[-1], []).append(i)
    for idx in by_size.values():
        _, evecs = torch.linalg.eigh(torch.cat([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]])  # (sum B_i, m, m)
        for i, part in zip(idx, evecs.split([mats[i].shape[0] for i in idx])):
            out[i] = part
    return out


def grouped_headwise_features(layers, grid, cfg: Optional[PCCConfig] = None, sizes=None) -> list:
    """``headwise_features`` of several layers at once, batched over layers, images and heads.

    Layers of the same shape form one group and one batch of PCA problems; the randomised
    solver's (q x q) eigenproblems of all groups (the exact solver's (d x d) ones, per d) go to
    a single ``torch.linalg.eigh``. Every item starts from the test matrix of a generator
    seeded with ``cfg.pca_seed`` (as each ``headwise_features`` call with its default
    generator), so an image's features depend neither on its batch-mates nor on the other
    layers. No host sync but one finiteness check for all layers and one per ``eigh``.

    Args:
        layers: L tensors (B, heads_l, h_l*w_l, d_l), per-head attention outputs (row-major pixels).
        grid: output (h, w), or one side for a square grid; nearest-neighbour upsampling from
            each (h_l, w_l).
        cfg: PCA settings, as for ``headwise_features`` (reference defaults when None).
        sizes: L pairs (h_l, w_l); None for square layers.

    Returns:
        L tensors (B, heads_l * n_components, h, w) float32, head-major channels; equal to
        ``headwise_features(layers[l], grid, cfg, size=sizes[l])``.
    """
    cfg = cfg or PCCConfig()
    layers = list(layers)
    gh, gw = _hw(grid, "grid")
    if sizes is not None and len(sizes) != len(layers):
        raise ValueError(f"`sizes` has to give one (h, w) per layer ({len(layers)}) but gives {len(sizes)}")
    c, method = cfg.pca_components, cfg.pca_method
    shapes = [_check_layer(x, f"layers[{i}]", cfg, None if sizes is None else sizes[i]) for i, x in enumerate(layers)]
    if not layers:
        return []
    groups: dict = {}  # (heads, N, d, (h_l, w_l), device) -> layer indices
    for i, x in enumerate(layers):
        groups.setdefault((*x.shape[1:], shapes[i][4], x.device), []).append(i)
    data, means, grams = [], [], []
    for idx in groups.values():
        xs = [layers[i] for i in idx]
        n, d = xs[0].shape[-2:]
        x = (torch.stack(xs) if len(xs) > 1 else xs[0]).reshape(-1, n, d).float()  # (L_g*B*heads, N, d)
        mean = x.mean(dim=1, keepdim=True)  # (L_g*B*heads, 1, d)
        data.append(x)
        means.append(mean)
        grams.append(_centred_gram(x, mean, n))  # (L_g*B*heads, d, d)
    finite = torch.stack([torch.isfinite(g).all() for g in grams]).all()
    if not bool(finite):  # the one check for all layers
        bad = [i for i, x in enumerate(layers) if not bool(torch.isfinite(x).all())]
        raise ValueError(
            f"`layers` have to be finite but {len(bad)} of {len(layers)} hold NaN or infinite values "
            f"(e.g. layers[{bad[0]}] of shape {tuple(layers[bad[0]].shape)})"
        )
    if method == "eigh":
        comps = [evecs[..., -c:].flip(-1).transpose(1, 2).to(g.dtype)  # (G, c, d), descending
                 for g, evecs in zip(grams, _eigh_grouped([g.double() for g in grams]))]
    else:
        starts: dict = {}  # (d, q, device) -> start; one per shape, as a fresh generator gives it
        bases, smalls = [], []
        for x, g in zip(data, grams):
            n, d = x.shape[1:]
            q = min(c + cfg.pca_oversample, n, d)
            if (d, q, x.device) not in starts:
                starts[(d, q, x.device)] = _lowrank_start(d, q, local_generator(None, cfg.pca_seed, x.device), g)
            basis, small = _lowrank_subspace(g, starts[(d, q, x.device)], cfg.pca_niter)
            bases.append(basis)
            smalls.append(small)
        comps = [_ritz_components(basis, evecs, c) for basis, evecs in zip(bases, _eigh_grouped(smalls))]
    out = [None] * len(layers)
    for idx, x, mean, comp in zip(groups.values(), data, means, comps):
        comp = _flip_signs(comp)  # (G, c, d)
        proj = torch.baddbmm(-(comp @ mean.transpose(1, 2)), comp, x.transpose(1, 2))  # (G, c, N)
        for i, part in zip(idx, proj.chunk(len(idx))):
            b, heads, _, _, (hl, wl) = shapes[i]
            part = part.reshape(b, heads * c, hl, wl)  # (B, heads*c, h_l, w_l), head-major
            out[i] = part if (hl, wl) == (gh, gw) else resize(part, (gh, gw), mode="nearest")  # (B, heads*c, h, w)
    return out
