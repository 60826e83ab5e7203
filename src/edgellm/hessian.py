"""The layer Hessian of the calibration objective, one convention for every technique.

For a linear layer ``y = x Wᵀ`` and calibration inputs ``X`` (n, in), the squared output error
of a weight change ``ΔW`` is ``‖X ΔWᵀ‖² / n = tr(ΔW H ΔWᵀ) / 2`` with

    H = 2 XᵀX / n        (in, in), the Hessian of that error in each row of W

(the convention of OBS, GPTQ and SparseGPT).  GPTQ, SparseGPT, AWQ, imatrix and LWC all use this
``H``; a method that needs only ``diag(XᵀX)`` takes ``diag(H) / 2``.
"""

from __future__ import annotations

import torch

from edgellm.errors import EdgeLLMError


class HessianError(EdgeLLMError, ValueError):
    """The damped Hessian is not positive definite (too few tokens, or too little damping)."""


def hinv_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)⁻¹`` (in, in) float32, so
    that ``H⁻¹ = Uᵀ U``.  GPTQ and SparseGPT read row ``i`` of ``U`` as the inverse-Hessian
    row that the lazy updates need after columns ``< i`` are fixed."""
    n = H.shape[0]
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)  # H⁻¹ from its Cholesky factor
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise HessianError(f"the damped Hessian ({n}×{n}) is not positive definite; increase "
                           f"damp (now {damp}) or use more calibration tokens") from None


def layer_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor | None = None, *,
                H: torch.Tensor | None = None) -> float:
    """Mean squared output error of a linear layer, ``‖(W − Q) Xᵀ‖² / n_tokens``.

    ``W``, ``Q`` (out, in); either raw inputs ``X`` (..., in) or ``H = 2 XᵀX / n`` (in, in),
    with which the error is ``tr(ΔW H ΔWᵀ) / 2`` without touching the tokens again.
    """
    D = (W.float() - Q.float())  # (out, in)
    if X is not None:
        X2 = X.reshape(-1, X.shape[-1]).float()  # (n, in)
        return (X2 @ D.T).square().sum().item() / X2.shape[0]
    return ((D @ H.float()) * D).sum().item() / 2
