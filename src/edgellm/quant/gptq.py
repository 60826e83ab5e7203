"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022): quantize a layer column by column,
correcting the not-yet-quantized columns for each column's error.

For one linear layer with weights ``W`` (out, in) and calibration inputs ``X`` (n, in), GPTQ
minimises the layer's output error ``‖W Xᵀ − Q Xᵀ‖²`` over quantized ``Q``.  Each output row is
an independent least-squares problem with the same Hessian ``H = 2 XᵀX / n`` (in, in).
Optimal Brain Quantization (OBQ) says: after quantizing column ``i`` to ``q_i``, the remaining
columns ``F`` should move by

    δ_F = −(w_i − q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_{i,F}

where ``H_F⁻¹`` is the inverse Hessian restricted to the columns not yet quantized.  GPTQ's three
ideas make that fast and stable:

1. a fixed column order (left to right, or by decreasing ``diag(H)`` with ``act_order``) for all
   rows, so ``H_F⁻¹`` is shared by every row;
2. the rows of the upper Cholesky factor of ``H⁻¹`` hold exactly the ``[H_F⁻¹]_{i,F} / √[H_F⁻¹]_ii``
   needed at each step, so one Cholesky replaces all the rank-1 downdates of ``H⁻¹``;
3. lazy batch updates: apply the updates inside a block of ``block_size`` columns immediately
   and to the rest of the matrix once per block (one matrix product instead of many).

Damping adds ``damp · mean(diag(H))`` to the diagonal so the Cholesky factorisation exists.
Grouped quantization takes each group's scale/offset when the group's first column is reached,
from the fully *updated* weights of that group; the reference implementation takes them from
``W`` as it stood when the current block of 128 columns started (``group_params="block_start"``).
"""

from __future__ import annotations

import torch

from edgellm.calib import collect_inputs, in_model_order, layer_linears, sequential, single_thread
from edgellm.hessian import hinv_cholesky
from edgellm.quant.qtensor import QTensor, QuantError, dtype_bits
from edgellm.quant.result import QuantResult
from edgellm.quant.rtn import (
    check_bits,
    check_finite,
    check_group_size,
    check_linears,
    code_range,
    minmax_params,
    quantize_codes,
)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = 64,
                  sym: bool = False, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, static_groups: bool = False,
                  scale_dtype: torch.dtype | None = torch.float16,
                  group_params: str = "current"):
    """GPTQ-quantize one weight matrix.

    ``W`` (out, in) weights; ``H`` (in, in) Hessian ``2 XᵀX / n`` of the layer's inputs.
    ``group_size=None`` is per channel.  ``act_order`` processes columns by decreasing
    ``diag(H)``; groups stay contiguous in the original column order, and each group's
    parameters are taken when its first column (in processing order) is reached, from the
    current weights of all its columns; ``static_groups=True`` takes every group's parameters
    from the original ``W`` up front instead.  ``group_params="block_start"`` takes them from
    the weights as they stood when the current block of ``block_size`` columns started (the
    reference implementation's convention: updates from earlier columns of the same block are
    not yet in ``W``); ``"current"`` (ours) from the fully updated weights.

    Returns ``(Q, qtensor)``: ``Q`` (out, in) float32 the dequantized weights, and the
    :class:`QTensor` of codes, scales and offsets (``qtensor.dequantize()`` equals ``Q``).
    """
    # thousands of small ops and two small factorisations: on a busy CPU, thread hand-offs (and
    # multi-threaded LAPACK spinning) cost far more than they save
    with single_thread():
        return _gptq(W, H, bits, group_size, sym, damp, block_size, act_order, static_groups,
                     scale_dtype, group_params)


def _gptq(W, H, bits, group_size, sym, damp, block_size, act_order, static_groups, scale_dtype,
          group_params="current"):
    if group_params not in ("current", "block_start"):
        raise QuantError(f"group_params={group_params!r}; use 'current' or 'block_start'")
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise QuantError(f"W must be (out, in) and H (in, in); got W {tuple(W.shape)}, "
                         f"H {tuple(H.shape)}")
    check_bits(bits)
    check_finite(W)
    check_finite(H, "the Hessian")
    n_out, n = W.shape
    check_group_size(n, group_size)
    gs = n if group_size is None else group_size
    W = W.detach().float().clone()  # (out, in), updated in place as columns are quantized
    H = H.detach().float().clone()  # (in, in)

    dead = H.diagonal() == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    G = n // gs
    scale = torch.zeros(n_out, G)  # (out, G) chosen as the groups start
    offset = torch.zeros(n_out, G)
    have = torch.zeros(G, dtype=torch.bool)
    if static_groups:  # every group from the original weights, before any update
        s, o = minmax_params(W.reshape(n_out, G, gs), bits, sym, scale_dtype)  # (out, G, 1)
        scale, offset, have[:] = s[..., 0], o[..., 0], True

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n)
    W = W[:, perm]  # processing order
    H = H[perm][:, perm]
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(n)  # pos[col]: where original column col is processed
    Hinv = hinv_cholesky(H, damp)  # (in, in) upper

    lo, hi = code_range(bits, sym)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()  # (out, B) this block, updated immediately
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)  # scaled errors, for the lazy update of the rest
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # original column index
            g = col // gs
            if not have[g]:  # the group starts here: parameters from its current weights
                cols = pos[g * gs:(g + 1) * gs]  # processing positions of its columns
                cur = (_current(W, W1, Err1, Hinv, cols, i1, i, i2) if group_params == "current"
                       else W[:, cols])  # (out, gs); W: as at the block's start
                s, o = minmax_params(cur, bits, sym, scale_dtype)  # (out, 1) each
                scale[:, g], offset[:, g], have[g] = s[:, 0], o[:, 0], True
            w = W1[:, i]  # (out,)
            d = Hinv1[i, i]
            s, o = scale[:, g], offset[:, g]  # (out,)
            # the quantizer (rtn.fake_quant inlined): nearest code on the group's grid
            q = torch.round((w - o) / torch.where(s == 0, 1.0, s)).clamp_(lo, hi) * s + o
            Q1[:, i] = q
            err = (w - q) / d  # (out,)
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # OBQ update
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns

    Q = Q[:, pos]  # back to the original column order, (out, in)
    Qg = Q.reshape(n_out, G, gs)
    codes = quantize_codes(Qg, scale.unsqueeze(-1), offset.unsqueeze(-1), bits, sym)
    qt = QTensor(codes=codes.reshape(n_out, n), scale=scale, offset=offset, shape=(n_out, n),
                 bits=bits, group_size=gs, sym=sym, fmt="int", scale_bits=dtype_bits(scale_dtype))
    return Q, qt


def _current(W, W1, Err1, Hinv, cols, i1, i, i2):
    """Current values of the columns at processing positions ``cols`` (all ≥ i1 + i).

    Columns inside the block are up to date in ``W1``; those after it still miss the lazy
    update from the block's first ``i`` columns, which is applied here for just these columns.
    """
    out = torch.empty(W.shape[0], len(cols))
    inside = cols < i2
    out[:, inside] = W1[:, cols[inside] - i1]
    after = cols[~inside]
    if len(after):
        out[:, ~inside] = W[:, after] - Err1[:, :i] @ Hinv[i1:i1 + i, after]
    return out


def _split_rows(qt: QTensor, sizes: list[int]) -> list[QTensor]:
    """Split a QTensor of stacked weights (q/k/v or gate/up) back into one per linear."""
    out, r = [], 0
    for m in sizes:
        out.append(QTensor(codes=qt.codes[r:r + m], scale=qt.scale[r:r + m],
                           offset=qt.offset[r:r + m], shape=(m, qt.shape[1]), bits=qt.bits,
                           group_size=qt.group_size, sym=qt.sym, fmt=qt.fmt,
                           scale_bits=qt.scale_bits))
        r += m
    return out


def bits_for(bits, name: str) -> int:
    """``bits`` is an int for every layer, or a dict ``{name: bits}`` (mixed precision)."""
    if isinstance(bits, dict):
        if name not in bits:
            raise QuantError(f"no bit width given for {name}")
        return int(bits[name])
    return int(bits)


def apply_gptq(model, calib, *, bits=4, group_size: int | None = 64, sym: bool = False,
               damp: float = 0.01, block_size: int = 128, act_order: bool = False,
               static_groups: bool = False, scale_dtype: torch.dtype | None = torch.float16,
               group_params: str = "current", layers=None, batch_size: int = 8,
               progress: bool = True) -> QuantResult:
    """GPTQ-quantize the decoder's linear layers in place (fake quant); return a
    :class:`QuantResult` (``qtensors`` ``{name: QTensor}``).

    ``calib`` (n_samples, seq_len) token ids.  Layers are processed sequentially (see
    :mod:`edgellm.calib`): each layer's Hessians come from the outputs of the already
    quantized layers before it.  Linears that read the same input (q/k/v; gate/up) share one
    Hessian and are quantized together as one stacked matrix (rows are independent, so this is
    the same as quantizing them one by one, only faster).  ``bits`` may be a dict
    ``{name: bits}``.  ``layers`` (decoder layer indices) limits the work to some layers.
    The tied embedding / lm_head is not quantized.
    """
    result: dict[str, QTensor] = {}

    def quantize_layer(index, layer, stream):
        linears = layer_linears(model, index)
        check_linears(linears, group_size)  # fail early, with the layer's name
        stats = collect_inputs(layer, linears, stream, xtx=True)
        groups: dict[tuple, list[str]] = {}
        for name in linears:  # same input and same bits -> one stacked GPTQ problem
            groups.setdefault((stats[name].key, bits_for(bits, name)), []).append(name)
        for (_, b), names in groups.items():
            Ws = [linears[n].weight for n in names]
            Q, qt = gptq_quantize(torch.cat(Ws), stats[names[0]].H, b, group_size, sym, damp,
                                  block_size, act_order, static_groups, scale_dtype,
                                  group_params=group_params)
            r = 0
            for n, w, part in zip(names, Ws, _split_rows(qt, [w.shape[0] for w in Ws]), strict=True):
                w.copy_(Q[r:r + w.shape[0]].to(w.dtype))
                result[n] = part
                r += w.shape[0]

    sequential(model, calib, quantize_layer, layers=layers, batch_size=batch_size,
               progress=progress, desc="GPTQ")
    return QuantResult(in_model_order(model, result))
