"""Number formats for weights: INTn, FP8 (E4M3, E5M2), FP4 (E2M1), NF4, MXFP4, bitsandbytes variants.

Every format is a *grid* of representable values plus a *scale* (and for asymmetric integers an
offset) shared by a group of weights.  Quantizing = scale the group onto the grid, round to the
nearest grid point, keep the index ("code").  The formats differ in where the grid points sit:

- INTn: evenly spaced (``2**n`` levels, symmetric or asymmetric; see :mod:`edgellm.quant.rtn`).
- FPx (ExMy): a sign, ``x`` exponent bits and ``y`` mantissa bits: points dense near 0, sparse far
  out, relative spacing ``2**-y``.  E4M3 (max 448) and E5M2 (max 57344) are the two FP8 formats;
  E2M1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6) is FP4.
- NF4 (QLoRA): the 16 levels are quantiles of a standard normal, normalised to [-1, 1], with an
  exact zero: optimal-ish for normally distributed weights scaled by their block's absmax.
- MXFP4 (OCP microscaling): E2M1 elements sharing a power-of-two (E8M0) scale per 32 values.

Granularity: ``group_size=None`` per output channel, an int: per group of that many input columns,
``group_size=-1``: one scale for the whole tensor (see :func:`quantize_format`).

Over 400 lines because it is the single catalogue of formats the lessons compare side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgellm.quant.qtensor import QTensor, QuantError
from edgellm.quant.rtn import check_bits, check_finite, check_group_size, code_range

# --------------------------------------------------------------------------------------------
# minifloats (ExMy)


@dataclass(frozen=True)
class FloatFormat:
    """A sign + ``exp_bits`` exponent + ``man_bits`` mantissa minifloat.

    ``special``: ``"ieee"`` (top exponent reserved for Inf/NaN, E5M2), ``"fn"`` (only the all-ones
    pattern is NaN, no Inf: E4M3FN, max 448), ``"none"`` (every pattern is a number: E2M1).
    """

    name: str
    exp_bits: int
    man_bits: int
    special: str = "none"

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def max(self) -> float:
        top_e = 2 ** self.exp_bits - 1 - (1 if self.special == "ieee" else 0)
        top_m = 2 ** self.man_bits - 1 - (1 if self.special == "fn" else 0)
        return (1 + top_m / 2 ** self.man_bits) * 2.0 ** (top_e - self.bias)

    def magnitudes(self) -> torch.Tensor:
        """Non-negative values in code order (codes 0 … 2**(bits-1)-1 without the sign bit);
        NaN/Inf patterns excluded.  Increasing, so the code of a value is its index."""
        out = []
        for code in range(2 ** (self.exp_bits + self.man_bits)):
            e, m = code >> self.man_bits, code & (2 ** self.man_bits - 1)
            if e == 0:  # subnormal: m * 2**(emin - man_bits)
                v = m * 2.0 ** (self.emin - self.man_bits)
            else:
                v = (1 + m / 2 ** self.man_bits) * 2.0 ** (e - self.bias)
            if v > self.max:
                break
            out.append(v)
        return torch.tensor(out, dtype=torch.float64)

    def levels(self) -> torch.Tensor:
        """All finite values, sorted, one zero."""
        mag = self.magnitudes()
        return torch.cat([-mag.flip(0)[:-1], mag]).float()


E4M3 = FloatFormat("fp8_e4m3", 4, 3, "fn")
E5M2 = FloatFormat("fp8_e5m2", 5, 2, "ieee")
E2M1 = FloatFormat("fp4_e2m1", 2, 1, "none")
FLOAT_FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}


def round_to_float(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round float32 ``x`` to the nearest value of ``fmt``, ties to even mantissa.

    Overflow follows torch's casts: E4M3FN saturates to ±448 (Inf too), IEEE-style formats go to
    ±Inf beyond ``max + half a step``, E2M1 (no Inf) saturates.  NaN stays NaN.
    """
    x = x.float()
    a = x.abs()
    # exponent of each value: a = f * 2**e with f in [0.5, 1)  ->  floor(log2 a) = e - 1
    _, e = torch.frexp(a)
    e = (e - 1).clamp(min=fmt.emin)  # below the normal range: the subnormal spacing
    step = torch.ldexp(torch.ones_like(a), e - fmt.man_bits)  # distance between neighbours
    r = torch.round(a / step) * step  # a/step is exact (power-of-two step); round = half to even
    if fmt.special == "ieee":
        overflow = a >= fmt.max + 2.0 ** (math.floor(math.log2(fmt.max)) - fmt.man_bits - 1)
        r = torch.where(overflow, torch.full_like(r, math.inf), r)
    else:
        r = r.clamp(max=fmt.max)
    r = torch.where(torch.isnan(x), x, r)
    return torch.copysign(r, x)


