"""SmoothQuant: smoothing factors, function-preserving folding (GQA-aware), then W8A8."""

import copy

import pytest
import torch
from conftest import random_ids

from edgellm.quant.qtensor import QuantError
from edgellm.quant.smoothquant import (
    SITES,
    apply_smoothquant,
    expand_gqa,
    gqa_group_absmax,
    smooth_factors,
)


def test_smooth_factors_formula_and_balance():
    x = torch.tensor([1.0, 16.0, 100.0, 0.0])
    w = torch.tensor([0.25, 1.0, 0.01, 0.5])
    s = smooth_factors(x, w, alpha=0.5)
    assert torch.allclose(s[:3], torch.tensor([2.0, 4.0, 100.0]))
    # alpha = 0.5 equalizes the two ranges: max|X_j| / s_j == max|W_j| * s_j
    assert torch.allclose((x / s)[:3], (w * s)[:3])
    assert s[3] > 0 and torch.isfinite(s).all()  # an all-zero channel: clamped, no 0 or inf
    assert torch.allclose(smooth_factors(x, w, 1.0)[:3], x[:3])  # alpha 1: X_j / s_j = 1
    assert torch.allclose(smooth_factors(x, w, 0.0), 1 / w)  # alpha 0: weights flattened


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_a_clear_error(alpha):
    with pytest.raises(QuantError, match=r"outside \[0, 1\]"):
        smooth_factors(torch.ones(3), torch.ones(3), alpha)


def test_gqa_grouping():
    # 4 query heads, 2 KV heads, head_dim 3: heads 0, 1 read KV 0; heads 2, 3 read KV 1
    v = torch.arange(12.0)  # (head, dim) flattened
    g = gqa_group_absmax(v, 4, 2)
    assert g.tolist() == [3.0, 4.0, 5.0, 9.0, 10.0, 11.0]
    assert expand_gqa(g, 4, 2).tolist() == [3, 4, 5, 3, 4, 5, 9, 10, 11, 9, 10, 11]


@pytest.mark.parametrize("sites", [("qkv",), ("gate_up",), ("down",), ("o",), SITES])
def test_folding_keeps_the_float_model(tiny, sites):
    ids = random_ids()
    ref_model = copy.deepcopy(tiny)
    info = apply_smoothquant(tiny, ids, alpha=0.5, sites=sites)
    assert set(info["factors"][0]) == set(sites)
    with torch.no_grad():
        a, b = ref_model(ids).logits, tiny(ids).logits
    assert (a - b).abs().max() < 1e-5  # fp32 rounding only (measured ≈ 3e-7)
    # and the weights did change
    changed = [n for n, p in tiny.named_parameters()
               if not torch.equal(p, ref_model.get_parameter(n))]
    assert changed


def test_alpha_one_flattens_every_activation_channel(tiny):
    from edgellm.quant.actstats import input_absmax

    ids = random_ids()
    before = input_absmax(tiny, ids)
    apply_smoothquant(tiny, ids, alpha=1.0)
    after = input_absmax(tiny, ids)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj",
                 "model.layers.1.mlp.down_proj"):
        assert before[name].std() > 0.01
        assert torch.allclose(after[name], torch.ones_like(after[name]), atol=1e-4)
    # o_proj: one factor per KV group, so only the group's largest head reaches 1
    o = after["model.layers.0.self_attn.o_proj"].reshape(2, 2, 16)  # (kv, head in group, dim)
    assert torch.allclose(o.amax(1), torch.ones(2, 16), atol=1e-4)


def test_missing_calibration_and_bad_site(tiny):
    with pytest.raises(QuantError, match="SmoothQuant needs calibration data"):
        apply_smoothquant(tiny, None)
    with pytest.raises(QuantError, match="unknown SmoothQuant sites"):
        apply_smoothquant(tiny, random_ids(), sites=("lm_head",))


def test_smoothquant_then_w8a8(tiny):
    from edgellm.quant.actquant import apply_act_quant
    from edgellm.quant.rtn import apply_rtn

    ids = random_ids()
    with torch.no_grad():
        ref = tiny(ids).logits
    apply_smoothquant(tiny, ids, alpha=0.5)
    apply_rtn(tiny, bits=8, group_size=None, sym=True)
    apply_act_quant(tiny, a_bits=8)
    with torch.no_grad():
        y = tiny(ids).logits
    assert 0 < (y - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.integration
def test_folding_keeps_the_real_model(default_model):
    model, tok = default_model
    m = copy.deepcopy(model)
    ids = tok("def add(a, b):\n    return a + b\n" * 8, return_tensors="pt").input_ids[:, :64]
    info = apply_smoothquant(m, ids, alpha=0.5)
    with torch.no_grad():
        a, b = model(ids).logits, m(ids).logits
    # measured ≈ 1e-4 on logits of magnitude ~40 (fp32 rounding through 30 layers)
    assert (a - b).abs().max() < 1e-3
    # measured: down_proj inputs reach ~3000; smoothing brings them down by >10x
    assert info["act_absmax_after"]["down"] < info["act_absmax_before"]["down"] / 10


@pytest.mark.integration
def test_smoothquant_beats_naive_w8a8_on_the_real_model(default_model):
    """Measured (results/04_w8a8.json, 2048 tokens): KL 0.026 naive W8A8 vs 0.009 SmoothQuant
    at alpha 0.5 (PPL 8.81 vs 8.68, base 8.64); here a smaller budget, asserting only the order."""
    from edgellm.data import get_calibration, get_tokens
    from edgellm.metrics import token_logprobs
    from edgellm.quant.actquant import apply_act_quant
    from edgellm.quant.rtn import apply_rtn

    model, tok = default_model
    tokens = get_tokens("pydoc", tok, "test", 512)
    calib = get_calibration("pydoc", 2, 256, 0, tokenizer=tok)
    kl = {}
    for name in ("naive", "smoothquant"):
        m = copy.deepcopy(model)
        if name == "smoothquant":
            apply_smoothquant(m, calib, alpha=0.5)
        apply_rtn(m, bits=8, group_size=None, sym=True)
        apply_act_quant(m, a_bits=8)
        r = token_logprobs(m, tokens, "gptq", 256, progress=False, reference=model)
        kl[name] = r["kl"].mean().item()
    assert kl["smoothquant"] < kl["naive"]
