"""SVD-LLM (Wang, Zheng, Zhang, Zhang, 2024, "SVD-LLM: Truncation-aware Singular Value
Decomposition for Large Language Model Compression"): truncation-aware data whitening.

What matters is not ‖W − W'‖ but the layer's output error on real inputs ``X`` (n, in).  With
the project's Hessian ``H = 2 XᵀX / n`` (:mod:`edgellm.hessian`) and its Cholesky factor
``L`` (lower, ``H = L Lᵀ``):

    ‖(W − W') Xᵀ‖²_F / n = tr(ΔW H ΔWᵀ) / 2 = ‖(W − W') L‖²_F / 2.

So the output error is a plain Frobenius error after whitening by ``L``, and Eckart–Young
applies to ``W L``: truncate ``W L = U Σ Vᵀ`` to rank r and undo the whitening,

    W' = U_r Σ_r V_rᵀ L⁻¹,     B = U_r,  A = Σ_r V_rᵀ L⁻¹     (we put √Σ_r on each side),

which is the *optimal* rank-r layer for these inputs, and each dropped singular value costs
exactly ``σ_i² / 2`` of mean squared output error (truncation-aware: the singular values of
``W L`` rank the directions by their effect on the output).  The paper factors ``XᵀX`` itself;
``L`` of ``H`` is ``√(2/n)`` times that factor, a scalar that cancels between the SVD and
``L⁻¹``, so the factors are identical.

**How the SVD of ``W L`` is computed** (the factors are the same; only the cost differs): from
the eigendecomposition of the smaller of its two Gram matrices, in float64 (squaring the
singular values then costs no accuracy that float32 weights have), which on a CPU is several
times faster than a thin SVD.  For a weight no taller than wide (``out ≤ in``: q, k, v, o and
down_proj here), ``(W L)(W L)ᵀ = W H Wᵀ = U Σ² Uᵀ`` and ``Σ_r V_rᵀ L⁻¹ = U_rᵀ W``, so

    W' = U_r U_rᵀ W,     B = U_r √Σ_r,  A = Σ_r^{-1/2} U_rᵀ W:

the projection of ``W`` onto the ``r`` output directions that carry most of the layer's output
energy, with no Cholesky and no solve, and ``H`` need not be invertible.  A taller weight
(gate/up_proj, 1536 × 576) uses ``(W L)ᵀ (W L) = V Σ² Vᵀ`` (in × in) and
``U_r = W L V_r Σ_r⁻¹``; it needs ``L``.

When ``H`` is singular (fewer tokens than channels, dead channels) the Cholesky fails; we then
add ``λ · mean(diag H) · I`` and retry with a growing ``λ``.
"""

from __future__ import annotations

import torch

from edgellm.hessian import HessianError
from edgellm.lowrank.svd import LowRankError, check_rank, energy_kept

DAMPS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def whitening(H: torch.Tensor, damps=DAMPS) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor ``L`` (in, in) float64 of ``H + λ·mean(diag H)·I`` with the first
    ``λ`` of ``damps`` for which it exists; returns ``(L, λ)``."""
    H = H.detach().double()
    mean_diag = H.diagonal().mean().clamp_min(1e-12)
    for lam in damps:
        Hd = H + lam * mean_diag * torch.eye(H.shape[0], dtype=H.dtype) if lam else H
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return L, float(lam)
    raise HessianError(f"H ({H.shape[0]}×{H.shape[0]}) is not positive definite even with "
                       f"damping λ={damps[-1]}; use more calibration tokens")


@torch.no_grad()
def svdllm_factors(W: torch.Tensor, H: torch.Tensor | None = None, rank: int = 1, *,
                   L: torch.Tensor | None = None, return_info: bool = False):
    """SVD-LLM factors of ``W`` (out, in): ``(B, A)`` float32, ``B`` (out, r), ``A`` (r, in).

    ``H`` (in, in) = ``2 XᵀX / n`` of the layer's calibration inputs, or its whitening factor
    ``L`` from :func:`whitening` (reuse it for linears that read the same input).  A weight
    with ``out ≤ in`` given ``H`` needs no ``L`` (see the module).  With ``return_info`` also
    ``{"damp": λ, "energy_kept": …}`` (energy of ``W L``; ``λ`` is 0 when no Cholesky was
    needed, ``None`` when ``L`` was given).
    """
    m, n = W.shape
    check_rank(m, n, rank)
    if H is not None and H.shape != (n, n):
        raise LowRankError(f"SVD-LLM needs H = 2 XᵀX / n of shape ({n}, {n}); got "
                           f"{tuple(H.shape)}")
    if H is None and L is None:
        raise LowRankError(f"SVD-LLM needs H = 2 XᵀX / n of shape ({n}, {n}) or its whitening "
                           "factor L; got neither")
    Wd, lam = W.detach().double(), None
    if m <= n:  # eigen path on W H Wᵀ (out, out)
        G = Wd @ H.detach().double() @ Wd.T if H is not None else (Wd @ L) @ (Wd @ L).T
        S, U_r = _top_eigen(G, rank)
        s = _sqrt_floor(S, rank)
        B, A = U_r * s, (U_r.T @ Wd) / s[:, None]
        lam = 0.0 if H is not None else None
    else:  # eigen path on (W L)ᵀ (W L) (in, in)
        if L is None:
            L, lam = whitening(H)
        M = Wd @ L
        S, V_r = _top_eigen(M.T @ M, rank)
        s = _sqrt_floor(S, rank)
        # V_rᵀ L⁻¹ without forming L⁻¹: solve Z L = V_rᵀ (L lower triangular)
        Z = torch.linalg.solve_triangular(L, V_r.T.contiguous(), upper=False, left=False)
        B, A = (M @ V_r) / s, s[:, None] * Z  # U_r √σ = M V_r / √σ;  √σ V_rᵀ L⁻¹
    B, A = B.float(), A.float()
    if return_info:
        return B, A, {"damp": lam, "energy_kept": energy_kept(S, rank)}
    return B, A


def _top_eigen(G: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ, V_r)``: all singular values ``σ = √eig(G)`` descending and the top-``rank``
    eigenvectors (k, r) of a Gram matrix ``G`` (k, k)."""
    evals, evecs = torch.linalg.eigh((G + G.T) / 2)  # ascending
    return evals.flip(0).clamp_min(0).sqrt(), evecs[:, -rank:].flip(1)


def _sqrt_floor(S: torch.Tensor, rank: int) -> torch.Tensor:
    """``√σ`` of the kept singular values, floored so a zero one never divides."""
    return S[:rank].clamp_min(float(S[0]) * 1e-12 if S[0] > 0 else 1e-300).sqrt()
