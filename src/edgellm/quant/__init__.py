"""Weight quantization: number formats, RTN, packing, size accounting, saving (lessons 02–03).

Submodules are imported lazily so ``import edgellm.quant`` stays cheap:

- :mod:`edgellm.quant.qtensor`  ``QTensor`` (codes + scales) and ``QuantError``
- :mod:`edgellm.quant.rtn`      round-to-nearest min/max quantization per channel / group
- :mod:`edgellm.quant.formats`  INTn, FP8 (E4M3, E5M2), FP4 (E2M1), NF4, MXFP4, bitsandbytes variants
- :mod:`edgellm.quant.gguf_formats`  llama.cpp block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4)
- :mod:`edgellm.quant.pack`     bit packing of 2/3/4/…-bit codes into bytes
- :mod:`edgellm.quant.size`     bits per weight and bytes for a whole model
- :mod:`edgellm.quant.modules`  fake-quant ``QuantLinear`` that swaps into a model and back
- :mod:`edgellm.quant.save`     packed safetensors + JSON: save and reload quantized models
- :mod:`edgellm.quant.explore`  pure functions behind lesson 02's plots and widget
- :mod:`edgellm.quant.actstats`  activation statistics: outlier features, massive activations
- :mod:`edgellm.quant.actquant`  simulated activation quantization (W8A8, W4A8, FP8 activations)
- :mod:`edgellm.quant.smoothquant`  SmoothQuant: migrate activation outliers into the weights
- :mod:`edgellm.quant.llm_int8`  LLM.int8(): vector-wise int8 matmul with fp16 outlier columns
- :mod:`edgellm.quant.rotate`   Hadamard / random orthogonal rotation folded into the weights
- :mod:`edgellm.quant.kv`       KV-cache quantization where attention reads the cache
- :mod:`edgellm.quant.lwc`      OmniQuant-style learnable weight clipping (and its clip cache)
- :mod:`edgellm.quant.production`  bitsandbytes and torchao on the model, memory and speed
- :mod:`edgellm.quant.compare`, :mod:`edgellm.quant.act_results`  lessons 03/04's recorded results
- :mod:`edgellm.quant.cli`      ``edgellm quantize`` (and ``quantize_model`` for notebooks)

The tied embedding / lm_head is never quantized by these tools; sizes report it separately
(``rotate`` unties it, since the final norm is folded into lm_head but not into the embedding).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "QTensor": "qtensor", "QuantError": "qtensor",
    "minmax_params": "rtn", "quantize_codes": "rtn", "dequantize_codes": "rtn",
    "fake_quant": "rtn", "quantize": "rtn", "fake_quantize": "rtn", "check_group_size": "rtn",
    "apply_rtn": "rtn", "quantize_format": "formats", "apply_format": "formats",
    "quantize_gguf": "gguf_formats", "apply_gguf": "gguf_formats",
    "pack_bits": "pack", "unpack_bits": "pack", "model_size": "size",
    "QuantLinear": "modules", "swap_in": "modules", "swap_out": "modules",
    "quantize_act": "actquant", "apply_act_quant": "actquant", "remove_act_quant": "actquant",
    "collect_activation_stats": "actstats", "apply_smoothquant": "smoothquant",
    "smooth_factors": "smoothquant", "apply_llm_int8": "llm_int8",
    "llm_int8_matmul": "llm_int8", "apply_rotation": "rotate", "hadamard": "rotate",
    "apply_kv_quant": "kv", "remove_kv_quant": "kv", "kv_cache_bytes": "kv",
    "apply_lwc": "lwc", "apply_bnb": "production", "apply_torchao": "production",
    "save_quantized": "save", "load_quantized": "save", "quantize_model": "cli",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
