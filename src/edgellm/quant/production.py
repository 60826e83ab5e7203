"""The production libraries on CPU: bitsandbytes (NF4, FP4, double quantization, LLM.int8()) and
torchao (int8 weight-only, int8 dynamic activation), measured the same way as our own code.

- :func:`apply_bnb` swaps every decoder linear for a bitsandbytes ``Linear4bit`` (NF4 or FP4
  codes packed two per byte, one fp32 absmax per block of 64, optionally double-quantized) or
  ``Linear8bitLt`` (int8 codes per row + fp32 row scale; activations quantized per token at run
  time, activation columns with a value above ``threshold`` kept in float: LLM.int8()).
- :func:`apply_torchao` converts them with torchao's ``quantize_`` to int8 tensor subclasses
  (per-row int8 weight, and for ``int8_dynamic`` per-token int8 activations).
- :func:`apply_blockwise` is our from-scratch counterpart (:mod:`edgellm.quant.formats`),
  fake-quantized: same codes as bitsandbytes for NF4/FP4, plus plain E2M1, INT4 (symmetric absmax,
  QLoRA's Int4) and asymmetric INT4 (our RTN) for QLoRA's data-type comparison.
- :func:`memory_bytes` counts the bytes a model really holds: parameters, buffers, packed storage
  and the quantization states the libraries keep outside the parameters (tied tensors once).

The tied embedding / lm_head is left in fp32 everywhere: it is one tensor used twice, and both
libraries only replace ``nn.Linear`` modules (quantizing the lm_head would untie it).
"""

from __future__ import annotations

import logging
import time

import torch

from .modules import replace_module
from .qtensor import QuantError

BNB_MODES = ("nf4", "fp4", "int8")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
TORCHAO_MODES = ("int8_weight_only", "int8_dynamic")
OUR_MODES = ("nf4", "fp4", "fp4_e2m1", "int4", "int4_asym", "int8")


# --------------------------------------------------------------------------------------------
# importing the libraries


def import_bnb():
    """``bitsandbytes`` (a clear QuantError if it is not installed)."""
    quiet_library_logs()
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise QuantError(f"bitsandbytes is not installed ({e}); pip install bitsandbytes") from None
    return bitsandbytes


# Expected, harmless log lines of these libraries on a CPU-only machine, dropped by message:
# torchao (imported by transformers whenever it is installed) cannot load its CUDA kernel
# libraries and torch notes a deprecation about an Enum torchao registers; bitsandbytes looks
# for an optional package of CPU kernels; LLM.int8() announces on every call that it casts
# fp32 activations to fp16 (lesson 05 explains it).
QUIET_LOGS = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(p in msg for p in self.prefixes)


def quiet_library_logs() -> None:
    """Install (once) filters dropping exactly the log lines of :data:`QUIET_LOGS`."""
    for name, prefixes in QUIET_LOGS.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in lg.filters):
            lg.addFilter(_DropMessages(prefixes))


def import_torchao():
    """``torchao.quantization`` (its expected CPU-only log lines dropped, see
    :func:`quiet_library_logs`)."""
    quiet_library_logs()
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise QuantError(f"torchao is not installed ({e}); pip install torchao") from None
    return tq


# --------------------------------------------------------------------------------------------
# argument checks (the CLI and the library share them)


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


def check_our_args(mode: str, double_quant: bool = False, blocksize: int = 64) -> None:
    if mode not in OUR_MODES:
        raise QuantError(f"unknown mode {mode!r}; use one of {', '.join(OUR_MODES)}")
    if double_quant and mode not in ("nf4", "fp4", "fp4_e2m1", "int4"):
        raise QuantError(f"double quantization applies to the absmax-scaled 4-bit modes, "
                         f"not {mode!r}")
    if mode != "int8" and (blocksize < 2 or blocksize % 2):
        raise QuantError(f"blocksize={blocksize} must be an even number >= 2")


def check_torchao_mode(mode: str) -> None:
    if mode not in TORCHAO_MODES:
        raise QuantError(f"unknown torchao mode {mode!r}; use one of {', '.join(TORCHAO_MODES)}")


