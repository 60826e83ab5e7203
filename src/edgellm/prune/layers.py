"""Which weights are pruned, and what pruning achieved (the honest accounting)."""

from __future__ import annotations

import torch
from torch import nn

from edgellm.prune.masks import PruneError, check_nm, check_sparsity, sparsity_of


def prunable_linears(model) -> dict[str, nn.Linear]:
    """The decoder's linear layers (q/k/v/o, gate/up/down); the tied embedding / lm_head stays dense.

    Pruning the lm_head would also prune the embedding it shares its weights with.
    """
    from edgellm.models import linear_layers

    lins = linear_layers(model)
    if not lins:
        raise PruneError(f"{type(model).__name__} has no linear layers to prune")
    return lins


def check_target(sparsity, nm, linears: dict[str, nn.Linear]):
    """Validate ``sparsity`` / ``nm`` against the layers; returns ``(sparsity, nm)``."""
    if nm is not None:
        n, m = nm
        for name, lin in linears.items():
            try:
                check_nm(n, m, lin.in_features)
            except PruneError as e:
                raise PruneError(f"{name}: {e}") from None
        return None, (int(n), int(m))
    return check_sparsity(0.5 if sparsity is None else sparsity), None


def sparsity_stats(model, linears: dict[str, nn.Linear] | None = None) -> dict:
    """Achieved sparsity: per layer (fraction of zero weights) and over all pruned linears.

    Returns ``{"layers": {name: sparsity}, "sparsity": overall, "n_zero": ..., "n_weights": ...}``
    (the tied embedding / lm_head is not included).
    """
    linears = prunable_linears(model) if linears is None else linears
    per, zeros, total = {}, 0, 0
    for name, lin in linears.items():
        w = lin.weight
        per[name] = sparsity_of(w)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"layers": per, "sparsity": zeros / max(total, 1), "n_zero": zeros, "n_weights": total}


@torch.no_grad()
def apply_mask(lin: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the pruned weights of ``lin`` in place (``mask`` True = keep)."""
    lin.weight.mul_(mask.to(lin.weight.dtype))
