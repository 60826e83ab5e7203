"""llama.cpp's block formats, written in torch from their definitions, and the ``gguf`` route.

All blocks hold 32 consecutive weights of a row and one fp16 scale ``d`` (plus an fp16 minimum
``m`` for the ``_1`` types):

=======  =====================================================  ===========================
type     reconstruction                                         bits per weight
=======  =====================================================  ===========================
Q8_0     ``d * q``, ``q`` int8, ``d = absmax / 127``            8 + 16/32 = 8.5
Q4_0     ``d * (q - 8)``, ``q`` in 0…15, ``d = max / -8``       4 + 16/32 = 4.5
Q4_1     ``d * q + m``, ``q`` in 0…15, ``d = (max-min)/15``     4 + 32/32 = 5.0
Q5_0     ``d * (q - 16)``, ``q`` in 0…31, ``d = max / -16``     5 + 16/32 = 5.5
Q5_1     ``d * q + m``, ``q`` in 0…31, ``d = (max-min)/31``     5 + 32/32 = 6.0
MXFP4    E2M1 value × ``2**e`` (one E8M0 byte per block)        4 + 8/32  = 4.25
=======  =====================================================  ===========================

``max`` in Q4_0/Q5_0 is the *signed* value of largest magnitude: dividing by -8 puts it exactly on
code 0 (value ``-8 d``), the one end of the asymmetric signed range [-8, 7] that has room.
Codes come from the *unrounded* fp32 scale (multiply by ``1/d``, add 0.5 or 8.5, truncate); only
the stored ``d`` and ``m`` are rounded to fp16.  Q8_0 rounds half away from zero.  These are the
rules of llama.cpp's reference quantizer (``quantize_row_*_ref``), which ``gguf.quants`` mirrors;
the tests check our codes, scales and bytes against ``gguf.quants`` on the same tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from edgellm.quant.formats import E2M1_LEVELS, quantize_mxfp4
from edgellm.quant.qtensor import QTensor, QuantError
from edgellm.quant.rtn import check_finite
from edgellm.quant.size import bpw

QK = 32  # weights per block
GGUF_TYPES = ("F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4")
TYPE_BITS = {"F16": 16, "Q8_0": 8, "Q5_1": 5, "Q5_0": 5, "Q4_1": 4, "Q4_0": 4, "MXFP4": 4}
# blocks of 32 weights: an fp16 scale d (Q*_0), plus an fp16 minimum m (Q*_1); MXFP4 an 8-bit
# power-of-two scale (E8M0)
TYPE_BPW = {"F16": 16.0, "Q8_0": bpw(8, QK), "Q5_1": bpw(5, QK, offset_bits=16),
            "Q5_0": bpw(5, QK), "Q4_1": bpw(4, QK, offset_bits=16), "Q4_0": bpw(4, QK),
            "MXFP4": bpw(4, QK, scale_bits=8)}


def _check(W: torch.Tensor, qtype: str) -> None:
    if qtype not in GGUF_TYPES:
        raise QuantError(f"unknown GGUF type {qtype!r}; supported: {', '.join(GGUF_TYPES)}")
    if W.dim() != 2 or W.shape[1] % QK:
        raise QuantError(f"GGUF block types need rows divisible by {QK}; got shape {tuple(W.shape)}")
    check_finite(W)


def _recip(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, 1.0, d))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """roundf: half away from zero, computed without the x + 0.5 rounding trap."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _signed_max(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, with its sign (first one on ties)."""
    i = blocks.abs().argmax(dim=-1, keepdim=True)
    return blocks.gather(-1, i)


