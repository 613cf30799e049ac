"""Truncated factorisations of a teacher weight W (out, in), all computed in float64 on the weight's device.

Plain:     W   ~ U_r S_r V_r^T                      (best rank r in Frobenius norm)
Whitened:  W L ~ U_r S_r V_r^T,  W_r = U_r S_r V_r^T L^-1   with L L^T = X^T X over calibration inputs X,
           the rank-r W_r minimising ||(W - W_r) X^T||_F (SVD-LLM). Its error is sum_{i>r} S_i^2.
"""

from __future__ import annotations

from typing import Callable

import torch

SVD_OVERSAMPLING = 8  # extra columns for the randomised SVD's subspace (torch.svd_lowrank's `q`)
EIGEN_FLOOR = 1e-12  # smallest eigenvalue kept by the eigen fallback, relative to the largest


def truncated_svd(
    weight: torch.Tensor, rank: int, method: str = "svd", niter: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Top-`rank` SVD of `weight` (out, in) in float64, whatever the model dtype.

    float64 because real weights have near-degenerate singular values (MiniLM has sigma_128 / sigma_129 =
    1.0004), where float32 picks a rotated subspace; it costs ~1.4x float32 on CPU.
    Returns U_r (out, r), S_r (r,), Vh_r (r, in) and the fraction of ||W||_F^2 ("energy") kept.
    """
    w = weight.detach().to(torch.float64)
    if method == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    elif method == "svd_lowrank":
        q = min(rank + SVD_OVERSAMPLING, *w.shape)
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        raise ValueError(f"Unknown SVD method {method!r}; allowed: 'svd', 'svd_lowrank'.")
    total = torch.linalg.vector_norm(w).square()  # ||W||_F^2 without a squared copy of W
    energy = float(s.square().sum() / total) if total > 0 else 1.0
    return u, s, vh, energy


def whitening(gram: torch.Tensor, damping: float = 0.0) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A square root L (L L^T = X^T X + damping * mean(diag) * I) and the map vh -> vh L^-1.

    Cholesky when the matrix is positive definite; otherwise (few or degenerate calibration inputs) the
    eigen-decomposition root Q diag(sqrt(lambda)), with eigenvalues floored at EIGEN_FLOOR * lambda_max.
    Along a floored direction q the rank-r weight becomes U_r U_r^T W q, so the floor never amplifies noise.
    """
    g = gram.to(torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("The calibration inputs' second moment X^T X has NaN or Inf values.")
    if damping:
        g = g.clone()  # the caller's gram stays as it was; no identity matrix is built
        g.diagonal().add_(damping * g.diagonal().mean())
    root, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return root, lambda vh: torch.linalg.solve_triangular(root, vh, upper=False, left=False)
    evals, evecs = torch.linalg.eigh(g)
    if evals[-1] <= 0:
        raise ValueError("The calibration inputs' second moment X^T X is zero: every input row this layer saw was "
                         "zero or padding (attention_mask 0).")
    sqrt_evals = evals.clamp_min(EIGEN_FLOOR * evals[-1]).sqrt()
    return evecs * sqrt_evals, lambda vh: (vh / sqrt_evals) @ evecs.T


def whitened_svd(
    weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Activation-aware top-`rank` factors: U_r (out, r), S_r (r,), V_r^T L^-1 (r, in), and the fraction of the
    calibration output energy ||W X^T||_F^2 kept (same contract as `truncated_svd`)."""
    root, unwhiten = whitening(gram.to(weight.device), damping)
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64) @ root, full_matrices=False)
    total = s.square().sum()
    energy = float(s[:rank].square().sum() / total) if total > 0 else 1.0
    return u[:, :rank], s[:rank], unwhiten(vh[:rank]), energy


def spectrum(weight: torch.Tensor, gram: torch.Tensor | None = None, damping: float = 0.0) -> torch.Tensor:
    """Singular values (float64, descending) of W, or of W L when a calibration `gram` X^T X is given."""
    w = weight.detach().to(torch.float64)
    if gram is not None:
        w = w @ whitening(gram.to(weight.device), damping)[0]
    return torch.linalg.svdvals(w)