def _check_divisible(layers: dict, blocksize: int) -> None:
    for name, lin in layers.items():
        if lin.weight.numel() % blocksize:
            raise QuantError(f"{name}: {lin.weight.numel()} weights are not a whole number of "
                             f"blocks of {blocksize}")


# --------------------------------------------------------------------------------------------
# bitsandbytes


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
    from ..models import linear_layers

    check_bnb_args(mode, double_quant, blocksize, threshold)
    bnb = import_bnb()
    layers = linear_layers(model) if layers is None else layers
    if mode != "int8":
        _check_divisible(layers, blocksize)
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


# --------------------------------------------------------------------------------------------
# torchao


@torch.no_grad()
def apply_torchao(model: torch.nn.Module, mode: str = "int8_weight_only", *,
                  layers: dict | None = None) -> dict:
    """Quantize the decoder linears with torchao's ``quantize_`` (in place).

    ``int8_weight_only``: per-row symmetric int8 weight (an ``Int8Tensor`` subclass holding
    ``qdata``, ``scale``, ``zero_point``), dequantized inside the matmul.  ``int8_dynamic``: the
    same weight plus per-token int8 activations quantized at run time, int8 × int8 matmul.
    Returns ``{name: module}``; the tied embedding / lm_head is excluded by the filter.
    """
    from ..models import linear_layers

    check_torchao_mode(mode)
    tq = import_torchao()
    layers = linear_layers(model) if layers is None else layers
    config = tq.Int8WeightOnlyConfig() if mode == "int8_weight_only" else \
        tq.Int8DynamicActivationInt8WeightConfig()
    names = set(layers)
    tq.quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    return {n: model.get_submodule(n) for n in layers}


def int8_symmetric_per_row(W: torch.Tensor) -> torch.Tensor:
    """torchao's symmetric per-row int8, from scratch: ``scale = absmax / 127.5`` (half of the
    255-wide int8 range), codes ``round(W · (1/scale))`` clamped to [-128, 127]; float32 W_hat."""
    s = W.detach().float().abs().amax(dim=1, keepdim=True) / 127.5  # (out, 1)
    return torch.round(W.float() * (1.0 / s)).clamp(-128, 127) * s


def torchao_dequantize(module: torch.nn.Module) -> torch.Tensor:
    """float32 weight (out, in) of a torchao-quantized linear."""
    w = module.weight
    if hasattr(w, "dequantize") and type(w) is not torch.nn.Parameter:
        return w.dequantize().float()
    raise QuantError(f"{type(module).__name__}.weight is not a torchao quantized tensor")


# --------------------------------------------------------------------------------------------
# ours: the same block formats from scratch (fake-quantized)


