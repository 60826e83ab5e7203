"""Round-to-nearest (RTN) min/max quantization: the baseline every other method is compared to.

For a group of weights ``w`` (the last dim of a tensor) and ``b`` bits:

asymmetric (``sym=False``, llama.cpp Q4_1's form)
    ``scale = (max - min) / (2**b - 1)``, ``offset = min``,
    ``q = clamp(round((w - offset) / scale), 0, 2**b - 1)``, ``w_hat = q * scale + offset``.
symmetric (``sym=True``)
    ``scale = absmax / (2**(b-1) - 1)``, ``offset = 0``,
    ``q = clamp(round(w / scale), -(2**(b-1) - 1), 2**(b-1) - 1)``, ``w_hat = q * scale``.
    This "restricted" range leaves the code ``-2**(b-1)`` unused so the grid is symmetric about 0
    (``2**b - 1`` levels).  Alternatives: the full range with ``scale = absmax / 2**(b-1)`` wastes
    the top level; llama.cpp's Q4_0 takes the *signed* value of largest magnitude ``m`` and sets
    ``scale = m / -8`` so that extreme value lands exactly on code -8 (see
    :func:`edgellm.quant.gguf_formats.quantize_q4_0`).

Scales and offsets are rounded through ``scale_dtype`` (fp16, as stored formats keep them) *before*
the codes are computed, so ``w_hat`` is exactly what a packed model reconstructs.  With 4 bits,
groups of 32 and fp16 parameters the asymmetric quantizer reproduces the default model's linear
layers exactly: they were stored that way (Q4_1) in the GGUF the model comes from.
"""

from __future__ import annotations

import torch

from edgellm.quant.qtensor import QTensor, QuantError, dtype_bits
from edgellm.quant.result import QuantResult

SUPPORTED_BITS = tuple(range(2, 9))


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantError(f"bits={bits} is not supported; integer formats take bits "
                         f"{SUPPORTED_BITS[0]}–{SUPPORTED_BITS[-1]}")


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    if not torch.isfinite(w).all():
        n_bad = int((~torch.isfinite(w)).sum())
        raise QuantError(f"{name} holds {n_bad} NaN/Inf values; quantization needs finite weights "
                         "(check the checkpoint or an earlier transformation)")


def group_size_choices(in_features: int) -> list[int]:
    """Divisors of ``in_features`` that make sensible group sizes (multiples of 16, or all)."""
    divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
    nice = [d for d in divisors if d % 16 == 0]
    return nice or divisors


def check_group_size(in_features: int, group_size: int | None) -> None:
    """Raise :class:`QuantError` unless ``group_size`` (None = per channel) divides ``in_features``."""
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        ok = group_size_choices(in_features)
        listing = ", ".join(map(str, ok[:-1])) + f" or {ok[-1]}" if len(ok) > 1 else str(ok[0])
        raise QuantError(f"group_size={group_size} does not divide in_features={in_features}; use "
                         f"{listing} (or per-channel quantization: group_size=None)")


def _round_through(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype).float()


def minmax_params(w: torch.Tensor, bits: int = 4, sym: bool = False,
                  scale_dtype: torch.dtype | None = torch.float16):
    """Min/max quantization parameters over the LAST dim of ``w`` ``(..., n)``.

    Returns ``(scale, offset)``, each ``(..., 1)`` float32, rounded through ``scale_dtype``
    (``None`` keeps fp32).  See the module docstring for the two forms.
    """
    check_bits(bits)
    w = w.float()
    if sym:
        absmax = w.abs().amax(dim=-1, keepdim=True)  # (..., 1)
        scale = _round_through(absmax / (2 ** (bits - 1) - 1), scale_dtype)
        return scale, torch.zeros_like(scale)
    lo = w.amin(dim=-1, keepdim=True)  # (..., 1)
    hi = w.amax(dim=-1, keepdim=True)
    scale = _round_through((hi - lo) / (2 ** bits - 1), scale_dtype)
    offset = _round_through(lo, scale_dtype)
    return scale, offset


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)


