"""Magnitude pruning: remove the weights with the smallest |w| (per row, per layer or global).

The oldest baseline (Han et al., 2015, "Learning both Weights and Connections").  It ignores
the inputs: a small weight on a channel with huge activations (LLMs have such outlier
features) matters more than a big weight on a quiet channel, which is what Wanda fixes.
"""

from __future__ import annotations

import torch

from edgellm.prune.layers import apply_mask, check_target, prunable_linears, sparsity_stats
from edgellm.prune.masks import PruneError, global_masks, select_mask


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """Importance of each weight, ``|W|`` (out, in) float32."""
    return W.detach().float().abs()


@torch.no_grad()
def magnitude_prune(W: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None, *,
                    per: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one matrix ``W`` (out, in); returns ``(pruned W, keep-mask)``."""
    mask = select_mask(magnitude_scores(W), sparsity, nm, per=per)
    return W * mask, mask


@torch.no_grad()
def apply_magnitude(model, calib=None, sparsity: float | None = 0.5,
                    nm: tuple[int, int] | None = None, *, scope: str = "row",
                    progress: bool = False) -> dict:
    """Magnitude-prune the decoder's linears in place; return :func:`sparsity_stats`.

    ``scope``: ``"row"`` (same sparsity in every output row), ``"layer"`` (same sparsity in
    every matrix) or ``"global"`` (one threshold over all matrices: layers end up with very
    different sparsities).  ``nm=(2, 4)`` gives the N:M pattern instead (scope ignored).
    ``calib`` is accepted and ignored (magnitude needs no data).
    """
    linears = prunable_linears(model)
    sparsity, nm = check_target(sparsity, nm, linears)
    if scope not in ("row", "layer", "global"):
        raise PruneError(f"scope={scope!r}: use 'row', 'layer' or 'global'")
    if scope == "global" and nm is None:
        masks = global_masks({n: magnitude_scores(lin.weight) for n, lin in linears.items()},
                             sparsity)
        for name, lin in linears.items():
            apply_mask(lin, masks[name])
    else:
        for lin in linears.values():
            apply_mask(lin, select_mask(magnitude_scores(lin.weight), sparsity, nm,
                                        per="layer" if scope == "layer" else "row"))
    return sparsity_stats(model, linears)
