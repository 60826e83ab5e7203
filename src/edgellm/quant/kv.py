"""KV-cache quantization: store the attention keys and values in int8 / int4.

During generation every layer keeps the keys and values of all past tokens; for SmolLM2-135M
that is ``2 × 30 layers × 3 KV heads × 64 dims × 2 bytes = 23 KB per token`` in fp16, 23.6 MB
per 1k tokens: at long contexts the cache outgrows the weights.  Quantizing it trades a little
accuracy for 2–4× less memory (and memory bandwidth, what decoding is bound by).

What is quantized is **what the cache holds**: the keys *after* RoPE (the rotary embedding is
applied before the cache update) and the values — not the outputs of ``k_proj`` / ``v_proj``.

Granularities (asymmetric min/max by default, one fp16 scale and offset per group):

``token``    one group per (token, head) over its ``head_dim`` values (``group_size=None``), or
             groups of ``group_size`` dims inside a head.  Works for keys and values.
``channel``  keys only (KIVI, Liu et al., 2024): keys have outlier *channels* (the same dims are
             large in every token), so each channel of a head gets its own scale over a block of
             ``group_size`` consecutive tokens (default 64).  Values stay per token, as in KIVI.
             A block is quantized once complete; the last, incomplete block stays in full
             precision (KIVI's residual window).  Simulation caveat: on a whole prompt at once
             (the perplexity protocols) a token's scale is computed from its whole block,
             including the tokens after it in that block.

**How it is hooked in.**  transformers 5.x computes q/k/v, applies RoPE, updates
``past_key_values`` and then calls the attention function registered under
``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` with the *whole* cached keys and
values.  :func:`apply_kv_quant` registers an attention function ``"edgellm_kvquant"`` (with the
matching mask function) that fake-quantizes those keys and values and then calls the model's
original implementation (sdpa or eager), and switches the model to it with
``model.set_attn_implementation``.  The alternative, a ``Cache`` subclass quantizing on
``update``, would also need the no-cache path (perplexity runs without a cache) and the many
cache classes of ``generate``; the attention function sees both paths with one hook.  Because
per-token quantization only depends on each token's own values, fake-quantizing the whole cache
at every step gives exactly what a cache storing int codes would return.
"""

from __future__ import annotations

import math

import torch

from edgellm.models import decoder_layers
from edgellm.quant.qtensor import QuantError
from edgellm.quant.rtn import check_bits, fake_quant, minmax_params

ATTN_NAME = "edgellm_kvquant"
GRANULARITIES = ("token", "channel")


def check_kv_args(bits: int, granularity: str, group_size: int | None, head_dim: int) -> None:
    check_bits(bits)
    if granularity not in GRANULARITIES:
        raise QuantError(f"granularity={granularity!r} is not supported; use one of "
                         f"{', '.join(GRANULARITIES)}")
    if granularity == "token" and group_size is not None and (
            group_size <= 0 or head_dim % group_size):
        raise QuantError(f"group_size={group_size} does not divide head_dim={head_dim}; use a "
                         "divisor of head_dim (e.g. 32) or None for one group per (token, head)")
    if granularity == "channel" and group_size is not None and group_size <= 0:
        raise QuantError(f"group_size={group_size} must be a positive number of tokens per block")


