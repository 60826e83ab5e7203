"""The layer Hessian of the calibration objective, one convention for every technique.

For a linear layer ``y = x Wᵀ`` and calibration inputs ``X`` (n, in), the squared output error
of a weight change ``ΔW`` is ``‖X ΔWᵀ‖² / n = tr(ΔW H ΔWᵀ) / 2`` with

    H = 2 XᵀX / n        (in, in), the Hessian of that error in each row of W

(the convention of OBS, GPTQ and SparseGPT).  GPTQ, SparseGPT, AWQ, imatrix and LWC all use this
``H``, accumulated over calibration batches by :func:`accumulate`; a method that needs a
different scale writes the factor where it uses it (imatrix's ``mean x²`` is ``diag(H) / 2``,
LWC's per-token loss is ``tr(ΔW H ΔWᵀ) / 2``).
"""

from __future__ import annotations

import torch

from edgellm.errors import EdgeLLMError


class HessianError(EdgeLLMError, ValueError):
    """The damped Hessian is not positive definite (too few tokens, or too little damping)."""


def accumulate(xtx: torch.Tensor | None, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch of inputs ``X`` (..., in) to the running sum ``xtx = Σ xᵀx`` (in, in) float32.

    Returns ``(xtx, m)``: the sum updated in place (a new tensor when ``xtx`` is ``None``) and
    the number ``m`` of rows added.  The sum, not ``H`` itself, is kept while batches arrive so
    that ``H`` does not depend on how the tokens were batched; :func:`from_sum` turns it into
    ``H`` once.
    """
    X2 = X.reshape(-1, X.shape[-1]).float()  # (m, in)
    xtx = X2.T @ X2 if xtx is None else xtx.addmm_(X2.T, X2)
    return xtx, X2.shape[0]


def from_sum(xtx: torch.Tensor, n: int) -> torch.Tensor:
    """``H = 2 XᵀX / n`` (in, in) from the sum ``xtx = Σ xᵀx`` over ``n`` rows."""
    return 2 * xtx / max(n, 1)


def from_inputs(X: torch.Tensor) -> torch.Tensor:
    """``H = 2 XᵀX / n`` (in, in) float32 of raw inputs ``X`` (..., in), flattened to n rows."""
    return from_sum(*accumulate(None, X))


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
                H: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared output error of a linear layer, ``‖(W − Q) Xᵀ‖² / n_tokens``: a 0-d tensor.

    ``W``, ``Q`` (out, in); either raw inputs ``X`` (..., in) or ``H = 2 XᵀX / n`` (in, in),
    with which the error is ``tr(ΔW H ΔWᵀ) / 2`` without touching the tokens again.  The
    result keeps its autograd graph (LWC trains on it); ``float(...)`` for a number.
    """
    D = W.float() - Q.float()  # ΔW (out, in)
    if X is not None:
        X2 = X.reshape(-1, X.shape[-1]).float()  # (n, in)
        return (X2 @ D.T).square().sum() / X2.shape[0]
    if H is None:
        raise HessianError("layer_error needs the inputs X (tokens, in) or H = 2 XᵀX / n (in, in)")
    return ((D @ H.float()) * D).sum() / 2  # tr(ΔW H ΔWᵀ) / 2