def quantize_gguf(W: torch.Tensor, qtype: str = "Q4_0") -> QTensor:
    """Quantize ``W`` (out, in) to a llama.cpp block type; codes are signed for the ``_0`` types
    (Q4_0 codes in [-8, 7]) so that ``w_hat = codes * scale + offset`` for all types."""
    _check(W, qtype)
    out, n = W.shape
    x = W.detach().float().reshape(out, n // QK, QK)  # (out, G, 32)
    if qtype == "F16":
        h = W.detach().half()
        return QTensor(h.float(), torch.ones(out, 1), torch.zeros(out, 1), (out, n), 16, n,
                       True, "F16", 0)
    if qtype == "MXFP4":
        codes, exp = quantize_mxfp4(x)
        scale = torch.ldexp(torch.ones(len(exp)), exp).reshape(out, n // QK)
        return QTensor(codes.reshape(out, n), scale, torch.zeros_like(scale), (out, n), 4, QK,
                       True, "MXFP4", 8, levels=E2M1_LEVELS)
    if qtype == "Q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_half_away(x * _recip(d))
        return _qt(q, d, None, qtype, out, n, 8, True)
    if qtype in ("Q4_0", "Q5_0"):
        half = 8 if qtype == "Q4_0" else 16
        d = _signed_max(x) / -half
        q = torch.trunc(x * _recip(d) + (half + 0.5)).clamp(0, 2 * half - 1) - half
        return _qt(q, d, None, qtype, out, n, TYPE_BITS[qtype], True)
    # Q4_1, Q5_1
    top = 15 if qtype == "Q4_1" else 31
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    d = (hi - lo) / top
    q = torch.trunc((x - lo) * _recip(d) + 0.5).clamp(0, top)
    return _qt(q, d, lo, qtype, out, n, TYPE_BITS[qtype], False)


def _qt(q, d, m, qtype, out, n, bits, sym) -> QTensor:
    scale = d.squeeze(-1).half().float()  # stored as fp16
    offset = torch.zeros_like(scale) if m is None else m.squeeze(-1).half().float()
    return QTensor(q.reshape(out, n).to(torch.int8 if bits <= 7 or sym else torch.int16), scale,
                   offset, (out, n), bits, QK, sym, qtype, 16)


def to_gguf_bytes(qt: QTensor) -> np.ndarray:
    """The bytes llama.cpp stores for ``qt`` (rows of blocks), as a uint8 (out, bytes_per_row)."""
    out, n = qt.shape
    G = n // QK
    if qt.fmt == "F16":
        return qt.codes.half().numpy().view(np.uint8).reshape(out, -1)
    codes = qt.codes.reshape(out * G, QK).to(torch.int32)
    parts = []
    if qt.fmt == "MXFP4":
        e = torch.log2(qt.scale).round().to(torch.int32).reshape(-1, 1) + 127  # E8M0 biased
        parts.append(e.to(torch.uint8))
    else:
        parts.append(qt.scale.reshape(-1, 1).half().view(torch.uint8))  # d (fp16, little endian)
        if not qt.sym:
            parts.append(qt.offset.reshape(-1, 1).half().view(torch.uint8))  # m
    if qt.fmt == "Q8_0":
        parts.append(codes.to(torch.int8).view(torch.uint8))
    else:
        if qt.fmt in ("Q4_0", "Q5_0"):
            codes = codes + (8 if qt.fmt == "Q4_0" else 16)  # back to unsigned 0…15 / 0…31
        if qt.fmt in ("Q5_0", "Q5_1"):  # 5th bits of the 32 codes in one little-endian uint32
            hb = ((codes >> 4) & 1).to(torch.int64) << torch.arange(32)
            qh = hb.sum(dim=1).to(torch.int64)
            parts.append(torch.stack([(qh >> (8 * k)) & 0xFF for k in range(4)], 1).to(torch.uint8))
        lo4 = codes & 0xF
        # element j in the low nibble of byte j, element j + 16 in its high nibble
        parts.append((lo4[:, :16] | (lo4[:, 16:] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=1).reshape(out, -1).numpy()


def ggml_type(qtype: str):
    from gguf import GGMLQuantizationType

    return getattr(GGMLQuantizationType, qtype)


def gguf_quantize_numpy(W: torch.Tensor, qtype: str = "Q4_0") -> torch.Tensor:
    """Quantize → dequantize ``W`` through the ``gguf`` package (numpy, llama.cpp's reference
    rules); returns float32 ``w_hat`` (out, in)."""
    from gguf import quants

    _check(W, qtype)
    a = W.detach().float().numpy()
    if qtype == "F16":
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    raw = quants.quantize(a, ggml_type(qtype))
    return torch.from_numpy(quants.dequantize(raw, ggml_type(qtype)).astype(np.float32))


@torch.no_grad()
def apply_gguf(model: torch.nn.Module, qtype: str = "Q4_0", *, layers=None,
               progress: bool = False) -> dict[str, QTensor]:
    """Fake-quantize the decoder linears through ``gguf.quants`` (llama.cpp's own rules).

    Weights are replaced in place by the gguf round trip; the returned QTensors are our torch
    implementation of the same type (identical values, checked here) for size accounting/saving.
    """
    from edgellm.models import linear_layers

    layers = linear_layers(model) if layers is None else layers
    items = layers.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"gguf {qtype}", leave=False)
    out = {}
    for name, lin in items:
        w_hat = gguf_quantize_numpy(lin.weight, qtype)
        qt = quantize_gguf(lin.weight, qtype)
        if not torch.equal(qt.dequantize(), w_hat):  # pragma: no cover - a bug if it happens
            diff = (qt.dequantize() - w_hat).abs().max().item()
            raise QuantError(f"{name}: torch {qtype} differs from gguf.quants by {diff:.3g}")
        lin.weight.copy_(w_hat.to(lin.weight.dtype))
        out[name] = qt
    return out
