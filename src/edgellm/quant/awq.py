"""AWQ (Lin, Tang, Tang, Yang, Gan, Han, 2023): activation-aware weight quantization.

Observation: a few input channels carry much larger activations than the rest, and the weights
that multiply them matter most.  Scaling such a weight column up by ``s > 1`` before rounding
(and the activation down by ``1/s``) shrinks its relative rounding error, at almost no cost to
the other columns of its group.  For a linear layer ``y = W x``:

    y = (W · diag(s)) (diag(s)⁻¹ x)   →   ŷ = Q(W · diag(s)) (diag(s)⁻¹ x)

``s = mean|x|^α``, normalised so ``√(max s · min s) = 1``, with ``α`` from a grid of ``n_grid``
values in [0, 1) (``α = 0`` is plain RTN, so the search can only do better on its objective).
The ``1/s`` is folded into the operation producing ``x``, so inference costs nothing extra:

* q/k/v: into ``input_layernorm``'s weight (RMSNorm is per-channel multiplicative);
* gate/up: into ``post_attention_layernorm``'s weight;
* down: into the rows of ``up_proj`` (``down``'s input is ``act(gate(x)) · up(x)``);
* o: into the rows of ``v_proj``, only when ``v_proj`` has as many outputs as ``o_proj`` has
  inputs.  With grouped-query attention (SmolLM2: 3 KV heads for 9 query heads, ``v_proj``
  (192, 576) vs ``o_proj`` (576, 576)) one value channel feeds three ``o_proj`` inputs, so a
  free per-channel scale cannot be folded; like AutoAWQ, ``o_proj`` is then not scaled (only
  clipped).

Then a clipping search: per group, shrink the range ``[min, max]`` by ``r`` in
``1, 1 - 1/n_grid, …, 1 - max_shrink`` and keep the ``r`` with the smallest output error
(q_proj and k_proj are not clipped, as in the paper's code: their errors go through softmax).

**Objective.**  The paper's code measures the error of the whole attention / MLP block's output
on calibration tokens, one block forward per grid point.  Here each grid point is scored by the
exact mean squared error of the linear layers' outputs over *all* calibration tokens, computed
from ``H = 2 XᵀX / n`` (:mod:`edgellm.hessian`): ``mean_tokens ‖ΔW x‖² = tr(ΔW H ΔWᵀ) / 2``,
which costs ``out · in²`` per point whatever the number of tokens (the block objective would cost
dozens of model passes on a CPU).  The clipping error of a group uses the group's diagonal block
of ``H`` the same way.  (Both searches are argmins, so the scale of ``H`` does not matter.)
"""

from __future__ import annotations

import torch

from edgellm import hessian
from edgellm.calib import collect_inputs, in_model_order, layer_linears, sequential, single_thread
from edgellm.hessian import layer_error
from edgellm.models import linears_by_role, producer_pairs
from edgellm.quant.qtensor import QTensor
from edgellm.quant.result import QuantResult
from edgellm.quant.rtn import (
    check_bits,
    check_group_size,
    check_linears,
    fake_quant,
    minmax_params,
    quantize,
)


