"""Mixed precision under a bits-per-weight budget: more bits where they buy the most.

llama.cpp's K-quant mixes (``Q4_K_M`` …) keep some tensors (``attn_v``, ``ffn_down``, the first
and last layers) at higher precision than the rest, because quantization hurts some matrices
much more than others.  Here the choice is measured rather than hand-written:

1. **sensitivity** — one pass over the calibration set gives each linear's ``H = 2 XᵀX / n``;
   for every candidate bit width ``b``, the layer's output error if it alone were quantized
   with ``b`` bits is ``E_l(b) = tr(ΔW H ΔWᵀ) / 2`` (mean over tokens of ``‖ΔW x‖²``);
2. **allocation** — start every linear at the smallest candidate, then repeatedly apply the
   upgrade (to any larger candidate) with the largest error reduction per extra stored bit,
   ``(E_l(b) − E_l(b')) / (n_l · (bpw(b') − bpw(b)))``, among those that still fit the budget,
   until none fits.  ``bpw`` counts the scales and offsets (``bits + 32 / group_size`` for
   asymmetric fp16 parameters), so the average over all linear weights never exceeds
   ``bpw_budget``, and no further single upgrade would fit;
3. **quantization** — each linear with its bit width, by RTN or GPTQ (``method``).

The sensitivity is a local proxy: it treats the layers' output errors as additive and equally
harmful.  The first and last layers' errors travel differently through the network; the lesson
compares the allocation with llama.cpp's hand-made rules.
"""

from __future__ import annotations

import torch

from edgellm.calib import collect_inputs, layer_linears, sequential
from edgellm.hessian import layer_error
from edgellm.quant.qtensor import QuantError, dtype_bits
from edgellm.quant.result import QuantResult
from edgellm.quant.rtn import check_bits, check_group_size, fake_quantize, quantize
from edgellm.quant.size import bpw as grouped_bpw


def bpw_of(bits: int, group_size: int | None, in_features: int, sym: bool = False,
           scale_dtype: torch.dtype | None = torch.float16) -> float:
    """Bits per weight of an integer format with one scale (and offset unless ``sym``) per group
    (``group_size=None``: one group per row of ``in_features``)."""
    g = in_features if group_size is None else group_size
    s = dtype_bits(scale_dtype)
    return grouped_bpw(bits, g, scale_bits=s, offset_bits=0 if sym else s)


# Bit widths to choose from.  2 bits is left out by default: on this model a single 2-bit linear
# costs more than any number of 6-bit ones give back (measured: budget 3.5 with 2-bit candidates
# reaches a PPL in the hundreds, against 86 for uniform 3-bit g64), which a sum of layer-wise
# errors cannot see.  Pass ``candidates=(2, 3, 4, 6, 8)`` to try it.
CANDIDATES = (3, 4, 6, 8)


@torch.no_grad()
def sensitivities(model, calib, candidates=CANDIDATES, group_size: int | None = 64,
                  sym: bool = False, *, relative: bool = True, layers=None, batch_size: int = 8,
                  progress: bool = True) -> dict[str, dict[int, float]]:
    """``{name: {bits: E}}``: each linear's squared output error at each bit width (RTN), on the
    calibration inputs of the unquantized model (one pass).

    ``relative=True`` (default) divides by the layer's output energy ``tr(W H Wᵀ)/2``, so the
    errors of layers whose outputs differ in scale by orders of magnitude (this model's late
    ``down_proj`` layers carry activations in the thousands) can be compared: with raw errors
    the greedy allocation spends the budget on the loudest layers and leaves quiet but fragile
    ones (the first and last layers) at 2 bits, which ruins the model.
    """
    for b in candidates:
        check_bits(b)
    out: dict[str, dict[int, float]] = {}

    def measure(index, layer, stream):
        linears = layer_linears(model, index)
        stats = collect_inputs(layer, linears, stream, xtx=True)
        for name, lin in linears.items():
            check_group_size(lin.in_features, group_size)
            W, H = lin.weight.float(), stats[name].H
            out[name] = {}
            # output energy tr(W H Wᵀ)/2: the layer error of replacing W by zero
            energy = layer_error(W, torch.zeros_like(W), H=H).item() if relative else 1.0
            for b in candidates:
                out[name][b] = layer_error(W, fake_quantize(W, b, group_size, sym), H=H).item() \
                    / energy

    sequential(model, calib, measure, layers=layers, batch_size=batch_size, progress=progress,
               desc="sensitivity")
    return out