def quantize_per_token(x: torch.Tensor, bits: int = 8, group_size: int | None = None,
                       sym: bool = False) -> torch.Tensor:
    """Fake-quantize ``x`` (batch, heads, tokens, head_dim): one scale per (token, head, group).

    Groups of ``group_size`` dims along ``head_dim`` (None: the whole head).  Same dtype back.
    """
    *lead, d = x.shape
    g = d if group_size is None else group_size
    xg = x.float().reshape(*lead, d // g, g)  # (B, H, T, d/g, g)
    scale, offset = minmax_params(xg, bits, sym)  # (B, H, T, d/g, 1), fp16-rounded
    return fake_quant(xg, scale, offset, bits, sym).reshape(x.shape).to(x.dtype)


def quantize_per_channel(k: torch.Tensor, bits: int = 8, block: int = 64,
                         sym: bool = False) -> torch.Tensor:
    """KIVI keys: fake-quantize ``k`` (batch, heads, tokens, head_dim) per channel over blocks
    of ``block`` tokens; the trailing incomplete block is returned unquantized."""
    B, H, T, d = k.shape
    n_full = (T // block) * block
    if n_full == 0:
        return k
    kb = k[:, :, :n_full].float().reshape(B, H, T // block, block, d).transpose(-1, -2)
    # kb (B, H, n_blocks, d, block): min/max over the tokens of each block, per channel
    scale, offset = minmax_params(kb, bits, sym)
    q = fake_quant(kb, scale, offset, bits, sym).transpose(-1, -2).reshape(B, H, n_full, d)
    return torch.cat([q.to(k.dtype), k[:, :, n_full:]], dim=2)


def quantize_kv(key: torch.Tensor, value: torch.Tensor, bits: int = 8,
                granularity: str = "token", group_size: int | None = None,
                sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize cached keys and values, both (batch, kv_heads, tokens, head_dim)."""
    if granularity == "channel":
        k = quantize_per_channel(key, bits, group_size or 64, sym)
    else:
        k = quantize_per_token(key, bits, group_size, sym)
    v = quantize_per_token(value, bits, group_size if granularity == "token" else None, sym)
    return k, v


def kvquant_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function: fake-quantize the cached ``key``/``value``, then call the model's
    original attention implementation (``module.kv_quant["base"]``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = getattr(module, "kv_quant", None)
    base = "sdpa" if cfg is None else cfg["base"]
    if cfg is not None:
        key, value = quantize_kv(key, value, cfg["bits"], cfg["granularity"], cfg["group_size"],
                                 cfg["sym"])
    if base == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)


def _register(base: str) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_NAME, kvquant_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _attention_modules(model):
    return [layer.self_attn for layer in decoder_layers(model)]


def apply_kv_quant(model, bits: int = 8, granularity: str = "token",
                   group_size: int | None = None, sym: bool = False) -> dict:
    """Quantize the KV cache of every layer (simulated); undo with :func:`remove_kv_quant`.

    ``granularity="token"``: one asymmetric scale per (token, head), or per ``group_size`` dims
    of a head; ``"channel"``: KIVI keys (per channel over blocks of ``group_size`` tokens,
    default 64) with per-token values.  ``bits=16`` means no quantization (it undoes a
    previous call).  Returns the settings and the cache bytes per 1k tokens.
    """
    cfg = model.config
    if bits == 16:  # the unquantized cache (fp16 storage): nothing to simulate
        remove_kv_quant(model)
        return {"kv_bits": 16, "kv_granularity": None, "kv_group_size": None, "kv_sym": None,
                "attn_base": cfg._attn_implementation,
                "kv_bytes_per_1k": kv_cache_bytes(model, 1024, 16)}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    check_kv_args(bits, granularity, group_size, head_dim)
    current = cfg._attn_implementation
    base = getattr(model, "_edgellm_kv_base", current if current != ATTN_NAME else "sdpa")
    if base not in ("sdpa", "eager"):
        raise QuantError(f"KV quantization wraps the sdpa or eager attention, not {base!r}; "
                         "load the model with attn_implementation='sdpa'")
    _register(base)
    for attn in _attention_modules(model):
        attn.kv_quant = {"bits": bits, "granularity": granularity, "group_size": group_size,
                         "sym": sym, "base": base}
    model._edgellm_kv_base = base
    model.set_attn_implementation(ATTN_NAME)
    return {"kv_bits": bits, "kv_granularity": granularity, "kv_group_size": group_size,
            "kv_sym": sym, "attn_base": base,
            "kv_bytes_per_1k": kv_cache_bytes(model, 1024, bits, granularity=granularity,
                                              group_size=group_size, sym=sym)}


def remove_kv_quant(model) -> None:
    """Undo :func:`apply_kv_quant`: the original attention implementation, no quantization."""
    base = getattr(model, "_edgellm_kv_base", None)
    for attn in _attention_modules(model):
        if hasattr(attn, "kv_quant"):
            del attn.kv_quant
    if base is not None:
        model.set_attn_implementation(base)
        del model._edgellm_kv_base


def kv_cache_bytes(model_or_config, n_tokens: int = 1024, bits: int = 16, *,
                   granularity: str = "token", group_size: int | None = None, sym: bool = False,
                   scale_bits: int = 16) -> int:
    """Bytes of the KV cache for ``n_tokens``: ``2 × layers × kv_heads × head_dim × tokens ×
    bits/8`` plus, when ``bits < 16``, the fp16 scales (and offsets unless ``sym``).

    ``token``: one scale per (token, head, group of ``group_size`` dims) for keys and values;
    ``channel``: keys get one per (channel, block of ``group_size`` tokens), values per token.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    codes = 2 * L * Hkv * d * n_tokens * bits / 8
    if bits >= 16:
        return int(codes)
    per_param = scale_bits * (1 if sym else 2) / 8  # bytes of a scale (+ offset)
    v_groups = L * Hkv * n_tokens * (d // (group_size or d) if granularity == "token" else 1)
    if granularity == "channel":
        k_groups = L * Hkv * d * math.ceil(n_tokens / (group_size or 64))
    else:
        k_groups = v_groups
    return int(math.ceil(codes + (k_groups + v_groups) * per_param))