def double_quantize_absmax(absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """QLoRA's double quantization of the fp32 block absmax (n_blocks,).

    Subtract the mean (the absmax are all positive: centring uses the signed 8-bit code fully),
    then blockwise absmax quantization onto the 256-entry ``code`` table in blocks of
    ``blocksize``.  Returns ``(codes uint8, absmax2 fp32 (n_blocks/blocksize,), offset fp32)``
    with ``absmax ≈ code[codes] * absmax2 + offset``.
    """
    from .formats import nearest_level

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
    return import_bnb().functional.create_dynamic_map().float()


def int4_levels() -> torch.Tensor:
    """QLoRA's Int4: symmetric absmax integers -7 … 7, divided by 7 (15 levels)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def lut_table(mode: str) -> torch.Tensor:
    """The 16 (15 for int4) levels in [-1, 1] of a blockwise absmax 4-bit mode, in code order."""
    from . import formats as F

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
    from . import formats as F
    from .rtn import fake_quantize

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
        return 4 + 32 / blocksize
    return 4 + (8 / blocksize + 32 / (blocksize * 256) if double_quant else 32 / blocksize)


@torch.no_grad()
def apply_blockwise(model: torch.nn.Module, mode: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, *, layers: dict | None = None) -> dict:
    """Fake-quantize the decoder linears in place with :func:`blockwise_dequantized`;
    return ``{name: W_hat}`` views of the new weights."""
    from ..models import linear_layers

    check_our_args(mode, double_quant, blocksize)
    layers = linear_layers(model) if layers is None else layers
    if mode not in ("int8", "int4_asym"):
        _check_divisible(layers, blocksize)
    else:
        from .rtn import check_linears

        if mode == "int4_asym":
            check_linears(layers, blocksize)
    out = {}
    for name, lin in layers.items():
        lin.weight.copy_(blockwise_dequantized(lin.weight, mode, blocksize, double_quant))
        out[name] = lin.weight
    return out


# --------------------------------------------------------------------------------------------
# what a model holds, how fast it runs


def _leaf_tensors(t: torch.Tensor):
    """Plain tensors behind ``t``: itself, or the inner tensors of a tensor subclass."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):  # torchao's Int8Tensor: qdata, scale, zero_point
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _leaf_tensors(getattr(t, n))
    else:
        yield t


def _state_tensors(module: torch.nn.Module):
    """Tensors a library keeps outside ``parameters()``/``buffers()`` (bnb's quant states)."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    while qs is not None:  # Params4bit: absmax, code, offset, and the nested state2
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            if isinstance(t, torch.Tensor):
                yield t
        qs = getattr(qs, "state2", None)
    for holder in (getattr(module, "weight", None), getattr(module, "state", None)):
        for attr in ("CB", "SCB"):  # Linear8bitLt: int8 codes and the per-row scales
            t = getattr(holder, attr, None) if holder is not None else None
            if isinstance(t, torch.Tensor):
                yield t


def held_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(module name, plain tensor)`` for everything the model holds (may repeat storages)."""
    out = []
    for mname, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False))
        for _, t in own:
            out += [(mname, leaf) for leaf in _leaf_tensors(t)]
        out += [(mname, t) for t in _state_tensors(module)]
    return out


def memory_report(model: torch.nn.Module) -> dict:
    """Real bytes held by the model, each storage once (tied embedding = lm_head counted once).

    ``memory_bytes`` (total), ``memory_bytes_linears`` (the decoder linears: packed codes and
    their scales / quant states), ``memory_bytes_embedding`` and ``memory_bytes_other`` (norms).
    """
    seen: dict[int, tuple[str, int]] = {}
    for mname, t in held_tensors(model):
        try:
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # a subclass without real storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen[key] = (mname, nbytes)
    rep = {"memory_bytes": 0, "memory_bytes_linears": 0, "memory_bytes_embedding": 0,
           "memory_bytes_other": 0}
    for mname, nbytes in seen.values():
        kind = "embedding" if ("embed" in mname or "lm_head" in mname) else \
            "linears" if mname.rsplit(".", 1)[-1].endswith("_proj") else "other"
        rep[f"memory_bytes_{kind}"] += nbytes
        rep["memory_bytes"] += nbytes
    return rep


def memory_bytes(model: torch.nn.Module) -> int:
    """Real bytes held by parameters, buffers, packed storage and quant states (shared once)."""
    return memory_report(model)["memory_bytes"]


@torch.inference_mode()
def tokens_per_s(model: torch.nn.Module, tokens: torch.Tensor, ctx: int = 512,
                 batch_size: int = 4, max_windows: int | None = None, warmup: int = 1) -> dict:
    """Throughput of plain forward passes (no KV cache, full logits) over consecutive windows
    of ``ctx`` tokens, after ``warmup`` untimed single-window passes (first-call costs: kernel
    selection, lazy re-packing)."""
    from ..metrics import bare_forward_seconds

    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n_windows = len(tokens) // ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise QuantError(f"{len(tokens)} tokens make no window of ctx={ctx}; use a smaller "
                         "--ctx or more --max-tokens")
    for _ in range(warmup):
        model(input_ids=tokens[:ctx].view(1, ctx), use_cache=False)
    seconds, n = bare_forward_seconds(model, tokens, ctx, n_windows, batch_size)
    return {"tokens_per_s": n / seconds, "seconds_forward": seconds, "n_tokens_speed": n}