def _code_dtype(bits: int, sym: bool) -> torch.dtype:
    lo, hi = code_range(bits, sym)
    return torch.int8 if -128 <= lo and hi <= 127 else torch.int16


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int = 4,
                   sym: bool = False) -> torch.Tensor:
    """Integer codes ``clamp(round((w - offset) / scale))`` (int8, or int16 for 8-bit asym).

    ``round`` is torch's round-half-to-even; a zero scale (a constant group) gives code 0.
    """
    lo, hi = code_range(bits, sym)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # constant group: no division by 0
    q = torch.round((w.float() - offset) / safe)
    return q.clamp_(lo, hi).to(_code_dtype(bits, sym))


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 ``w_hat = q * scale + offset``."""
    return q.float() * scale + offset


def fake_quant(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int = 4,
               sym: bool = False) -> torch.Tensor:
    """Quantize then dequantize: ``w_hat`` in float32, same shape as ``w``."""
    return dequantize_codes(quantize_codes(w, scale, offset, bits, sym), scale, offset)


def quantize(W: torch.Tensor, bits: int = 4, group_size: int | None = 64, sym: bool = False,
             scale_dtype: torch.dtype | None = torch.float16) -> QTensor:
    """RTN-quantize ``W`` (out, in) per group of ``group_size`` input columns.

    ``group_size=None`` quantizes per output channel (one group spanning the whole row).
    """
    if W.dim() != 2:
        raise QuantError(f"expected a 2-D (out_features, in_features) weight, got shape "
                         f"{tuple(W.shape)}")
    check_bits(bits)
    out, n = W.shape
    check_group_size(n, group_size)
    check_finite(W)
    g = n if group_size is None else group_size
    Wg = W.detach().float().reshape(out, n // g, g)  # (out, G, g)
    scale, offset = minmax_params(Wg, bits, sym, scale_dtype)  # (out, G, 1)
    q = quantize_codes(Wg, scale, offset, bits, sym)  # (out, G, g)
    return QTensor(codes=q.reshape(out, n), scale=scale.squeeze(-1), offset=offset.squeeze(-1),
                   shape=(out, n), bits=bits, group_size=g, sym=sym, fmt="int",
                   scale_bits=dtype_bits(scale_dtype))


def fake_quantize(W: torch.Tensor, bits: int = 4, group_size: int | None = 64, sym: bool = False,
                  scale_dtype: torch.dtype | None = torch.float16) -> torch.Tensor:
    """``quantize(W, ...).dequantize()``: float32 (out, in)."""
    return quantize(W, bits, group_size, sym, scale_dtype).dequantize()


@torch.no_grad()
def apply_rtn(model: torch.nn.Module, *, bits: int | dict[str, int] = 4,
              group_size: int | None = 64, sym: bool = False,
              scale_dtype: torch.dtype | None = torch.float16,
              layers: dict[str, torch.nn.Linear] | None = None,
              progress: bool = False) -> QuantResult:
    """Fake-quantize the decoder's linear layers in place; return a
    :class:`QuantResult` (``qtensors`` ``{name: QTensor}``).

    Each weight is replaced by its dequantized value (same dtype as before).  ``layers`` defaults
    to :func:`edgellm.models.linear_layers` (the 210 decoder linears of the default model; the
    tied embedding / lm_head is *not* quantized).  ``bits`` may be a dict ``{name: bits}``
    (mixed precision).
    """
    from edgellm.models import linear_layers

    layers = linear_layers(model) if layers is None else layers
    items = layers.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="RTN", leave=False)
    out = {}
    for name, lin in items:
        b = bits[name] if isinstance(bits, dict) else bits
        try:
            qt = quantize(lin.weight, b, group_size, sym, scale_dtype)
        except QuantError as e:
            raise QuantError(f"{name}: {e}") from None
        lin.weight.copy_(qt.dequantize().to(lin.weight.dtype))
        out[name] = qt
    return QuantResult(out)


def check_linears(linears: dict, group_size: int | None) -> None:
    """Fail early, naming the layer: every weight finite and divisible into groups."""
    for name, lin in linears.items():
        try:
            check_group_size(lin.in_features, group_size)
            check_finite(lin.weight, name)
        except QuantError as e:
            raise QuantError(f"{name}: {e}") from None
