"""ASVD (Yuan et al., 2023, "ASVD: Activation-aware Singular Value Decomposition for
Compressing Large Language Models").

Plain SVD treats every input channel alike, but LLM activations are not alike: a few channels
carry much larger values, so an error in their weight columns costs more at the output.  ASVD
scales the input channels by the activation magnitude before truncating:

    S = diag(s),  s_j = (mean_t |x_tj|)^α      (α = 0.5)
    W = (W S) S⁻¹ ≈ [U_r Σ_r V_rᵀ]_{W S} S⁻¹

and folds ``S⁻¹`` back into the second factor: ``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ S⁻¹``.
Columns with large activations are thus approximated more accurately.
"""

from __future__ import annotations

import torch

from edgellm.lowrank.svd import LowRankError, check_rank, energy_kept, split_factors, svd


def asvd_scale(mean_abs: torch.Tensor, alpha: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Per-input-channel scale ``s = (mean |x|)^α`` (in,) float64; channels that were always
    zero get ``eps^α`` (any positive value: their columns do not affect the output)."""
    if not 0 <= alpha <= 1:
        raise LowRankError(f"alpha={alpha} must lie in [0, 1] (0 = plain SVD, 0.5 = ASVD's "
                           "default)")
    return mean_abs.detach().double().clamp_min(eps).pow(alpha)


@torch.no_grad()
def asvd_factors(W: torch.Tensor, mean_abs: torch.Tensor, rank: int, alpha: float = 0.5,
                 *, return_energy: bool = False):
    """ASVD factors of ``W`` (out, in) given ``mean_abs`` (in,), the mean |x| per input
    channel: ``(B, A)`` float32, ``B`` (out, r), ``A`` (r, in), ``W ≈ B @ A``.  With
    ``return_energy`` also the energy kept of ``W S``."""
    m, n = W.shape
    check_rank(m, n, rank)
    if mean_abs.shape != (n,):
        raise LowRankError(f"mean_abs has shape {tuple(mean_abs.shape)}; need ({n},), one value "
                           "per input channel")
    s = asvd_scale(mean_abs, alpha)  # (in,)
    U, S, Vh = svd(W.double() * s)  # SVD of W S: column j scaled by s_j
    B, A = split_factors(U, S, Vh / s, rank)  # Vᵀ S⁻¹: fold the scale back
    return (B, A, energy_kept(S, rank)) if return_energy else (B, A)