def allocate(errors: dict[str, dict[int, float]], numels: dict[str, int],
             bpw: dict[str, dict[int, float]], bpw_budget: float) -> dict[str, int]:
    """Greedy bit allocation: ``{name: bits}`` with Σ n_l·bpw_l ≤ bpw_budget · Σ n_l.

    ``errors[name][bits]`` the cost of each choice, ``numels[name]`` weights per layer,
    ``bpw[name][bits]`` bits per weight of each choice (with scales).
    """
    if not errors:
        raise QuantError("no layers to allocate bits to")
    total = sum(numels.values())
    choice = {n: min(e) for n, e in errors.items()}
    used = sum(numels[n] * bpw[n][b] for n, b in choice.items())
    if used > bpw_budget * total + 1e-9:
        raise QuantError(f"bpw_budget={bpw_budget} is below the smallest candidate's "
                         f"{used / total:.4g} bits per weight; raise the budget or add a smaller "
                         "bit width to the candidates")
    while True:
        best = None
        for n, b in choice.items():
            for b2, e2 in errors[n].items():
                extra = numels[n] * (bpw[n][b2] - bpw[n][b])
                if extra <= 0 or used + extra > bpw_budget * total + 1e-9:
                    continue
                gain = (errors[n][b] - e2) / extra
                if best is None or gain > best[0]:
                    best = (gain, n, b2, extra)
        if best is None:
            return choice
        _, n, b2, extra = best
        choice[n] = b2
        used += extra


@torch.no_grad()
def apply_mixed(model, calib, *, bpw_budget: float = 4.5, candidates=CANDIDATES,
                group_size: int | None = 64, sym: bool = False, method: str = "rtn",
                scale_dtype: torch.dtype | None = torch.float16, layers=None,
                batch_size: int = 8, progress: bool = True) -> QuantResult:
    """Mixed-precision quantization of the decoder's linears in place; a :class:`QuantResult`.

    ``bpw_budget`` average bits per weight over the quantized linears, scales included;
    ``candidates`` bit widths to choose from; ``method`` ``"rtn"`` or ``"gptq"`` for the final
    quantization.  The result's ``info`` holds ``allocation`` ``{name: bits}``, ``errors``
    ``{name: {bits: E}}``, the achieved ``bpw`` and the ``bpw_budget``.
    """
    if method not in ("rtn", "gptq"):
        raise QuantError(f"mixed precision supports method 'rtn' or 'gptq', not {method!r}")
    from edgellm.models import linear_layers

    errors = sensitivities(model, calib, candidates, group_size, sym, layers=layers,
                           batch_size=batch_size, progress=progress)
    lins = {n: m for n, m in linear_layers(model).items() if n in errors}
    numels = {n: m.weight.numel() for n, m in lins.items()}
    bpw = {n: {b: bpw_of(b, group_size, m.in_features, sym, scale_dtype) for b in candidates}
           for n, m in lins.items()}
    alloc = allocate(errors, numels, bpw, bpw_budget)
    if method == "gptq":
        from edgellm.quant.gptq import apply_gptq

        result = apply_gptq(model, calib, bits=alloc, group_size=group_size, sym=sym,
                            scale_dtype=scale_dtype, layers=layers, batch_size=batch_size,
                            progress=progress).qtensors
    else:
        result = {}
        for n, lin in lins.items():
            qt = quantize(lin.weight, alloc[n], group_size, sym, scale_dtype)
            lin.weight.copy_(qt.dequantize().to(lin.weight.dtype))
            result[n] = qt
    achieved = sum(result[n].bpw * numels[n] for n in result) / sum(numels.values())
    return QuantResult(result, {"allocation": alloc, "errors": errors, "bpw": achieved,
                                "bpw_budget": bpw_budget})