def float_codes(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Bit patterns (uint8) of values already on ``fmt``'s grid (sign bit on top)."""
    mag = fmt.magnitudes().float()
    idx = torch.searchsorted(mag, values.abs().float().contiguous())
    sign = (torch.signbit(values).to(torch.uint8) << (fmt.bits - 1))
    return idx.to(torch.uint8) | sign


def float_decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Values of bit patterns produced by :func:`float_codes`."""
    mag = fmt.magnitudes().float()
    c = codes.long()
    half = 2 ** (fmt.bits - 1)
    v = mag[(c % half).clamp(max=len(mag) - 1)]
    return torch.where(c >= half, -v, v)


# --------------------------------------------------------------------------------------------
# lookup-table formats: NF4, bitsandbytes' FP4


# QLoRA's NormalFloat4: 8 positive quantiles of N(0, 1) on linspace(0.9677083, 0.5, 9), 7 negative
# ones on linspace(0.9677083, 0.5, 8), plus an exact 0, divided by the largest (so ±1 are levels).
# These float32 values are the published table (QLoRA appendix; bitsandbytes' get_4bit_type);
# :func:`nf4_levels_from_normal` recomputes them from the normal quantile function.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def nf4_levels_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the NF4 levels: ``Φ⁻¹`` at evenly spaced probabilities, asymmetric so that 0 is
    a level (8 positive, 7 negative), normalised to [-1, 1]."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


# bitsandbytes' "fp4" is not plain E2M1: its 3 magnitude bits decode (in code order) to
# 0, 0.0625, 8, 12, 4, 6, 2, 3 (a subnormal 0.0625 instead of E2M1's 0.5, exponent order
# reversed), divided by 12.  Codes 8-15 are the negatives.  Plain E2M1 is :data:`E2M1`.
BNB_FP4_LEVELS = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32)
BNB_FP4_LEVELS = torch.cat([BNB_FP4_LEVELS, -BNB_FP4_LEVELS]) / 12.0

E2M1_LEVELS = torch.cat([E2M1.magnitudes(), -E2M1.magnitudes()]).float()  # code order, OCP MX

LUT_FORMATS = {"nf4": NF4_LEVELS, "bnb_fp4": BNB_FP4_LEVELS}


def nearest_level(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index into ``table`` (any order) of the level nearest each element of ``x``.

    Decision boundaries are the midpoints of neighbouring sorted levels computed in float32;
    a value exactly on a boundary goes to the lower level (bitsandbytes' rule).
    """
    order = torch.sort(table, stable=True).indices
    srt = table[order]
    bounds = (srt[:-1] + srt[1:]) / 2  # float32 midpoints
    i = torch.bucketize(x.float().contiguous(), bounds)  # bounds[i-1] < x <= bounds[i]
    return order[i]


def quantize_blockwise_lut(w: torch.Tensor, table: torch.Tensor, blocksize: int = 64):
    """Blockwise absmax quantization onto a lookup table (NF4, FP4): bitsandbytes' scheme.

    ``w`` is flattened and cut into blocks of ``blocksize`` (numel must be divisible).
    Returns ``(codes, absmax)``: codes (n,) uint8 indices into ``table``, absmax (n_blocks,) fp32.
    ``w_hat = table[codes] * absmax``.
    """
    flat = w.detach().reshape(-1).float()
    if flat.numel() % blocksize:
        raise QuantError(f"{flat.numel()} elements are not a whole number of blocks of {blocksize}")
    blocks = flat.reshape(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # multiply by the reciprocal (as bitsandbytes does), clamp rounding overshoot to [-1, 1]
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    codes = nearest_level(scaled.reshape(-1), table).to(torch.uint8)
    return codes, absmax


def dequantize_blockwise_lut(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                             shape=None) -> torch.Tensor:
    w = table[codes.long()].reshape(len(absmax), -1) * absmax.unsqueeze(1)
    return w.reshape(shape) if shape is not None else w.reshape(-1)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64):
    """NF4 codes and fp32 absmax per block of ``blocksize`` (flattened order)."""
    return quantize_blockwise_lut(w, NF4_LEVELS, blocksize)


def dequantize_nf4(codes, absmax, shape=None) -> torch.Tensor:
    return dequantize_blockwise_lut(codes, absmax, NF4_LEVELS, shape)


def quantize_bnb_fp4(w: torch.Tensor, blocksize: int = 64):
    """bitsandbytes' "fp4" variant (see :data:`BNB_FP4_LEVELS`)."""
    return quantize_blockwise_lut(w, BNB_FP4_LEVELS, blocksize)


def dequantize_bnb_fp4(codes, absmax, shape=None) -> torch.Tensor:
    return dequantize_blockwise_lut(codes, absmax, BNB_FP4_LEVELS, shape)


def pack_nibbles_bnb(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte as bitsandbytes stores them: first code in the HIGH nibble."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return (c[0::2] << 4) | c[1::2]


# --------------------------------------------------------------------------------------------
# LLM.int8(): vector-wise (per-row absmax) int8


def int8_vectorwise(A: torch.Tensor):
    """Per-row absmax int8: ``codes = round(A * (127 / absmax_row))``, ``row_stats = absmax_row``.

    Returns ``(codes int8 (rows, cols), row_stats float32 (rows,))``; ``A ≈ codes * row_stats/127``.
    Rounding is half to even; the product is taken in float32 like bitsandbytes.
    """
    row_stats = A.abs().amax(dim=-1).float()  # (rows,)
    codes = torch.round(A * (127.0 / row_stats.unsqueeze(-1)))
    return codes.to(torch.int8), row_stats


def int8_vectorwise_dequant(codes: torch.Tensor, row_stats: torch.Tensor) -> torch.Tensor:
    return codes.float() * (row_stats.unsqueeze(-1) / 127.0)


# --------------------------------------------------------------------------------------------
# MXFP4: E2M1 elements with a shared E8M0 (power-of-two) scale per block of 32


def mxfp4_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Shared scale exponent ``floor(log2(amax)) - 2`` (E2M1's largest exponent is 2), so the
    block's largest magnitude lands in [4, 8) × 2**exp, i.e. near E2M1's top value 6.
    An all-zero block gets the smallest E8M0 scale, 2**-127 (stored byte 0), like llama.cpp."""
    _, e = torch.frexp(amax.float())
    return torch.where(amax > 0, (e - 1) - 2, torch.full_like(e, -127))


def quantize_mxfp4(w: torch.Tensor, block: int = 32):
    """MXFP4 over the flattened ``w`` (numel divisible by 32).

    Returns ``(codes (n,) uint8 indices into E2M1_LEVELS, exp (n_blocks,) int32)`` with
    ``w_hat = E2M1_LEVELS[codes] * 2**exp``.  Nearest level; ties go to the smaller magnitude
    and zero is +0 (llama.cpp / gguf's order of the table).
    """
    flat = w.detach().reshape(-1).float()
    if flat.numel() % block:
        raise QuantError(f"MXFP4 needs a multiple of {block} elements, got {flat.numel()}")
    blocks = flat.reshape(-1, block)  # (n_blocks, 32)
    exp = mxfp4_exponent(blocks.abs().amax(dim=1))  # (n_blocks,)
    scale = torch.ldexp(torch.ones_like(blocks[:, 0]), exp).unsqueeze(1)  # 2**exp, exact
    # distance to each of the 16 table values, first minimum wins (+0 before -0, small first)
    err = (scale.unsqueeze(-1) * E2M1_LEVELS - blocks.unsqueeze(-1)).abs()  # (n_blocks, 32, 16)
    codes = err.argmin(dim=-1).to(torch.uint8)
    return codes.reshape(-1), exp.to(torch.int32)


def dequantize_mxfp4(codes, exp, shape=None) -> torch.Tensor:
    w = E2M1_LEVELS[codes.long()].reshape(len(exp), -1) * torch.ldexp(
        torch.ones(len(exp)), exp).unsqueeze(1)
    return w.reshape(shape) if shape is not None else w.reshape(-1)


# --------------------------------------------------------------------------------------------
# one entry point over formats and granularities (used by the lesson's widget and sweeps)

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "bnb_fp4", "mxfp4")


def format_bits(fmt: str, bits: int | None = None) -> int:
    if fmt == "int":
        return 4 if bits is None else bits
    return {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "nf4": 4, "bnb_fp4": 4, "mxfp4": 4}[fmt]


def _groups(W: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """View ``W`` (out, in) as groups ``(out, G, g)``; -1: whole tensor as one group."""
    out, n = W.shape
    if group_size == -1:
        return W.reshape(1, 1, out * n), out * n
    g = n if group_size is None else group_size
    return W.reshape(out, n // g, g), g


def quantize_format(W: torch.Tensor, fmt: str = "int", bits: int = 4,
                    group_size: int | None = 64, sym: bool = False,
                    scale_dtype: torch.dtype | None = torch.float16) -> QTensor:
    """Quantize ``W`` (out, in) with any format of :data:`FORMATS` at any granularity.

    ``group_size``: an int (groups along the input dim), ``None`` (per output channel) or ``-1``
    (per tensor).  Non-integer formats are symmetric absmax-scaled: the group's absmax maps to
    the format's largest value (1 for NF4/bnb_fp4, 448 / 57344 / 6 for FP8 / FP4);
    MXFP4 ignores ``group_size``/``scale_dtype`` (blocks of 32, power-of-two scale).
    The returned QTensor's codes index ``levels`` for the table formats.
    """
    if fmt not in FORMATS:
        raise QuantError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if W.dim() != 2:
        raise QuantError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    check_finite(W)
    if fmt == "int":
        check_bits(bits)
    out, n = W.shape
    if group_size != -1:
        check_group_size(n, group_size)
    from edgellm.quant.qtensor import dtype_bits

    sbits = dtype_bits(scale_dtype)
    W = W.detach().float()
    if fmt == "int":
        from edgellm.quant.rtn import minmax_params, quantize_codes

        Wg, g = _groups(W, group_size)
        scale, offset = minmax_params(Wg, bits, sym, scale_dtype)
        q = quantize_codes(Wg, scale, offset, bits, sym)
        return QTensor(q.reshape(out, n), scale.squeeze(-1), offset.squeeze(-1), (out, n), bits,
                       g, sym, "int", sbits)
    if fmt == "mxfp4":
        if n % 32:
            raise QuantError(f"MXFP4 needs in_features divisible by 32, got {n}")
        codes, exp = quantize_mxfp4(W)
        scale = torch.ldexp(torch.ones(len(exp)), exp).reshape(out, n // 32)
        return QTensor(codes.reshape(out, n), scale, torch.zeros_like(scale), (out, n), 4, 32,
                       True, "mxfp4", 8, levels=E2M1_LEVELS)
    Wg, g = _groups(W, group_size)
    absmax = Wg.abs().amax(dim=-1, keepdim=True)  # (out, G, 1)
    if fmt in LUT_FORMATS:
        table = LUT_FORMATS[fmt]
        scale = absmax if scale_dtype is None else absmax.to(scale_dtype).float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = nearest_level((Wg / safe).clamp(-1, 1), table).to(torch.uint8)
    else:
        ff = FLOAT_FORMATS[fmt]
        scale = absmax / ff.max
        scale = scale if scale_dtype is None else scale.to(scale_dtype).float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = float_codes(round_to_float((Wg / safe).clamp(-ff.max, ff.max), ff), ff)
        table = _float_table(ff)
    scale = scale.squeeze(-1)
    return QTensor(codes.reshape(out, n), scale, torch.zeros_like(scale), (out, n),
                   format_bits(fmt), g, True, fmt, sbits, levels=table)


def _float_table(ff: FloatFormat) -> torch.Tensor:
    """Finite values of a minifloat in sign-magnitude code order (code = index)."""
    mag = ff.magnitudes().float()
    pad = torch.full((2 ** (ff.bits - 1) - len(mag),), float("nan"))
    mag = torch.cat([mag, pad])
    return torch.cat([mag, -mag])


@torch.no_grad()
def apply_format(model: torch.nn.Module, fmt: str = "int", bits: int = 4,
                 group_size: int | None = 64, sym: bool = False,
                 scale_dtype: torch.dtype | None = torch.float16, *, layers=None) -> dict:
    """Fake-quantize the decoder linears in place with :func:`quantize_format`;
    return ``{name: QTensor}`` (the tied embedding / lm_head is not quantized)."""
    from edgellm.models import linear_layers

    layers = linear_layers(model) if layers is None else layers
    out = {}
    for name, lin in layers.items():
        try:
            qt = quantize_format(lin.weight, fmt, bits, group_size, sym, scale_dtype)
        except QuantError as e:
            raise QuantError(f"{name}: {e}") from None
        lin.weight.copy_(qt.dequantize().to(lin.weight.dtype))
        out[name] = qt
    return out


def quantization_error(W: torch.Tensor, W_hat: torch.Tensor) -> dict:
    """Relative Frobenius error, RMSE, max abs error and SQNR (dB) between W and W_hat."""
    W, W_hat = W.float(), W_hat.float()
    err = W_hat - W
    mse = err.pow(2).mean()
    return {"rel_err": float(err.norm() / W.norm()), "rmse": float(mse.sqrt()),
            "max_abs": float(err.abs().max()),
            "sqnr_db": float(10 * torch.log10(W.pow(2).mean() / mse)) if mse > 0 else math.inf}


__all__ = [
    "E2M1", "E2M1_LEVELS", "E4M3", "apply_format", "E5M2", "FORMATS", "FloatFormat", "NF4_LEVELS",
    "BNB_FP4_LEVELS", "code_range", "pack_nibbles_bnb", "dequantize_bnb_fp4", "dequantize_mxfp4", "dequantize_nf4",
    "float_codes", "float_decode", "int8_vectorwise", "int8_vectorwise_dequant",
    "nearest_level", "nf4_levels_from_normal", "quantization_error", "quantize_bnb_fp4",
    "quantize_format", "quantize_mxfp4", "quantize_nf4", "round_to_float",
]
