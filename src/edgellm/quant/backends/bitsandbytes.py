"""bitsandbytes on CPU: NF4 / FP4 (+ double quantization) and LLM.int8(), swapped into a model.

:func:`apply_bnb` swaps every decoder linear for a bitsandbytes ``Linear4bit`` (NF4 or FP4 codes
packed two per byte, one fp32 absmax per block of 64, optionally double-quantized) or
``Linear8bitLt`` (int8 codes per row + fp32 row scale; activations quantized per token at run time,
activation columns with a value above ``threshold`` kept in float: LLM.int8()).  The tied
embedding / lm_head stays fp32: bitsandbytes only replaces ``nn.Linear`` modules.
"""

from __future__ import annotations

import torch

from edgellm.models import quiet_library_logs
from edgellm.quant.blockwise import OUR_MODES, check_blocks
from edgellm.quant.modules import replace_module
from edgellm.quant.qtensor import QuantError

BNB_MODES = ("nf4", "fp4", "int8")


BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def import_bnb():
    """``bitsandbytes`` (a clear QuantError if it is not installed)."""
    quiet_library_logs()
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise QuantError(f"bitsandbytes is not installed ({e}); pip install bitsandbytes") from None
    return bitsandbytes


def check_bnb_args(mode: str, double_quant: bool = False, blocksize: int = 64,
                   threshold: float = 6.0) -> None:
    if mode not in BNB_MODES:
        hint = " (our own implementation: --impl edgellm)" if mode in OUR_MODES else ""
        raise QuantError(f"unknown bitsandbytes mode {mode!r}; use one of "
                         f"{', '.join(BNB_MODES)}{hint}")
    if mode == "int8":
        if double_quant:
            raise QuantError("double quantization compresses the 4-bit modes' block absmax; "
                             "int8 (LLM.int8()) has one scale per row: drop --double-quant")
        if threshold < 0:
            raise QuantError(f"threshold={threshold} must be >= 0 (0 disables the outlier "
                             "decomposition; LLM.int8() uses 6.0)")
    elif blocksize not in BNB_BLOCKSIZES:
        raise QuantError(f"blocksize={blocksize} is not supported by bitsandbytes; use one of "
                         f"{', '.join(map(str, BNB_BLOCKSIZES))}")


@torch.no_grad()
def apply_bnb(model: torch.nn.Module, mode: str = "nf4", double_quant: bool = False,
              blocksize: int = 64, compute_dtype: torch.dtype = torch.float32,
              threshold: float = 6.0, cpu_kernel: bool = True, *,
              layers: dict | None = None) -> dict:
    """Replace the decoder linears of ``model`` (in place) by bitsandbytes modules on CPU.

    ``mode``: ``"nf4"`` / ``"fp4"`` → ``Linear4bit`` (blockwise absmax, ``blocksize`` weights per
    fp32 absmax in the flattened row-major weight; ``double_quant``: QLoRA's second quantization of
    the absmax to 8 bits, blocks of 256); ``"int8"`` → ``Linear8bitLt`` (LLM.int8(): weights int8
    per row from their fp16 copy; activation columns with any ``|x| >= threshold`` stay in float).
    ``compute_dtype``: dtype of the 4-bit matmul when it dequantizes (fp32 here).
    ``cpu_kernel``: on a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` re-lays its weight out
    at the first inference forward for a fused kernel that computes in bf16, with the absmax
    (double quantization undone) stored as bf16; ``False`` keeps the stored format and
    dequantizes to ``compute_dtype`` before an ordinary matmul (exactly our fp32 NF4 / FP4).
    Returns ``{name: new module}``.  The tied embedding / lm_head is not touched.
    """
    from edgellm.models import linear_layers

    check_bnb_args(mode, double_quant, blocksize, threshold)
    bnb = import_bnb()
    layers = linear_layers(model) if layers is None else layers
    if mode != "int8":
        check_blocks(layers, blocksize)
    out = {}
    for name, lin in layers.items():
        W = lin.weight.detach().float().contiguous()  # (out, in)
        has_bias = lin.bias is not None
        if mode == "int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias,
                                      has_fp16_weights=False, threshold=threshold, device="meta")
            # Int8Params quantizes on the first move to a device: fp16 copy -> int8 codes + SCB
            new.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
            new.weight = new.weight.to("cpu")
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias,
                                    compute_dtype=compute_dtype, compress_statistics=double_quant,
                                    quant_type=mode, device="meta")
            new.weight = bnb.nn.Params4bit(W, requires_grad=False, blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type=mode,
                                           module=new)
            new.weight = new.weight.to("cpu")  # quantizes: packed uint8 (numel/2, 1) + quant_state
            new.weight.module = new
            new.quant_state = new.weight.quant_state
            new.support_avx512bf16_for_cpu = new.support_avx512bf16_for_cpu and cpu_kernel
        if has_bias:
            new.bias = torch.nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
        new.eval()
        replace_module(model, name, new)
        out[name] = new
    return out