def timed(fn, *args, **kwargs):
    """``(result, seconds)`` of one call."""
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# the lesson's table and widget (pure functions over recorded results)


def record_key(rec: dict) -> str:
    """Short label of a recorded run: ``"bnb nf4+dq"``, ``"bnb int8 t=6"``, ``"torchao
    int8_dynamic"``, ``"edgellm int4_asym"``, ``"bnb nf4 fp32-path"``."""
    lib, mode = rec.get("library", "bnb"), rec["mode"]
    key = f"{lib} {mode}" + ("+dq" if rec.get("double_quant") else "")
    if lib == "bnb" and mode == "int8":
        key += f" t={rec.get('threshold', 6.0):g}"
    if lib == "bnb" and mode != "int8" and rec.get("cpu_kernel") is False:
        key += " fp32-path"
    return key


def production_rows(records: list[dict]) -> list[dict]:
    """One row per record: quality (ppl, ΔNLL ± se, KL, top-1), memory (MB, as loaded and at
    run time), speed (batched prefill and batch-1 decode tokens/s, each with its ratio to fp32
    measured in the same run), load seconds."""
    rows = []
    for r in records:
        tps, base = r.get("tokens_per_s"), r.get("tokens_per_s_base")
        dec, dec_base = r.get("decode_tokens_per_s"), r.get("decode_tokens_per_s_base")
        rows.append({
            "key": record_key(r), "library": r.get("library"), "mode": r["mode"],
            "ppl": r.get("ppl"), "ppl_base": r.get("ppl_base"), "delta_nll": r.get("delta_nll"),
            "delta_nll_stderr": r.get("delta_nll_stderr"), "kl_mean": r.get("kl_mean"),
            "top1_agreement": r.get("top1_agreement"), "n_tokens": r.get("n_tokens"),
            "memory_mb": r["memory_bytes"] / 1e6,
            "memory_mb_runtime": (r.get("memory_bytes_runtime") or r["memory_bytes"]) / 1e6,
            "memory_mb_base": r["memory_bytes_base"] / 1e6,
            "linears_mb": r.get("memory_bytes_linears", 0) / 1e6,
            "size_mb": r.get("size_bytes", r["memory_bytes"]) / 1e6,
            "tokens_per_s": tps, "speed_vs_fp32": tps / base if tps and base else None,
            "decode_tokens_per_s": dec,
            "decode_vs_fp32": dec / dec_base if dec and dec_base else None,
            "seconds_load": r.get("seconds_load")})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`production_rows`."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'run':<26}{'ppl':>8}{'ΔNLL':>9}{'±':>7}{'KL':>8}{'top1':>7}{'MB':>8}"
            f"{'MB run':>8}{'prefill':>8}{'×fp32':>7}{'decode':>8}{'×fp32':>7}{'tokens':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['key']:<26}{f(r['ppl'], '.3f'):>8}{f(r['delta_nll'], '+.4f'):>9}"
            f"{f(r['delta_nll_stderr'], '.4f'):>7}{f(r['kl_mean'], '.4f'):>8}"
            f"{f(r['top1_agreement'], '.3f'):>7}{r['size_mb']:>8.1f}{r['memory_mb_runtime']:>8.1f}"
            f"{f(r['tokens_per_s'], '.1f'):>8}{f(r['speed_vs_fp32'], '.2f'):>7}"
            f"{f(r['decode_tokens_per_s'], '.1f'):>8}{f(r['decode_vs_fp32'], '.2f'):>7}"
            f"{f(r['n_tokens'], 'd'):>7}")
    return "\n".join(lines)


