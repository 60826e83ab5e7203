"""A bounded, budget-keeping rule that gives each decoder layer its own compression ratio.

Measure each layer's sensitivity (the model's ΔNLL when only that layer is compressed), sort
the layers from least to most sensitive, ``k_i`` = 0 … L−1, and give layer ``i``

    ρ_i = ρ + λ · (1 − 2 k_i / (L − 1)):

the least sensitive layer ``ρ + λ``, the most sensitive ``ρ − λ``, linearly in between.  The
offsets sum to zero, so when every layer has the same shapes (as in this model) the whole model
removes ``ρ`` (an equal budget, compared with the uniform ratio).  This is the layer-wise rule of
OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity"), there driven by outlier counts,
here by a measured sensitivity (the per-layer scan of MIT's efficient-ML lab 1); it is bounded
by construction (``λ < min(ρ, 1 − ρ)``), unlike a rule proportional to the sensitivity.

Used for low-rank ratios (:mod:`edgellm.lowrank.sensitivity`) and for sparsity
(:mod:`edgellm.prune.sensitivity`).
"""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class AllocationError(EdgeLLMError, ValueError):
    """A ratio or spread the rule cannot use; the message says what to give."""


def spread_ratios(sensitivity: dict[int, float], ratio: float, spread: float) -> dict[int, float]:
    """``{layer: ρ_i}`` by the rule above; ``0 < ρ < 1`` and ``0 ≤ λ < min(ρ, 1 − ρ)``."""
    if not 0 < ratio < 1:
        raise AllocationError(f"ratio={ratio} must lie strictly between 0 and 1")
    if not 0.0 <= spread < min(ratio, 1.0 - ratio):
        raise AllocationError(f"spread={spread} must be in [0, {min(ratio, 1 - ratio):.3g}) at "
                              f"ratio {ratio}: every layer must keep a ratio in (0, 1)")
    order = sorted(sensitivity, key=lambda i: (sensitivity[i], i))  # least sensitive first
    L = len(order)
    if L == 1:
        return {order[0]: ratio}
    return {i: ratio + spread * (1 - 2 * k / (L - 1)) for k, i in enumerate(order)}
