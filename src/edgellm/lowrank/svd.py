"""Truncated SVD of a weight matrix: the best rank-r approximation and what it saves.

A linear layer ``y = x Wᵀ`` with ``W`` (m, n) = (out, in) costs ``m·n`` parameters.  Written as
two thinner layers, ``W ≈ B A`` with ``B`` (m, r) and ``A`` (r, n), it costs ``r·(m + n)``.
Eckart–Young (1936): the truncated SVD ``W_r = U_r Σ_r V_rᵀ`` is the best rank-r approximation
in the Frobenius norm, and its error is the energy of the dropped singular values,

    ‖W − W_r‖²_F = Σ_{i>r} σ_i².

The factorization only saves parameters below the break-even rank

    r·(m + n) < m·n   ⇔   r < m·n / (m + n)

(288 for a 576×576 attention projection, 144 for a 192×576 k/v projection, ≈ 419 for the
1536×576 MLP matrices of SmolLM2-135M), and a rank ≥ min(m, n) reproduces ``W`` exactly while
costing more: it is refused.
"""

from __future__ import annotations

import math
import warnings

import torch

from edgellm.errors import EdgeLLMError


class LowRankError(EdgeLLMError, ValueError):
    """A rank, ratio or method that cannot be used; the message says what to give instead."""


class LowRankWarning(UserWarning):
    """A rank at or above the break-even: the two factors hold more parameters than ``W``."""


def break_even_rank(m: int, n: int) -> float:
    """``m·n / (m + n)``: ranks strictly below it save parameters on an (m, n) matrix."""
    return m * n / (m + n)


def factor_params(m: int, n: int, rank: int) -> int:
    """Parameters of the two factors ``B`` (m, r) and ``A`` (r, n): ``r·(m + n)``."""
    return rank * (m + n)


def check_rank(m: int, n: int, rank: int, name: str = "W") -> str | None:
    """Raise :class:`LowRankError` unless ``1 ≤ rank < min(m, n)``; return a warning text
    (``None`` if none) when ``rank`` is at or above the break-even ``m·n / (m + n)``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LowRankError(f"{name}: rank={rank!r} must be a positive integer")
    if rank >= min(m, n):
        raise LowRankError(
            f"{name} ({m}×{n}): rank {rank} ≥ min(m, n) = {min(m, n)} keeps W exactly and costs "
            f"more parameters; use a rank below the break-even {break_even_rank(m, n):.0f} "
            f"(m·n/(m+n)) to save anything")
    be = break_even_rank(m, n)
    if rank >= be:
        return (f"{name} ({m}×{n}): rank {rank} is at or above the break-even rank "
                f"{be:.1f} = m·n/(m+n): the factors hold {factor_params(m, n, rank)} parameters, "
                f"W holds {m * n}; use a rank below {math.ceil(be)} to save parameters")
    return None


def warn_rank(m: int, n: int, rank: int, name: str = "W") -> str | None:
    """:func:`check_rank`, issuing its text as a :class:`LowRankWarning`; returns the text."""
    text = check_rank(m, n, rank, name)
    if text:
        warnings.warn(text, LowRankWarning, stacklevel=2)
    return text


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """The rank that removes a fraction ``ratio`` of an (m, n) matrix's parameters:
    ``r = ⌊(1 − ratio) · m·n / (m + n)⌋`` (at least 1)."""
    check_ratio(ratio)
    return max(1, int((1 - ratio) * break_even_rank(m, n)))


def check_ratio(ratio: float) -> None:
    """``ratio`` (fraction of parameters removed) must lie strictly between 0 and 1."""
    try:
        ok = 0 < float(ratio) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise LowRankError(f"ratio={ratio!r} is the fraction of the factorized layers' parameters "
                           "removed; give a number strictly between 0 and 1 (0.2 keeps 80 %)")


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD: ``U`` (m, k), ``S`` (k,), ``Vh`` (k, n), k = min(m, n), returned as float64.

    Computed in float32 (the weights' own precision; 4× faster than float64 on a CPU, which
    matters for 210 matrices), then widened so that whitening and folding run in float64."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    return U.double(), S.double(), Vh.double()


def energy_kept(S: torch.Tensor, rank: int) -> float:
    """Fraction of ``Σ σ_i²`` in the first ``rank`` singular values."""
    e = S.double().square()
    return float(e[:rank].sum() / e.sum()) if e.sum() > 0 else 1.0


def energy_curve(S: torch.Tensor) -> torch.Tensor:
    """Energy kept by every rank 1…k: (k,) float64, ``cumsum(σ²) / Σ σ²``."""
    e = S.double().square()
    return e.cumsum(0) / e.sum().clamp_min(torch.finfo(torch.float64).tiny)


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int):
    """``(B, A)`` float32 from a (thin) SVD truncated to ``rank``: ``B = U_r √Σ_r`` (m, r),
    ``A = √Σ_r V_rᵀ`` (r, n).  Splitting Σ evenly keeps both factors on one scale (the
    product ``B A = U_r Σ_r V_rᵀ`` is the same as with ``B = U_r``, ``A = Σ_r V_rᵀ``)."""
    s = S[:rank].sqrt()  # (r,)
    B = U[:, :rank] * s  # (m, r)
    A = s[:, None] * Vh[:rank]  # (r, n)
    return B.float(), A.float()


@torch.no_grad()
def truncated_svd(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``W`` (out, in): ``(B, A)`` float32 with ``W ≈ B @ A``,
    ``B`` (out, r), ``A`` (r, in).  Raises :class:`LowRankError` for rank ≥ min(out, in)."""
    if W.dim() != 2:
        raise LowRankError(f"expected a 2-D (out_features, in_features) weight, got shape "
                           f"{tuple(W.shape)}")
    check_rank(*W.shape, rank)
    U, S, Vh = svd(W)
    return split_factors(U, S, Vh, rank)


def tail_energy(W: torch.Tensor, rank: int) -> float:
    """``Σ_{i>r} σ_i²``: the squared Frobenius error of the best rank-``rank`` approximation."""
    S = torch.linalg.svdvals(W.detach().double())
    return float(S[rank:].square().sum())
