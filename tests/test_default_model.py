"""Facts about the offline default model, as the lessons state them."""

import pytest
import torch

from edgellm.models import linear_layers, n_params, param_bytes_by_dtype, params_by_module

pytestmark = pytest.mark.integration


def test_shape_and_size(default_model):
    model, _ = default_model
    cfg = model.config
    assert n_params(model) == 134_515_008
    assert param_bytes_by_dtype(model)["float32"] >= 4 * 134_515_008
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(linear_layers(model)) == 210
    assert sum(params_by_module(model).values()) == n_params(model)
    assert [g for g in (32, 64, 128, 192, 256, 576) if cfg.hidden_size % g == 0] == [32, 64, 192, 576]


def test_it_generates_sensible_text(default_model):
    from edgellm.models import generate

    model, tok = default_model
    out = generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in out


def test_cached_tokenizer_keeps_the_digit_split(default_model):
    _, tok = default_model
    ids = tok("year 2024", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]
    assert tok.chat_template and tok.bos_token == "<|im_start|>"


def test_weights_are_finite_and_fp32(default_model):
    model, _ = default_model
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
