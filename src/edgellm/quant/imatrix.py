"""Importance-weighted quantization, in the spirit of llama.cpp's imatrix and I-/K-quants.

llama.cpp's ``llama-imatrix`` runs calibration text through the model and stores, for every
weight matrix, the mean of ``x_j²`` over tokens for each input channel ``j`` (the diagonal of
``XᵀX / n``).  The quantizers then choose each block's scale (and min) to minimise the
*importance-weighted* squared error instead of the plain one:

    E(d, m) = Σ_j imp_j (w_j − ŵ_j)²,      ŵ_j = d · q_j + m

Why the diagonal of ``XᵀX``: the output error of a row is ``Δwᵀ (XᵀX) Δw``; keeping only its
diagonal gives ``Σ_j (Σ_t x_tj²) Δw_j²``, so a weight matters in proportion to the energy of its
input channel.

The search (like llama.cpp's ``make_qkx2_quants`` / ``make_qx_quants``): for a handful of
candidate inverse scales around the min/max one, round the group to codes ``q``, then solve the
weighted least-squares problem for the best ``(d, m)`` given those codes (a 2×2 linear system;
``m = 0`` when symmetric), round ``d, m`` to fp16 as they will be stored, re-round the codes and
keep the candidate with the smallest ``E``.  Plain min/max RTN is one of the candidates, so the
result is never worse than RTN on this objective.
"""

from __future__ import annotations

import torch

from edgellm.calib import collect_inputs, layer_linears, sequential, single_thread
from edgellm.quant.qtensor import QTensor, QuantError, dtype_bits
from edgellm.quant.result import QuantResult
from edgellm.quant.rtn import (
    check_bits,
    check_finite,
    check_group_size,
    code_range,
    minmax_params,
    quantize_codes,
)


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, imp: torch.Tensor,
                   group_size: int | None = 64) -> torch.Tensor:
    """``Σ_j imp_j (w_j − ŵ_j)²`` per group: (out, G) float32.  ``imp`` (in,)."""
    out, n = W.shape
    g = n if group_size is None else group_size
    d2 = (W.float() - W_hat.float()).square() * imp.float()  # (out, in)
    return d2.reshape(out, n // g, g).sum(-1)


@torch.no_grad()
@single_thread()
def quantize_weighted(W: torch.Tensor, imp: torch.Tensor, bits: int = 4,
                      group_size: int | None = 64, sym: bool = False, n_grid: int = 20,
                      rmin: float = -1.0, rdelta: float = 0.1,
                      scale_dtype: torch.dtype | None = torch.float16) -> QTensor:
    """Quantize ``W`` (out, in) minimising the importance-weighted error per group.

    ``imp`` (in,) non-negative importances (e.g. Σ x² per input channel).  Candidate inverse
    scales ``(n_max + rmin + rdelta·k) / range`` for ``k = 0 … n_grid`` (llama.cpp's defaults:
    ``rmin=-1, rdelta=0.1, n_grid=20``), plus plain RTN.  Returns a :class:`QTensor`.
    """
    if W.dim() != 2 or imp.shape != (W.shape[1],):
        raise QuantError(f"W must be (out, in) and imp (in,); got {tuple(W.shape)} and "
                         f"{tuple(imp.shape)}")
    check_bits(bits)
    check_finite(W)
    check_finite(imp, "the importance vector")
    if (imp < 0).any():
        raise QuantError("importances must be non-negative (they are sums of squares)")
    out, n = W.shape
    check_group_size(n, group_size)
    g = n if group_size is None else group_size
    G = n // g
    Wg = W.detach().float().reshape(out, G, g)  # (out, G, g)
    # importance per weight, with a small floor so channels never seen still count a little
    wt = (imp.float() + 1e-6 * imp.float().mean() + 1e-12).reshape(1, G, g).expand(out, G, g)
    lo_c, hi_c = code_range(bits, sym)

    def evaluate(d, m):  # fp16-rounded params (out, G, 1) -> error (out, G), codes
        q = quantize_codes(Wg, d, m, bits, sym)
        err = (wt * (Wg - (q.float() * d + m)).square()).sum(-1)
        return err, q

    best_d, best_m = minmax_params(Wg, bits, sym, scale_dtype)  # RTN: the first candidate
    best_err, best_q = evaluate(best_d, best_m)
    if sym:
        span = Wg.abs().amax(-1, keepdim=True)  # (out, G, 1)
        n_max = hi_c
    else:
        lo, span = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True) - Wg.amin(-1, keepdim=True)
        n_max = hi_c - lo_c
    safe = torch.where(span > 0, span, torch.ones_like(span))
    sw = wt.sum(-1, keepdim=True)
    for k in range(n_grid + 1):
        iscale = (n_max + rmin + rdelta * k) / safe  # (out, G, 1)
        if sym:
            L = torch.round(Wg * iscale).clamp_(lo_c, hi_c)  # (out, G, g)
            sll = (wt * L * L).sum(-1, keepdim=True)
            d = (wt * Wg * L).sum(-1, keepdim=True) / sll.clamp_min(1e-30)
            m = torch.zeros_like(d)
            ok = sll > 0
        else:
            L = torch.round((Wg - lo) * iscale).clamp_(lo_c, hi_c)
            sl, sll = (wt * L).sum(-1, keepdim=True), (wt * L * L).sum(-1, keepdim=True)
            sx, slx = (wt * Wg).sum(-1, keepdim=True), (wt * L * Wg).sum(-1, keepdim=True)
            det = sw * sll - sl * sl
            ok = det > 1e-12 * sw * sll
            det = torch.where(ok, det, torch.ones_like(det))
            d = (sw * slx - sl * sx) / det  # weighted least squares for w ≈ d·L + m
            m = (sll * sx - sl * slx) / det
        ok = ok & (d > 0) & (span > 0)
        if scale_dtype is not None:
            d, m = d.to(scale_dtype).float(), m.to(scale_dtype).float()
        ok = ok & (d > 0) & torch.isfinite(d) & torch.isfinite(m)
        d = torch.where(ok, d, best_d)
        m = torch.where(ok, m, best_m)
        err, q = evaluate(d, m)
        better = (err < best_err).unsqueeze(-1)  # (out, G, 1)
        best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
        best_q = torch.where(better, q, best_q)
        best_err = torch.minimum(err, best_err)
    return QTensor(codes=best_q.reshape(out, n), scale=best_d.squeeze(-1),
                   offset=best_m.squeeze(-1), shape=(out, n), bits=bits, group_size=g, sym=sym,
                   fmt="int", scale_bits=dtype_bits(scale_dtype))


