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

When ``H`` is singular (fewer tokens than channels, dead channels) the Cholesky fails; we then
add ``λ · mean(diag H) · I`` and retry with a growing ``λ``.
"""

from __future__ import annotations

import torch

from edgellm.hessian import HessianError
from edgellm.lowrank.svd import LowRankError, check_rank, energy_kept, split_factors, svd

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
    ``L`` from :func:`whitening` (reuse it for linears that read the same input).  With
    ``return_info`` also ``{"damp": λ, "energy_kept": …}`` (energy of ``W L``).
    """
    m, n = W.shape
    check_rank(m, n, rank)
    lam = None
    if L is None:
        if H is None or H.shape != (n, n):
            raise LowRankError(f"SVD-LLM needs H = 2 XᵀX / n of shape ({n}, {n}); got "
                               f"{None if H is None else tuple(H.shape)}")
        L, lam = whitening(H)
    U, S, Vh = svd(W.double() @ L)  # SVD of the whitened weights W L, (m, k) (k,) (k, n)
    # V_rᵀ L⁻¹ without forming L⁻¹: solve Z L = V_rᵀ (L lower triangular)
    Vh_r = torch.linalg.solve_triangular(L, Vh[:rank], upper=False, left=False)  # (r, n)
    B, A = split_factors(U[:, :rank], S[:rank], Vh_r, rank)
    if return_info:
        return B, A, {"damp": lam, "energy_kept": energy_kept(S, rank)}
    return B, A