def bnb_dequantize(module: torch.nn.Module) -> torch.Tensor:
    """float32 weight (out, in) that a bitsandbytes linear effectively multiplies by."""
    bnb = import_bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        qs = module.weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            return cpu_layout_dequantize(module.weight.data, qs.absmax, qs.code, qs.blocksize)
        return bnb.functional.dequantize_4bit(module.weight.data, qs).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        CB, SCB = int8_state(module)
        return CB.float() * (SCB.float().unsqueeze(1) / 127.0)
    raise QuantError(f"{type(module).__name__} is not a bitsandbytes linear")


def cpu_layout_codes(packed: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """4-bit codes (N, K) from bitsandbytes' AVX512 CPU layout ``packed`` (N, K/2) uint8.

    The fused kernel reads 32 output rows at a time: for each tile of 32 rows and each pair of
    input columns it stores 64 codes as 32 bytes, the first 32 codes (row r, column pair j,
    both columns) in the LOW nibbles and the next 32 in the HIGH nibbles.
    """
    N, K2 = packed.shape
    tiles = packed.reshape(-1, block_n)  # 32 bytes per (tile, column pair)
    qw = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # (-1, 64): low nibbles first
    qw = qw.reshape(N // block_n, K2, block_n, 2).transpose(1, 2)  # (N/32, 32, K/2, 2)
    return qw.reshape(N, 2 * K2)


def cpu_layout_dequantize(packed, absmax_t, code, blocksize: int) -> torch.Tensor:
    """float32 weight from the CPU layout: codes (N, K), absmax stored transposed (K/bs, N) bf16."""
    codes = cpu_layout_codes(packed)
    scale = absmax_t.float().T.repeat_interleave(blocksize, dim=1)  # (N, K)
    return code.float()[codes.long()] * scale


def int8_state(module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB int8 (out, in), SCB fp32 (out,))`` of a ``Linear8bitLt``, wherever it keeps them
    (on the weight before the first forward, in ``module.state`` after it)."""
    CB = module.weight.CB if module.weight.CB is not None else module.state.CB
    SCB = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    if CB is None:
        CB = module.weight.data
    return CB, SCB


def nf4_layout(module) -> dict:
    """How a ``Linear4bit`` stores its weight: the packed bytes and the quant_state's parts.

    Returns ``{"packed": uint8 (numel/2,), "absmax": fp32 (n_blocks,) (after undoing the double
    quantization), "code": fp32 (16,), "blocksize", "quant_type", "shape", "nested": bool,
    "absmax_q": uint8 or None, "absmax2": fp32 or None, "code2": fp32 (256,) or None,
    "offset": float or None}``.
    """
    bnb = import_bnb()
    qs = module.weight.quant_state
    nested = bool(qs.nested)
    absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if nested \
        else qs.absmax
    return {"packed": module.weight.data.reshape(-1), "absmax": absmax.float(), "code": qs.code,
            "blocksize": qs.blocksize, "quant_type": qs.quant_type, "shape": tuple(qs.shape),
            "nested": nested, "absmax_q": qs.absmax if nested else None,
            "absmax2": qs.state2.absmax if nested else None,
            "code2": qs.state2.code if nested else None,
            "offset": float(qs.offset) if nested else None}


def nf4_roundtrip(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True) -> torch.Tensor:
    """``w`` stored in bitsandbytes NF4 and read back (fp32): what a 4-bit base holds of it."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    q, state = quantize_4bit(w.detach().float().contiguous(), blocksize=blocksize,
                             quant_type="nf4", compress_statistics=double_quant)
    return dequantize_4bit(q, state).reshape(w.shape)
