"""Our from-scratch counterparts of bitsandbytes' block formats (fake-quantized fp32 weights).

Same codes as bitsandbytes for NF4 / FP4, plus plain E2M1, INT4 (symmetric absmax, QLoRA's Int4)
and asymmetric INT4 (our RTN) for QLoRA's data-type comparison, and QLoRA's double quantization
of the per-block absmax.  Built on :mod:`edgellm.quant.formats`.
"""

from __future__ import annotations

import torch

from edgellm.quant.qtensor import QuantError
from edgellm.quant.size import bpw, nf4_bpw

OUR_MODES = ("nf4", "fp4", "fp4_e2m1", "int4", "int4_asym", "int8")


def check_blocks(layers: dict, blocksize: int) -> None:
    """Every linear's weights must split into whole blocks of ``blocksize``."""
    for name, lin in layers.items():
        if lin.weight.numel() % blocksize:
            raise QuantError(f"{name}: {lin.weight.numel()} weights are not a whole number of "
                             f"blocks of {blocksize}")


def check_our_args(mode: str, double_quant: bool = False, blocksize: int = 64) -> None:
    if mode not in OUR_MODES:
        raise QuantError(f"unknown mode {mode!r}; use one of {', '.join(OUR_MODES)}")
    if double_quant and mode not in ("nf4", "fp4", "fp4_e2m1", "int4"):
        raise QuantError(f"double quantization applies to the absmax-scaled 4-bit modes, "
                         f"not {mode!r}")
    if mode != "int8" and (blocksize < 2 or blocksize % 2):
        raise QuantError(f"blocksize={blocksize} must be an even number >= 2")


def double_quantize_absmax(absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """QLoRA's double quantization of the fp32 block absmax (n_blocks,).

    Subtract the mean (the absmax are all positive: centring uses the signed 8-bit code fully),
    then blockwise absmax quantization onto the 256-entry ``code`` table in blocks of
    ``blocksize``.  Returns ``(codes uint8, absmax2 fp32 (n_blocks/blocksize,), offset fp32)``
    with ``absmax ≈ code[codes] * absmax2 + offset``.
    """
    from edgellm.quant.formats import nearest_level

    offset = absmax.mean()
    c = absmax - offset
    pad = (-len(c)) % blocksize
    blocks = torch.cat([c, c.new_zeros(pad)]).reshape(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)  # (n_blocks2,)
    scaled = (blocks * (1.0 / absmax2.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    codes = nearest_level(scaled.reshape(-1), code).to(torch.uint8)[: len(c)]
    return codes, absmax2, offset


def double_dequantize_absmax(codes, absmax2, offset, code, blocksize: int = 256) -> torch.Tensor:
    n = len(codes)
    pad = (-n) % blocksize
    v = torch.cat([code[codes.long()], code.new_zeros(pad)]).reshape(-1, blocksize)
    return (v * absmax2.unsqueeze(1)).reshape(-1)[:n] + offset


def dynamic_code() -> torch.Tensor:
    """The 256-entry signed "dynamic" 8-bit table bitsandbytes stores for double quantization
    (a checkpoint carries it as ``nested_quant_map``); taken from the library."""
    from edgellm.models import quiet_library_logs

    quiet_library_logs()
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise QuantError(f"bitsandbytes is not installed ({e}); pip install bitsandbytes") from None
    return bitsandbytes.functional.create_dynamic_map().float()


def int4_levels() -> torch.Tensor:
    """QLoRA's Int4: symmetric absmax integers -7 … 7, divided by 7 (15 levels)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def lut_table(mode: str) -> torch.Tensor:
    """The 16 (15 for int4) levels in [-1, 1] of a blockwise absmax 4-bit mode, in code order."""
    from edgellm.quant import formats as F

    tables = {"nf4": F.NF4_LEVELS, "fp4": F.BNB_FP4_LEVELS, "fp4_e2m1": F.E2M1_LEVELS / 6,
              "int4": int4_levels()}
    if mode not in tables:
        raise QuantError(f"{mode!r} has no lookup table; use one of {', '.join(tables)}")
    return tables[mode]


def blockwise_dequantized(W: torch.Tensor, mode: str = "nf4", blocksize: int = 64,
                          double_quant: bool = False) -> torch.Tensor:
    """Our from-scratch quantize → dequantize of ``W`` (out, in), float32, same shape.

    nf4 / fp4 (bitsandbytes' table) / fp4_e2m1 (plain E2M1) / int4 (symmetric absmax, 15
    levels): blockwise absmax over the flattened weight, fp32 absmax (8-bit double-quantized
    with ``double_quant``).  int4_asym: min/max RTN per group of ``blocksize`` along the input
    dim, fp16 scale and min (4.5 bits per weight at 64, like NF4 without double quantization).
    int8: LLM.int8()'s weight part (per-row absmax of the fp16 weight, 127 levels).
    """
    from edgellm.quant import formats as F
    from edgellm.quant.rtn import fake_quantize

    check_our_args(mode, double_quant, blocksize)
    W = W.detach().float()
    if mode == "int8":
        codes, stats = F.int8_vectorwise(W.half())
        return F.int8_vectorwise_dequant(codes, stats)
    if mode == "int4_asym":
        return fake_quantize(W, 4, blocksize, sym=False)
    table = lut_table(mode)
    codes, absmax = F.quantize_blockwise_lut(W, table, blocksize)
    if double_quant:
        code = dynamic_code()
        absmax = double_dequantize_absmax(*double_quantize_absmax(absmax, code), code)
    return F.dequantize_blockwise_lut(codes, absmax, table, W.shape)


def our_bpw(mode: str, blocksize: int = 64, double_quant: bool = False) -> float:
    """Storage bits per weight of :func:`blockwise_dequantized`'s format (scales included)."""
    if mode == "int8":
        return 8.0  # + one fp32 scale per row: 32/in_features, left out
    if mode == "int4_asym":
        return bpw(4, blocksize, scale_bits=16, offset_bits=16)
    if double_quant:
        return nf4_bpw(blocksize, double_quant=True)
    return bpw(4, blocksize, scale_bits=32)  # one fp32 absmax per block


@torch.no_grad()
def apply_blockwise(model: torch.nn.Module, mode: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, *, layers: dict | None = None) -> dict:
    """Fake-quantize the decoder linears in place with :func:`blockwise_dequantized`;
    return ``{name: W_hat}`` views of the new weights."""
    from edgellm.models import linear_layers

    check_our_args(mode, double_quant, blocksize)
    layers = linear_layers(model) if layers is None else layers
    if mode not in ("int8", "int4_asym"):
        check_blocks(layers, blocksize)
    else:
        from edgellm.quant.rtn import check_linears

        if mode == "int4_asym":
            check_linears(layers, blocksize)
    out = {}
    for name, lin in layers.items():
        lin.weight.copy_(blockwise_dequantized(lin.weight, mode, blocksize, double_quant))
        out[name] = lin.weight
    return out