def _fake_quant(W: torch.Tensor, bits: int, group_size: int | None, sym: bool,
                scale_dtype: torch.dtype | None) -> torch.Tensor:
    """RTN fake quantization without input checks (for the inner loops of the searches)."""
    out, n = W.shape
    g = n if group_size is None else group_size
    Wg = W.float().reshape(out, n // g, g)  # (out, G, g)
    scale, offset = minmax_params(Wg, bits, sym, scale_dtype)
    return fake_quant(Wg, scale, offset, bits, sym).reshape(out, n)


def awq_scales(x_mag: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale ``s = mag^α``, normalised so ``max(s)·min(s) = 1``: (in,)."""
    s = x_mag.float().clamp(min=1e-4).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize_range(W: torch.Tensor, bits: int, group_size: int | None, sym: bool,
                        ratio: torch.Tensor | float = 1.0,
                        scale_dtype: torch.dtype | None = torch.float16) -> QTensor:
    """RTN of ``W`` (out, in) after shrinking each group's range by ``ratio`` (out, G) or scalar.

    asymmetric: clip to ``[r·min, r·max]``; symmetric: to ``±r·absmax``.  Returns the QTensor.
    """
    out, n = W.shape
    g = n if group_size is None else group_size
    Wg = W.float().reshape(out, n // g, g)  # (out, G, g)
    r = torch.as_tensor(ratio, dtype=torch.float32)
    r = r.unsqueeze(-1) if r.dim() == 2 else r  # (out, G, 1)
    if sym:
        m = Wg.abs().amax(-1, keepdim=True) * r
        Wc = torch.maximum(torch.minimum(Wg, m), -m)
    else:
        Wc = torch.maximum(torch.minimum(Wg, Wg.amax(-1, keepdim=True) * r),
                           Wg.amin(-1, keepdim=True) * r)
    return quantize(Wc.reshape(out, n), bits, group_size, sym, scale_dtype)


@torch.no_grad()
@single_thread()
def search_scale(weights: list[torch.Tensor], H: torch.Tensor, x_mag: torch.Tensor,
                 bits: int = 4, group_size: int | None = 64, sym: bool = False,
                 n_grid: int = 20, scale_dtype: torch.dtype | None = torch.float16):
    """AWQ's grid search for the input-channel scale shared by linears reading the same input.

    ``weights`` list of (out_k, in) matrices; ``H = 2 XᵀX / n`` (in, in) of their common input;
    ``x_mag`` (in,) mean |x| per input channel.  For ``α = 0, 1/n_grid, …``: ``s = awq_scales``,
    error ``Σ_k tr(ΔW_k H ΔW_kᵀ) / 2`` (:func:`edgellm.hessian.layer_error`, the mean squared
    output error per token) with ``ΔW_k = W_k − Q(W_k·s)/s``.
    Returns ``(s, alpha, errors)``: the best (in,) scale, its α, and the error of every α.
    """
    check_bits(bits)
    for W in weights:
        check_group_size(W.shape[1], group_size)
    errors = []
    best = (float("inf"), None, None)
    for k in range(n_grid):
        alpha = k / n_grid
        s = awq_scales(x_mag, alpha)  # (in,)
        err = sum(layer_error(W, _fake_quant(W * s, bits, group_size, sym, scale_dtype) / s,
                              H=H) for W in weights).item()
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], errors


@torch.no_grad()
def search_scale_linear(W: torch.Tensor, X: torch.Tensor, bits: int = 4,
                        group_size: int | None = 64, sym: bool = False, n_grid: int = 20):
    """AWQ's scale search for one linear layer from raw inputs ``X`` (tokens, in).

    Returns ``(s, alpha, errors)`` as :func:`search_scale` (errors = mean_tokens ‖ΔW x‖²).
    """
    X = X.reshape(-1, X.shape[-1]).float()
    return search_scale([W], hessian.from_inputs(X), X.abs().mean(0), bits, group_size, sym,
                        n_grid)


@torch.no_grad()
@single_thread()
def search_clip(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 64,
                sym: bool = False, n_grid: int = 20, max_shrink: float = 0.5,
                scale_dtype: torch.dtype | None = torch.float16) -> torch.Tensor:
    """AWQ's clipping search: the best range ratio per group, (out, G) float32.

    Ratios ``1 - i/n_grid`` for ``i < n_grid·max_shrink`` (1 included: never worse than RTN).
    A group's error is ``Δw_g H_gg Δw_gᵀ / 2``, its share of :func:`edgellm.hessian.layer_error`,
    with ``H_gg`` the group's diagonal block of ``H = 2 XᵀX / n``.
    """
    out, n = W.shape
    g = n if group_size is None else group_size
    G = n // g
    Hg = torch.stack([H[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(G)])  # (G, g, g)
    Wg = W.float().reshape(out, G, g)
    best_err = torch.full((out, G), float("inf"))
    best_r = torch.ones(out, G)
    for i in range(int(n_grid * max_shrink)):
        r = 1 - i / n_grid
        D = Wg - fake_quantize_range(W, bits, group_size, sym, r, scale_dtype).dequantize() \
            .reshape(out, G, g)  # (out, G, g)
        err = torch.einsum("ogi,gij,ogj->og", D, Hg, D) / 2  # layer_error per group, (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r[better] = r
    return best_r


def _fold(linears: dict, names: list[str], s: torch.Tensor, prev, H: torch.Tensor) -> torch.Tensor:
    """Scale the columns of ``names`` by ``s`` and fold ``1/s`` into ``prev``; return new H.

    ``prev`` is an RMSNorm (its weight) or a linear (its output rows).  The inputs become
    ``x/s``, so their Hessian becomes ``diag(1/s) H diag(1/s)``.
    """
    for n in names:
        linears[n].weight.mul_(s)  # (out, in) * (in,)
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s.unsqueeze(1))  # rows of the producer
        if prev.bias is not None:
            prev.bias.div_(s)
    else:
        prev.weight.div_(s)
    return H / s.unsqueeze(0) / s.unsqueeze(1)


@torch.no_grad()
def apply_awq(model, calib, *, bits: int = 4, group_size: int | None = 64, sym: bool = False,
              n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5,
              scale_dtype: torch.dtype | None = torch.float16, layers=None, batch_size: int = 8,
              progress: bool = True) -> QuantResult:
    """AWQ-quantize the decoder's linear layers in place; return a :class:`QuantResult`.

    Besides the linear weights (fake-quantized), the RMSNorm weights and the rows of
    ``up_proj`` (and of ``v_proj`` without GQA) change in place: they absorb the ``1/s``.
    The QTensors are those of the *scaled* weights, i.e. what a packed model stores.
    The result's ``info`` holds the chosen α per scaled group of linears
    (``{"model.layers.0.self_attn.q_proj/k_proj/v_proj": α, …}``).
    Layers are processed sequentially on the quantized model's activations (see
    :mod:`edgellm.calib`).
    """
    check_bits(bits)
    result: dict[str, QTensor] = {}
    info: dict[str, float] = {}

    def quantize_layer(index, layer, stream):
        linears = layer_linears(model, index)
        check_linears(linears, group_size)  # fail early, with the layer's name
        stats = collect_inputs(layer, linears, stream, xtx=True)
        name_of = {id(m): n for n, m in linears.items()}
        role = {r: name_of[id(m)] for r, m in linears_by_role(layer).items()}  # role -> full name
        H = {n: stats[n].H for n in linears}  # H = 2XᵀX/n per linear (shared by q/k/v, gate/up)
        for pair in producer_pairs(layer):
            if pair.grouped:  # GQA: a value channel feeds several o_proj inputs, no free scale
                continue
            names = [role[r] for r in pair.consumers]
            Hn = H[names[0]]
            s, alpha, _ = search_scale([linears[n].weight for n in names], Hn,
                                       stats[names[0]].mean_abs, bits, group_size, sym, n_grid,
                                       scale_dtype)
            Hs = _fold(linears, names, s, pair.producer, Hn)
            for n in names:
                H[n] = Hs
            info[names[0].rsplit(".", 1)[0] + "." + "/".join(pair.consumers)] = alpha
        for name, lin in linears.items():
            r = 1.0
            if clip and name not in (role["q_proj"], role["k_proj"]):  # errors go through softmax
                r = search_clip(lin.weight, H[name], bits, group_size, sym, n_grid, max_shrink,
                                scale_dtype)
            qt = fake_quantize_range(lin.weight, bits, group_size, sym, r, scale_dtype)
            lin.weight.copy_(qt.dequantize().to(lin.weight.dtype))
            result[name] = qt

    sequential(model, calib, quantize_layer, layers=layers, batch_size=batch_size,
               progress=progress, desc="AWQ")
    return QuantResult(in_model_order(model, result), info)
