"""Which layers can afford more zeros: a per-layer sensitivity scan for Wanda pruning.

**Sensitivity** of decoder layer ``i``: the mean per-token ΔNLL of the model when only layer
``i``'s linears are Wanda-pruned at the uniform sparsity ``s`` and every other layer is dense, on
held-out tokens (the validation split of the calibration corpus, never the test text).  The masks
of every layer come from the *dense* model's inputs, computed in one pass; each layer is then
pruned alone, scored and restored (MIT's efficient-ML lab 1 runs the same scan).

The scan feeds :func:`edgellm.allocation.spread_ratios`: the least sensitive layer gets
``s + λ``, the most sensitive ``s − λ``, linearly in between, at the same total sparsity (every
decoder layer of this model has the same shapes).  OWL (Yin et al., 2024) spreads sparsity the
same way, ranked by each layer's share of outlier activations instead of a measured ΔNLL.
"""

from __future__ import annotations

import torch

from edgellm.prune.masks import select_mask
from edgellm.prune.wanda import wanda_scores


@torch.no_grad()
def layer_sensitivity(model, calib, tokens, *, sparsity: float = 0.5, ctx: int = 512,
                      batch_size: int = 8, progress: bool = False) -> dict[int, float]:
    """``{layer index: ΔNLL}`` when only that decoder layer is Wanda-pruned at ``sparsity``.

    ``calib`` (n_samples, seq_len) token ids for the masks; ``tokens`` 1-D held-out ids scored
    with the gptq protocol at ``ctx``.  ``model`` is left unchanged.
    """
    from edgellm.calib import collect_inputs, layer_linears, sequential
    from edgellm.metrics import token_logprobs

    masks: dict[int, dict[str, torch.Tensor]] = {}

    def collect(index, layer, stream):  # masks from the dense inputs; nothing changed
        lins = layer_linears(model, index)
        stats = collect_inputs(layer, lins, stream, xtx=False)
        masks[index] = {n: select_mask(wanda_scores(m.weight, stats[n].sq.sqrt()), sparsity)
                        for n, m in lins.items()}

    sequential(model, calib, collect, batch_size=batch_size, progress=progress,
               desc="Wanda masks")
    base = token_logprobs(model, tokens, "gptq", ctx, progress=False)["nll"]
    layers = sorted(masks)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="one layer at a time", leave=False)
    out = {}
    for i in layers:
        lins = layer_linears(model, i)
        saved = {n: lins[n].weight.detach().clone() for n in masks[i]}
        try:
            for n, mask in masks[i].items():
                lins[n].weight.mul_(mask.to(lins[n].weight.dtype))
            nll = token_logprobs(model, tokens, "gptq", ctx, progress=False)["nll"]
        finally:
            for n, W in saved.items():
                lins[n].weight.copy_(W)
        out[i] = float((nll - base).mean())
    return out
