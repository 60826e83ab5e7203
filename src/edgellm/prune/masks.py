"""Pruning masks from importance scores: unstructured (per row, per layer, global) and N:M.

A mask is a bool tensor shaped like the weights: ``True`` keeps a weight, ``False`` prunes it.
Every mask here prunes *exactly* the requested number of weights: scores are ranked with a
stable sort, so among equal scores the one with the lower index is pruned first (a
deterministic tie-break; a threshold ``scores > t`` would keep or drop whole runs of ties).
"""

from __future__ import annotations

import torch

from edgellm.errors import EdgeLLMError


class PruneError(EdgeLLMError, ValueError):
    """Bad pruning input (sparsity, N:M pattern, ratio); the message says what to do."""


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1); raises :class:`PruneError` otherwise."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise PruneError(f"sparsity={sparsity!r} is not a number; use a fraction in [0, 1), "
                         "e.g. 0.5") from None
    if not 0.0 <= s < 1.0:
        raise PruneError(f"sparsity={sparsity} is outside [0, 1): it is the fraction of weights "
                         "removed (0.5 = half); 1.0 would remove every weight")
    return s


def check_nm(n: int, m: int, in_features: int | None = None) -> tuple[int, int]:
    """Validate an N:M pattern (keep ``n`` of every ``m`` consecutive inputs)."""
    n, m = int(n), int(m)
    if m < 1 or n < 1 or n >= m:
        raise PruneError(f"N:M = {n}:{m} is not a sparsity pattern: it keeps N of every M "
                         "weights, so 1 <= N < M is needed (e.g. 2:4 or 4:8)")
    if in_features is not None and in_features % m:
        divisors = [d for d in (2, 4, 8, 16, 32) if in_features % d == 0]
        raise PruneError(f"M={m} does not divide in_features={in_features}; use M in {divisors}")
    return n, m


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``."""
    try:
        n, m = (int(t) for t in str(text).split(":"))
    except ValueError:
        raise PruneError(f"N:M pattern {text!r} is not of the form N:M, e.g. 2:4") from None
    return check_nm(n, m)


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over the last dim of ``scores`` (..., n) pruning its ``k`` lowest entries."""
    order = torch.argsort(scores, dim=-1, stable=True)  # ascending; ties: lower index first
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[..., :k], False)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per: str = "row") -> torch.Tensor:
    """Keep-mask pruning the lowest-scoring fraction ``sparsity`` of ``scores`` (out, in).

    ``per="row"`` prunes ``floor(sparsity · in)`` weights in every output row (Wanda's
    comparison group); ``per="layer"`` prunes ``floor(sparsity · out · in)`` over the whole
    matrix.  Returns a bool tensor (out, in), ``True`` = keep.
    """
    s = check_sparsity(sparsity)
    if scores.dim() != 2:
        raise PruneError(f"scores must be (out, in); got shape {tuple(scores.shape)}")
    if per == "row":
        return _prune_lowest(scores.float(), int(s * scores.shape[1]))
    if per == "layer":
        flat = scores.float().flatten()
        return _prune_lowest(flat, int(s * flat.numel())).view_as(scores)
    raise PruneError(f"per={per!r}: use 'row' or 'layer'")


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask: in every run of ``m`` consecutive inputs of a row keep the ``n`` best.

    ``scores`` (out, in) with ``m`` dividing ``in``; returns bool (out, in) with exactly ``n``
    ``True`` per group of ``m`` (2:4 is what NVIDIA's sparse tensor cores run).
    """
    if scores.dim() != 2:
        raise PruneError(f"scores must be (out, in); got shape {tuple(scores.shape)}")
    n, m = check_nm(n, m, scores.shape[1])
    g = scores.float().reshape(scores.shape[0], -1, m)  # (out, in/m, m)
    return _prune_lowest(g, m - n).reshape(scores.shape)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all matrices: prune the lowest ``sparsity`` of every score together.

    Ties at the threshold are pruned in order (matrices in the dict's order, then row-major),
    so exactly ``floor(sparsity · total)`` weights go.  Returns ``{name: mask}``.
    """
    s = check_sparsity(sparsity)
    total = sum(v.numel() for v in scores.values())
    k = int(s * total)
    if k == 0:
        return {n: torch.ones_like(v, dtype=torch.bool) for n, v in scores.items()}
    flat = torch.cat([v.float().flatten() for v in scores.values()])  # (total,)
    t = flat.kthvalue(k).values  # the k-th smallest score
    below = int((flat < t).sum())
    ties_left = k - below  # how many scores equal to t are pruned, first ones first
    masks = {}
    for name, v in scores.items():
        v = v.float()
        keep = v > t
        eq = (v == t).flatten()
        if ties_left > 0 and eq.any():
            idx = eq.nonzero().squeeze(1)[:ties_left]
            flat_keep = keep.flatten().clone()
            eq_keep = eq.clone()
            eq_keep[idx] = False  # these ties are pruned
            flat_keep |= eq_keep
            keep = flat_keep.view_as(v)
            ties_left -= len(idx)
        else:
            keep = keep | (v == t)
        masks[name] = keep
    return masks


def sparsity_of(W: torch.Tensor) -> float:
    """Fraction of exact zeros in a tensor."""
    return (W == 0).sum().item() / max(W.numel(), 1)


def is_nm(W: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at most ``n`` nonzeros."""
    if W.shape[-1] % m:
        return False
    return bool(((W.reshape(*W.shape[:-1], -1, m) != 0).sum(-1) <= n).all())


def nm_storage_bytes(shape: tuple[int, int], n: int = 2, m: int = 4, *,
                     value_bits: int = 16) -> dict:
    """Bytes of an N:M matrix stored compressed (kept values + index of each within its group).

    Each kept value needs ``ceil(log2 m)`` index bits (2 bits for 2:4, 3 for 4:8), as NVIDIA's
    sparse format stores them.  Returns dense and compressed bytes and their ratio.
    """
    import math

    out_f, in_f = shape
    n, m = check_nm(n, m, in_f)
    kept = out_f * in_f * n // m
    idx_bits = math.ceil(math.log2(m))
    dense = out_f * in_f * value_bits / 8
    values = kept * value_bits / 8
    index = kept * idx_bits / 8
    return {"dense_bytes": dense, "values_bytes": values, "index_bytes": index,
            "compressed_bytes": values + index, "ratio": (values + index) / dense,
            "bits_per_weight": (values + index) * 8 / (out_f * in_f)}


def select_mask(scores: torch.Tensor, sparsity: float | None = 0.5, nm: tuple[int, int] | None = None,
                *, per: str = "row") -> torch.Tensor:
    """The keep-mask for ``scores`` (out, in): N:M when ``nm=(n, m)`` is given, else unstructured."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, 0.0 if sparsity is None else sparsity, per=per)
