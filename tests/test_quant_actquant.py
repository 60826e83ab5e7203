"""Activation quantization (actquant) and activation statistics (actstats)."""


import pytest
import torch
from conftest import random_ids

from edgellm.quant.actquant import (
    ActQuantLinear,
    act_scale,
    apply_act_quant,
    quantize_act,
    remove_act_quant,
)
from edgellm.quant.actstats import (
    channel_stats,
    collect_activation_stats,
    input_absmax,
    massive_activations,
    outlier_channels,
    systematic_outliers,
)
from edgellm.quant.qtensor import QuantError


def _x(seed=0, shape=(16, 64)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# quantize_act


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_per_token_grid_and_error_bound(bits):
    x = _x() * torch.linspace(0.1, 10, 16).unsqueeze(1)  # rows of very different ranges
    q = quantize_act(x, bits=bits)
    s = act_scale(x, bits)  # (16, 1): absmax / (2^(b-1) - 1)
    codes = q / s
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the grid
    assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-3
    assert ((q - x).abs() <= s / 2 + 1e-6).all()  # round to nearest: at most half a step
    # each row's largest magnitude is a grid point: kept exactly
    i = x.abs().argmax(1)
    assert torch.allclose(q.gather(1, i[:, None]), x.gather(1, i[:, None]), rtol=1e-6)


def test_per_token_beats_per_tensor_when_rows_differ():
    x = _x()
    x[0] *= 50  # one loud token
    err_tok = (quantize_act(x, 8, granularity="token") - x).square().mean()
    err_ten = (quantize_act(x, 8, granularity="tensor") - x).square().mean()
    assert err_tok < err_ten / 10


def test_static_scale_clips_what_calibration_did_not_see():
    x = torch.tensor([[0.5, -1.0, 3.0, -7.0]])
    q = quantize_act(x, 8, scale=1.0 / 127)  # calibrated range ±1
    assert torch.allclose(q, torch.tensor([[64 / 127, -1.0, 1.0, -1.0]]))
    # a 0-dim tensor scale works the same
    assert torch.equal(q, quantize_act(x, 8, scale=torch.tensor(1.0 / 127)))


def test_fp8_equals_torch_e4m3_cast_after_scaling():
    x = _x(1) * 3
    s = x.abs().amax() / 448
    ref = (x / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(quantize_act(x, 8, fmt="fp8", granularity="tensor"), ref)
    # relative error of E4M3 (3 mantissa bits): at most 2^-4 for values in the normal range
    q = quantize_act(x, 8, fmt="fp8")
    normal = (x / act_scale(x, 8, "fp8")).abs() >= 2 ** -6
    assert ((q - x).abs() <= x.abs() * 2 ** -4 + 1e-7)[normal].all()


def test_fp8_is_kinder_to_outliers_than_int8():
    x = _x(2, (4, 256))
    x[:, 7] *= 100  # an outlier channel stretches every token's scale
    small = torch.ones_like(x, dtype=torch.bool)
    small[:, 7] = False
    err = {f: ((quantize_act(x, 8, fmt=f) - x)[small].abs() / x[small].abs()).median()
           for f in ("int", "fp8")}
    assert err["fp8"] < err["int"]


def test_asymmetric_and_16_bit():
    x = _x(3).abs() + 1  # all positive: asym uses the full grid
    q = quantize_act(x, 4, sym=False)
    step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 15
    assert ((q - x).abs() <= step / 2 + 1e-5).all()
    assert (quantize_act(x, 4, sym=False) - x).abs().mean() < (quantize_act(x, 4) - x).abs().mean()
    assert torch.equal(quantize_act(x, 16), x.half().float())
    assert quantize_act(x.half(), 8).dtype == torch.float16


def test_zero_rows_stay_zero():
    x = torch.zeros(3, 8)
    for fmt in ("int", "fp8"):
        assert torch.equal(quantize_act(x, 8, fmt=fmt), x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=4, fmt="fp8"), "fp8 activations are 8-bit"),
    (dict(bits=9), "a_bits=9 is not supported"),
    (dict(bits=1), "a_bits=1 is not supported"),
    (dict(bits=8, fmt="nf4"), "activation format 'nf4'"),
    (dict(bits=8, granularity="channel"), "granularity='channel'"),
    (dict(bits=8, sym=False, scale=0.1), "asymmetric activation quantization"),
])
def test_bad_activation_settings(kwargs, match):
    with pytest.raises(QuantError, match=match):
        quantize_act(_x(), **kwargs)