def block_layout(mode: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 in_features: int = 576) -> dict:
    """Bytes one block of weights takes in a format, as the libraries store it.

    Returns ``{"weights", "code_bytes", "scale_bytes", "bpw", "text"}`` for one block of
    ``blocksize`` weights (one row of ``in_features`` for the per-row int8 formats).
    """
    if mode in ("int8", "int8_weight_only", "int8_dynamic"):
        n, code, scale = in_features, in_features, 4.0
        what = "int8 codes + 1 fp32 scale per row"
        if mode == "int8_weight_only" or mode == "int8_dynamic":
            scale, what = 5.0, "int8 codes + fp32 scale + int8 zero point (0) per row"
    elif mode == "int4_asym":
        n, code, scale = blocksize, blocksize / 2, 4.0
        what = "4-bit codes, 2 per byte + fp16 scale + fp16 min"
    else:
        n, code = blocksize, blocksize / 2
        scale = 1 + 4 / 256 if double_quant else 4.0
        what = ("4-bit codes, 2 per byte + 1 uint8 absmax code (+ 1 fp32 per 256 blocks)"
                if double_quant else "4-bit codes, 2 per byte + 1 fp32 absmax")
    bpw = 8 * (code + scale) / n
    return {"weights": n, "code_bytes": code, "scale_bytes": scale, "bpw": bpw,
            "text": f"{mode}{'+dq' if double_quant else ''}: {n} weights -> {code:g} B codes + "
                    f"{scale:g} B scale = {code + scale:g} B ({bpw:.3f} bits/weight); {what}"}


def describe(records: list[dict], key: str) -> str:
    """What the lesson's widget prints for one run: its measurements and its block layout."""
    by_key = {record_key(r): r for r in records}
    if key not in by_key:
        return f"no recorded run {key!r}; recorded: {', '.join(by_key)}"
    r = by_key[key]
    row = production_rows([r])[0]
    layout = block_layout(r["mode"], r.get("blocksize") or 64, bool(r.get("double_quant")))
    lines = [f"{key}  ({r.get('library')} {r.get('library_version') or ''})".rstrip()]
    if row["ppl"] is not None:
        lines.append(f"quality : ppl {row['ppl']:.3f} vs fp32 {row['ppl_base']:.3f}, ΔNLL "
                     f"{row['delta_nll']:+.4f} ± {row['delta_nll_stderr']:.4f}, KL "
                     f"{row['kl_mean']:.4f}, top-1 {row['top1_agreement']:.3f} on "
                     f"{row['n_tokens']} tokens")
    lines.append(f"memory  : {row['size_mb']:.1f} MB stored, {row['memory_mb_runtime']:.1f} MB "
                 f"while running, fp32 {row['memory_mb_base']:.1f} MB")
    if row["tokens_per_s"] is not None:
        lines.append(f"prefill : {row['tokens_per_s']:.1f} tokens/s = {row['speed_vs_fp32']:.2f}"
                     f" x fp32 (same run), load {row['seconds_load']:.1f} s")
        if row["decode_tokens_per_s"] is not None:
            lines.append(f"decode  : {row['decode_tokens_per_s']:.1f} tokens/s = "
                         f"{row['decode_vs_fp32']:.2f} x fp32 (batch 1, KV cache, same run)")
    else:
        lines.append("speed   : fake-quantized fp32 weights (our code): fp32 speed")
    lines.append(f"layout  : {layout['text']}")
    return "\n".join(lines)


__all__ = [
    "BNB_MODES", "OUR_MODES", "TORCHAO_MODES", "apply_blockwise", "apply_bnb", "apply_torchao",
    "blockwise_dequantized", "bnb_dequantize", "check_bnb_args", "check_our_args",
    "check_torchao_mode", "double_dequantize_absmax", "double_quantize_absmax", "dynamic_code",
    "held_tensors", "import_bnb", "import_torchao", "int4_levels", "int8_state", "int8_symmetric_per_row", "lut_table", "memory_bytes",
    "memory_report", "nf4_layout", "record_key", "production_rows", "format_rows",
    "block_layout", "describe", "cpu_layout_codes", "cpu_layout_dequantize", "quiet_library_logs", "our_bpw", "tokens_per_s", "torchao_dequantize",
]
