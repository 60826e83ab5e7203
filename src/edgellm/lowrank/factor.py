"""The two pieces every factorization shares: which linears there are, and one factor pair.

``linear_shapes`` lists a model's decoder linears not yet factorized; ``factor_pair`` turns one
weight into ``(B, A)`` by method name (plain SVD, ASVD, SVD-LLM).  :mod:`edgellm.lowrank.apply`
and :mod:`edgellm.lowrank.sensitivity` both build on them.
"""

from __future__ import annotations

from edgellm.lowrank.layers import LowRankLinear
from edgellm.lowrank.svd import energy_kept, split_factors, svd


def linear_shapes(model, layers=None) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of the decoder linears not yet factorized, in model order
    (``layers``: only those decoder layer indices)."""
    from edgellm.models import decoder_layers, layer_linears

    idx = range(len(decoder_layers(model))) if layers is None else sorted(layers)
    done = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    out = {}
    for i in idx:
        for name, lin in layer_linears(model, i).items():
            if name.rpartition(".")[0] in done:
                continue  # first / second of an already factorized layer
            out[name] = (lin.out_features, lin.in_features)
    return out


def factor_pair(method, W, rank, stats=None, *, alpha=0.5, L=None):
    """``(B, A, energy kept)`` for one weight ``W`` (out, in) by method name."""
    if method == "svd":
        U, S, Vh = svd(W)
        B, A = split_factors(U, S, Vh, rank)
        return B, A, energy_kept(S, rank)
    if method == "asvd":
        from edgellm.lowrank.asvd import asvd_factors

        return asvd_factors(W, stats.mean_abs, rank, alpha, return_energy=True)
    from edgellm.lowrank.svdllm import svdllm_factors

    B, A, info = svdllm_factors(W, rank=rank, L=L, return_info=True)
    return B, A, info["energy_kept"]