# --------------------------------------------------------------------------------------------
# ActQuantLinear / apply_act_quant


def test_act_quant_linear_shares_the_weight():
    lin = torch.nn.Linear(64, 32)
    aq = ActQuantLinear(lin, a_bits=8)
    assert aq.weight is lin.weight and aq.bias is lin.bias
    x = _x()
    assert torch.allclose(aq(x), lin(quantize_act(x, 8)))
    assert set(aq.state_dict()) == {"weight", "bias"}


def test_apply_and_remove_act_quant(tiny):
    from edgellm.models import linear_layers
    from edgellm.quant.rtn import apply_rtn

    ids = random_ids()
    with torch.no_grad():
        ref = tiny(ids).logits
    names = list(linear_layers(tiny))
    info = apply_act_quant(tiny, a_bits=8)
    assert info["n_act_quantized"] == len(names) == 14 and info["granularity"] == "token"
    assert list(linear_layers(tiny)) == names  # same names: still nn.Linear subclasses
    assert all(isinstance(m, ActQuantLinear) for m in linear_layers(tiny).values())
    with torch.no_grad():
        a8 = tiny(ids).logits
    assert 0 < (a8 - ref).abs().max() < 0.05 * ref.abs().max()
    # weights quantized afterwards go through the wrappers' shared Parameters
    apply_rtn(tiny, bits=8, group_size=None, sym=True)
    with torch.no_grad():
        w8a8 = tiny(ids).logits
    assert not torch.equal(w8a8, a8)
    assert remove_act_quant(tiny) == 14
    assert not any(isinstance(m, ActQuantLinear) for m in tiny.modules())
    assert remove_act_quant(tiny) == 0


def test_fewer_activation_bits_more_error(tiny):
    ids = random_ids()
    with torch.no_grad():
        ref = tiny(ids).logits
    err = {}
    for bits in (8, 6, 4, 3):
        apply_act_quant(tiny, a_bits=bits)  # re-wraps with the new settings
        with torch.no_grad():
            err[bits] = (tiny(ids).logits - ref).square().mean().item()
    remove_act_quant(tiny)
    assert err[8] < err[6] < err[4] < err[3]
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, ref)


def test_static_scales_come_from_calibration(tiny):
    ids = random_ids()
    absmax = input_absmax(tiny, ids)
    info = apply_act_quant(tiny, a_bits=8, static=True, calib=ids)
    assert info["granularity"] == "tensor" and info["static"]
    name = "model.layers.0.self_attn.q_proj"
    assert info["act_scales"][name] == pytest.approx(float(absmax[name].max()) / 127)
    mod = tiny.get_submodule(name)
    assert mod.scale is not None and float(mod.scale) == pytest.approx(info["act_scales"][name])
    info8 = apply_act_quant(tiny, a_bits=8, a_format="fp8", static=True, calib=ids)
    assert info8["act_scales"][name] == pytest.approx(float(absmax[name].max()) / 448)


def test_static_without_calibration_is_a_clear_error(tiny):
    with pytest.raises(QuantError, match="static activation quantization measures its scales"):
        apply_act_quant(tiny, a_bits=8, static=True)
    with pytest.raises(QuantError, match="fp8 activations are 8-bit"):
        apply_act_quant(tiny, a_bits=4, a_format="fp8")


# --------------------------------------------------------------------------------------------
# actstats


