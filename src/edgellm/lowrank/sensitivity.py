"""Which layers can afford a lower rank: a per-layer sensitivity scan and a bounded allocation.

**Sensitivity** of decoder layer ``i``: the mean per-token ΔNLL of the model when only layer
``i``'s linears are factorized (by the method, at the uniform ratio ``ρ``) and every other layer
is dense, on held-out tokens (the validation split of the calibration corpus, never the test
text).  The factors of every layer come from the *dense* model's inputs, computed in one pass.

**Allocation**: :func:`edgellm.allocation.spread_ratios` (the bounded, budget-keeping rule
of OWL, Yin et al. 2024, applied to ranks): the least sensitive layer removes ``ρ + λ``, the
most sensitive ``ρ − λ``, linearly in between, so the whole model still removes ``ρ`` of the
factorized parameters (up to rank rounding).
"""

from __future__ import annotations

import torch

from edgellm.allocation import spread_ratios
from edgellm.lowrank.layers import LowRankLinear, replace_module
from edgellm.lowrank.svd import factor_params, rank_for_ratio

__all__ = ["budget", "layer_sensitivity", "ranks_for_layer_ratios", "spread_ratios"]


def ranks_for_layer_ratios(shapes: dict[str, tuple[int, int]],
                           ratios: dict[int, float]) -> dict[str, int]:
    """``{linear name: rank}``: each linear of decoder layer ``i`` at its layer's ``ρ_i``."""
    return {n: rank_for_ratio(m, k, ratios[int(n.split(".")[2])])
            for n, (m, k) in shapes.items() if int(n.split(".")[2]) in ratios}


def budget(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> float:
    """The fraction of the factorized linears' parameters removed by ``ranks``."""
    before = sum(m * n for name, (m, n) in shapes.items() if name in ranks)
    after = sum(factor_params(m, n, ranks[name]) for name, (m, n) in shapes.items() if name in ranks)
    return 1 - after / before


@torch.no_grad()
def layer_sensitivity(model, calib, tokens, *, method: str = "svdllm", ratio: float = 0.2,
                      alpha: float = 0.5, ctx: int = 512, batch_size: int = 8,
                      progress: bool = False) -> dict[int, float]:
    """``{layer index: ΔNLL}`` when only that decoder layer is factorized (see the module).

    ``calib`` (n_samples, seq_len) token ids (ignored by ``svd``); ``tokens`` 1-D held-out ids
    scored with the gptq protocol at ``ctx``.  ``model`` is left unchanged.
    """
    from edgellm.calib import sequential
    from edgellm.lowrank.factor import factor_layer, factor_pair, linear_shapes
    from edgellm.metrics import token_logprobs
    from edgellm.models import layer_linears

    plan = {n: rank_for_ratio(m, k, ratio) for n, (m, k) in linear_shapes(model).items()}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if method == "svd":
        for name in plan:
            B, A, _ = factor_pair("svd", model.get_submodule(name).weight, plan[name])
            factors[name] = (B, A)
    else:
        def collect(index, layer, stream):  # factors from the dense inputs; nothing swapped
            lins = {n: m for n, m in layer_linears(model, index).items() if n in plan}
            for name, (B, A, _, _) in factor_layer(method, layer, lins, plan, stream,
                                                   alpha=alpha).items():
                factors[name] = (B, A)

        sequential(model, calib, collect, batch_size=batch_size, progress=progress,
                   desc=f"{method.upper()} factors")
    base = token_logprobs(model, tokens, "gptq", ctx, progress=False)["nll"]
    layers = sorted({int(n.split(".")[2]) for n in plan})
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="one layer at a time", leave=False)
    out = {}
    for i in layers:
        names = [n for n in plan if int(n.split(".")[2]) == i]
        dense = {n: model.get_submodule(n) for n in names}
        for n in names:
            lin = dense[n]
            bias = None if lin.bias is None else lin.bias.detach()
            replace_module(model, n, LowRankLinear.from_factors(*factors[n], bias, lin.weight.dtype))
        try:
            nll = token_logprobs(model, tokens, "gptq", ctx, progress=False)["nll"]
        finally:
            for n in names:
                replace_module(model, n, dense[n])
        out[i] = float((nll - base).mean())
    return out
