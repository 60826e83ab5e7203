"""KV-cache quantization: applied to post-RoPE keys and values, reversible, sizes."""

import copy

import pytest
import torch
from conftest import random_ids

from edgellm.quant.kv import (
    ATTN_NAME,
    apply_kv_quant,
    kv_cache_bytes,
    quantize_kv,
    quantize_per_channel,
    quantize_per_token,
    remove_kv_quant,
)
from edgellm.quant.qtensor import QuantError


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_per_token_groups_are_independent():
    x = torch.randn(1, 2, 5, 16)
    q = quantize_per_token(x, bits=4)
    assert q.shape == x.shape and q.dtype == x.dtype
    # changing one token does not change another token's quantized values
    y = x.clone()
    y[0, 0, 3] *= 10
    assert torch.equal(quantize_per_token(y, bits=4)[0, 0, :3], q[0, 0, :3])
    # each (token, head) row holds at most 2**bits distinct values
    assert all(len(row.unique()) <= 16 for row in q.reshape(-1, 16))
    # 8 bits is close, 4 bits further
    e8 = (quantize_per_token(x, 8) - x).abs().max()
    e4 = (q - x).abs().max()
    assert e8 < e4 / 8


def test_per_channel_keeps_residual_block():
    k = torch.randn(1, 1, 70, 8)
    q = quantize_per_channel(k, bits=4, block=32)
    assert torch.equal(q[:, :, 64:], k[:, :, 64:])  # incomplete block: full precision
    assert not torch.equal(q[:, :, :64], k[:, :, :64])
    # per channel over a block: each (block, channel) column has at most 16 values
    assert len(q[0, 0, :32, 3].unique()) <= 16


def _manual_attention_probe(model, ids, bits):
    """Recompute layer 0's attention output by hand: k_proj → RoPE → quantize → attention."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = model.model.layers[0].self_attn
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    B, T, _ = h.shape
    d = attn.head_dim
    q = attn.q_proj(h).view(B, T, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, -1, d).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(T).unsqueeze(0))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = quantize_kv(k, v, bits)  # after RoPE
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def test_quantizes_post_rope_keys(tiny):
    ids = random_ids(2, 20)
    apply_kv_quant(tiny, bits=4)
    got = {}
    h = tiny.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, out: got.setdefault("o", out[0]))
    with torch.no_grad():
        tiny(ids)
        want = _manual_attention_probe(tiny, ids, 4)
    h.remove()
    torch.testing.assert_close(got["o"], want, atol=1e-5, rtol=1e-5)
    # quantizing k_proj's output (before RoPE) would be a different computation
    remove_kv_quant(tiny)
    with torch.no_grad():
        float_out = tiny.model.layers[0].self_attn(
            tiny.model.layers[0].input_layernorm(tiny.model.embed_tokens(ids)),
            position_embeddings=tiny.model.rotary_emb(ids, torch.arange(ids.shape[1])[None]),
            attention_mask=None)[0]
    assert (float_out - want).abs().max() > 1e-4


def test_int8_close_int4_further_and_remove_restores(tiny):
    ids = random_ids(2, 20)
    ref = _logits(tiny, ids)
    info = apply_kv_quant(tiny, bits=8)
    assert tiny.config._attn_implementation == ATTN_NAME and info["kv_bits"] == 8
    d8 = (_logits(tiny, ids) - ref).abs().max()
    apply_kv_quant(tiny, bits=4)  # re-applying replaces the settings
    d4 = (_logits(tiny, ids) - ref).abs().max()
    assert 0 < d8 < 0.02 and d4 > 4 * d8
    remove_kv_quant(tiny)
    assert tiny.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(tiny, ids), ref)


def test_generation_with_cache_matches_full_forward(tiny):
    """Incremental decoding (cache) sees the same quantized keys as a full forward pass."""
    apply_kv_quant(tiny, bits=4)
    prompt = random_ids(1, 6)
    with torch.no_grad():
        out = tiny.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
        full = tiny(out.sequences).logits
    assert out.sequences.shape == (1, 14)
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step[0], full[0, 5 + i], atol=1e-4, rtol=1e-4)


def test_channel_granularity_runs(tiny):
    ids = random_ids(2, 40)
    ref = _logits(tiny, ids)
    apply_kv_quant(tiny, bits=4, granularity="channel", group_size=16)
    assert (_logits(tiny, ids) - ref).abs().max() > 0
    remove_kv_quant(tiny)


def test_bad_arguments(tiny):
    with pytest.raises(QuantError, match="group_size=5"):
        apply_kv_quant(tiny, bits=8, group_size=5)
    with pytest.raises(QuantError, match="granularity"):
        apply_kv_quant(tiny, granularity="tensor")
    with pytest.raises(QuantError, match="bits=1"):
        apply_kv_quant(tiny, bits=1)
    assert tiny.config._attn_implementation == "sdpa"


def test_kv_cache_bytes_default_model_shape():
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64,
                          hidden_size=576, num_attention_heads=9)
    fp16 = kv_cache_bytes(cfg, 1024, 16)
    assert fp16 == 2 * 30 * 3 * 64 * 1024 * 2  # 23.6 MB
    # int8 per (token, head): codes + fp16 scale and offset per 64 values
    assert kv_cache_bytes(cfg, 1024, 8) == fp16 // 2 + 2 * 30 * 3 * 1024 * 4
    assert kv_cache_bytes(cfg, 1024, 4) == fp16 // 4 + 2 * 30 * 3 * 1024 * 4
    assert kv_cache_bytes(cfg, 1024, 4, group_size=32) > kv_cache_bytes(cfg, 1024, 4)


@pytest.mark.integration
def test_kv_int8_real_model(default_model):
    model, tok = default_model
    m = copy.deepcopy(model)
    ids = tok("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n", return_tensors="pt")["input_ids"]
    ref = _logits(m, ids)
    apply_kv_quant(m, bits=8)
    q = _logits(m, ids)
    assert torch.equal(q.argmax(-1), ref.argmax(-1))
    kl = torch.nn.functional.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    assert kl < 0.01
    remove_kv_quant(m)
    assert torch.equal(_logits(m, ids), ref)