def test_channel_stats_and_outliers():
    x = torch.zeros(1000, 4)
    x[:, 0] = torch.arange(1000) / 1000  # |x| uniform on [0, 1)
    x[:10, 2] = 8.0  # 1 % of the tokens reach 8 in channel 2
    st = channel_stats(x, threshold=6.0)
    assert st["n"] == 1000 and st["absmax"].tolist() == pytest.approx([0.999, 0.0, 8.0, 0.0])
    assert st["p50"][0] == pytest.approx(0.4995, abs=1e-3)
    assert st["p99.9"][2] == 8.0 and st["p50"][2] == 0.0
    assert st["n_over"].tolist() == [0, 0, 10, 0]
    assert outlier_channels(st["absmax"]).tolist() == [2]


def test_systematic_outliers_follow_the_25_percent_rule():
    def site(over):  # 100 tokens; `over` tokens above the threshold per channel
        return {"n_over": torch.tensor(over), "n": 100}

    inputs = {}
    for i in range(8):
        # channel 0: in every layer; channel 1: 2 of 8 layers (25 %); channel 2: 1 of 8;
        # channel 3: every layer but only 3 % of the tokens
        inputs[f"model.layers.{i}.self_attn.q_proj"] = site([10, 10 if i < 2 else 0,
                                                             10 if i == 0 else 0, 3])
        inputs[f"model.layers.{i}.mlp.gate_proj"] = site([0, 0, 0, 0])
        inputs[f"model.layers.{i}.mlp.down_proj"] = site([50, 50, 50, 50])  # not a site
    res = systematic_outliers(inputs)
    assert res["channels"] == [0, 1] and res["n_layers"] == 8
    assert res["layer_count"] == {0: 8, 1: 2, 2: 1}


def test_massive_activations_report_their_position():
    h = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    h[1, 0, 7] = -2000.0
    h[0, 3, 5] = 50.0  # large but under the absolute threshold of 100
    m = massive_activations(h)
    assert m["entries"] == [{"value": -2000.0, "batch": 1, "token": 0, "channel": 7}]
    assert m["max"] == 2000.0 and m["median"] < 1
    assert massive_activations(h, 10.0)["entries"] == m["entries"]  # 50 < 1000 x median
    assert massive_activations(h, 10.0, ratio=50.0)["entries"][1]["channel"] == 5


def test_collect_activation_stats_finds_a_planted_outlier_channel(tiny):
    with torch.no_grad():
        for layer in tiny.model.layers:
            layer.input_layernorm.weight[5] = 300.0  # channel 5 of every attention input
    st = collect_activation_stats(tiny, random_ids(), sample_rows=16)
    name = "model.layers.1.self_attn.q_proj"
    assert st["inputs"][name] is st["inputs"]["model.layers.1.self_attn.v_proj"]  # shared
    assert 5 in st["outliers"][name] and st["systematic"]["channels"] == [5]
    assert st["inputs"][name]["p50"].shape == (64,) and st["n_tokens"] == 48
    assert set(st["hidden"]) == {0, 1} and st["hidden"][0]["absmax"].shape == (64,)


@pytest.mark.integration
def test_real_model_has_outlier_features_and_massive_activations(default_model):
    from edgellm.quant.actstats import massive_summary

    model, tok = default_model
    ids = tok("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 4,
              return_tensors="pt").input_ids[:, :64]
    st = collect_activation_stats(model, ids, quantiles=(), hidden=True)
    rows = massive_summary(st)
    # measured: a residual-stream value ~2.4e4 at channel 507 from layer ~3 on, >1e4 x median
    assert rows and rows[0]["ratio"] > 1000 and abs(rows[0]["value"]) > 1000
    # the MLP's down_proj inputs carry values far past LLM.int8's threshold of 6
    downs = [n for n in st["outliers"] if n.endswith("down_proj") and st["outliers"][n]]
    assert len(downs) >= 15