@torch.no_grad()
def collect_imatrix(model, calib, *, layers=None, batch_size: int = 8,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """llama.cpp-style importance matrix: mean x² per input channel of every decoder linear,
    the diagonal of ``H = 2 XᵀX / n`` halved (computed without forming ``H``).

    One pass of the unquantized model over ``calib`` (n_samples, seq_len); {name: (in,)}.
    """
    out: dict[str, torch.Tensor] = {}

    def record(index, layer, stream):
        linears = layer_linears(model, index)
        stats = collect_inputs(layer, linears, stream, xtx=False)
        for n in linears:
            out[n] = stats[n].mean_sq

    sequential(model, calib, record, layers=layers, batch_size=batch_size, progress=progress,
               desc="imatrix")
    return out


@torch.no_grad()
def apply_imatrix(model, calib, *, bits: int = 4, group_size: int | None = 64,
                  sym: bool = False, n_grid: int = 20, scale_dtype: torch.dtype | None = torch.float16,
                  layers=None, batch_size: int = 8, progress: bool = True) -> QuantResult:
    """Importance-weighted quantization of the decoder's linears, in place; a
    :class:`QuantResult` (``qtensors`` ``{name: QTensor}``).

    Sequential like GPTQ: each layer's importances ``E[x²] = diag(H) / 2`` per input channel
    come from the already quantized layers' outputs.
    """
    check_bits(bits)
    result: dict[str, QTensor] = {}

    def quantize_layer(index, layer, stream):
        linears = layer_linears(model, index)
        for name, lin in linears.items():
            try:
                check_group_size(lin.in_features, group_size)
            except QuantError as e:
                raise QuantError(f"{name}: {e}") from None
        stats = collect_inputs(layer, linears, stream, xtx=False)
        for name, lin in linears.items():
            try:
                qt = quantize_weighted(lin.weight, stats[name].mean_sq, bits, group_size, sym,
                                       n_grid, scale_dtype=scale_dtype)
            except QuantError as e:
                raise QuantError(f"{name}: {e}") from None
            lin.weight.copy_(qt.dequantize().to(lin.weight.dtype))
            result[name] = qt

    sequential(model, calib, quantize_layer, layers=layers, batch_size=batch_size,
               progress=progress, desc="imatrix")
    from edgellm.calib import in_model_order

    return QuantResult(in_model_order(model, result))
