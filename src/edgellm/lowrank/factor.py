"""The two pieces every factorization shares: which linears there are, and one factor pair.

``linear_shapes`` lists a model's decoder linears not yet factorized; ``factor_pair`` turns one
weight into ``(B, A)`` by method name (plain SVD, ASVD, SVD-LLM); ``factor_layer`` does it for
one decoder layer's linears from their calibration inputs.  :mod:`edgellm.lowrank.apply` and
:mod:`edgellm.lowrank.sensitivity` both build on them.
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


def factor_pair(method, W, rank, stats=None, *, alpha=0.5, L=None, H=None):
    """``(B, A, energy kept)`` for one weight ``W`` (out, in) by method name."""
    if method == "svd":
        U, S, Vh = svd(W)
        B, A = split_factors(U, S, Vh, rank)
        return B, A, energy_kept(S, rank)
    if method == "asvd":
        from edgellm.lowrank.asvd import asvd_factors

        return asvd_factors(W, stats.mean_abs, rank, alpha, return_energy=True)
    from edgellm.lowrank.svdllm import svdllm_factors

    B, A, info = svdllm_factors(W, H, rank=rank, L=L, return_info=True)
    return B, A, info["energy_kept"]


def factor_layer(method, layer, linears, plan, stream, *, alpha=0.5) -> dict:
    """``{name: (B, A, energy kept, damp)}`` for the ``linears`` of one decoder ``layer`` at
    the ranks of ``plan``, from the inputs the stream feeds the layer (``asvd``, ``svdllm``).

    Linears that read the same input share its statistics and, for SVD-LLM, one whitening
    factor, computed only if a weight taller than wide needs it (the others take the
    eigen path of :mod:`edgellm.lowrank.svdllm`, damp 0).  The layer is not changed.
    """
    from edgellm.calib import collect_inputs
    from edgellm.lowrank.svdllm import whitening

    svdllm = method == "svdllm"
    stats = collect_inputs(layer, linears, stream, xtx=svdllm, moments=not svdllm)
    whitened, out = {}, {}
    for name, lin in linears.items():
        st, H, L, damp = stats[name], None, None, None
        if svdllm:
            H = st.H
            if lin.out_features > lin.in_features:
                if id(st) not in whitened:
                    whitened[id(st)] = whitening(H)
                (L, damp), H = whitened[id(st)], None
            else:
                damp = 0.0
        B, A, energy = factor_pair(method, lin.weight, plan[name], st, alpha=alpha, L=L, H=H)
        out[name] = (B, A, energy, damp)
    return out
