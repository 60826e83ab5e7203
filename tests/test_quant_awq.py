"""AWQ: the scale and clipping searches never do worse than RTN on their objective, folding the
scales is exact, and on the real model AWQ's decoder-layer outputs are closer than RTN's."""

import copy

import pytest
import torch

from edgellm.calib import CalibrationError, LayerStream, layer_linears
from edgellm.hessian import from_inputs, layer_error
from edgellm.quant.awq import (
    apply_awq,
    awq_scales,
    fake_quantize_range,
    search_clip,
    search_scale,
    search_scale_linear,
)
from edgellm.quant.qtensor import QuantError
from edgellm.quant.rtn import apply_rtn, fake_quantize


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 128, generator=g)
    mag = torch.rand(128, generator=g) * 4
    mag[:4] = 20  # a few salient input channels, as in real activations
    X = torch.randn(800, 128, generator=g) * mag
    return W, X


def test_awq_scales_are_normalised():
    mag = torch.tensor([0.1, 1.0, 10.0])
    s = awq_scales(mag, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(awq_scales(mag, 0.0), torch.ones(3))


@pytest.mark.parametrize("sym", [False, True])
def test_scale_search_beats_rtn_on_the_layer_output(sym):
    W, X = _toy()
    s, alpha, errors = search_scale_linear(W, X, 3, 32, sym)
    assert alpha > 0 and min(errors) < 0.9 * errors[0]  # errors[0] is α = 0: plain RTN
    H = from_inputs(X)  # 2 XᵀX / n
    rtn = layer_error(W, fake_quantize(W, 3, 32, sym), H=H)
    awq = layer_error(W, fake_quantize(W * s, 3, 32, sym) / s, H=H)
    assert torch.isclose(awq, torch.tensor(min(errors)), rtol=1e-4)
    assert torch.isclose(rtn, torch.tensor(errors[0]), rtol=1e-4)
    # the same error measured on the tokens themselves
    direct = ((X / s) @ fake_quantize(W * s, 3, 32, sym).T - X @ W.T).square().sum() / len(X)
    assert torch.isclose(direct, awq, rtol=1e-3)


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_worse_than_rtn_per_group(sym):
    W, X = _toy(1)
    H = from_inputs(X)
    r = search_clip(W, H, 3, 32, sym)
    assert r.shape == (48, 4) and (r <= 1).all() and (r >= 0.5).all() and (r < 1).any()
    clipped = fake_quantize_range(W, 3, 32, sym, r).dequantize()
    plain = fake_quantize(W, 3, 32, sym)
    assert layer_error(W, clipped, H=H) < layer_error(W, plain, H=H)
    assert torch.equal(fake_quantize_range(W, 3, 32, sym, 1.0).dequantize(), plain)


def test_folding_is_exact_before_rounding(tiny):
    """With 8 bits the rounding is negligible: the model computes the same function."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(tiny)
    info = apply_awq(tiny, ids, bits=8, group_size=32, progress=False).info
    assert set(info) == {f"model.layers.{i}.{k}" for i in range(2) for k in
                         ("self_attn.q_proj/k_proj/v_proj", "mlp.gate_proj/up_proj",
                          "mlp.down_proj")}  # GQA: o_proj is not scaled
    assert not torch.equal(tiny.model.layers[0].input_layernorm.weight,
                           ref.model.layers[0].input_layernorm.weight) or all(
        a == 0 for a in info.values())
    with torch.no_grad():
        a, b = tiny(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.integration
@pytest.mark.parametrize("sym", [False, True])
def test_awq_beats_rtn_on_real_decoder_layers(default_model, sym):
    """smollm2-135m, 8×128 calibration tokens, 4-bit g64, first two decoder layers: the hidden
    states after them are closer to the unquantized model's with AWQ than with RTN."""
    from edgellm import get_calibration

    model, tok = default_model
    calib = get_calibration(n_samples=8, seq_len=128, tokenizer=tok)
    awq, rtn = copy.deepcopy(model), copy.deepcopy(model)
    q = apply_awq(awq, calib, bits=4, group_size=64, sym=sym, layers=[0, 1],
                  progress=False).qtensors
    assert set(q) == set(layer_linears(model, 0)) | set(layer_linears(model, 1))
    apply_rtn(rtn, bits=4, group_size=64, sym=sym, layers={**layer_linears(rtn, 0), **layer_linears(rtn, 1)})

    def after_two_layers(m):
        st = LayerStream(m, calib)
        for layer in m.model.layers[:2]:
            st.advance(layer)
        return st.hidden

    ref = after_two_layers(model)
    err_awq = (after_two_layers(awq) - ref).square().mean()
    err_rtn = (after_two_layers(rtn) - ref).square().mean()
    assert err_awq < 0.95 * err_rtn, (err_awq.item(), err_rtn.item())


def test_bad_input(tiny):
    W, X = _toy()
    with pytest.raises(CalibrationError, match="empty"):
        apply_awq(tiny, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(QuantError, match="group_size=48 does not divide in_features=64"):
        apply_awq(tiny, torch.ones(1, 8, dtype=torch.long), group_size=48, progress=False)
    with pytest.raises(QuantError, match="bits=9"):
        apply_awq(tiny, torch.ones(1, 8, dtype=torch.long), bits=9, progress=False)
    with pytest.raises(QuantError, match="does not divide"):
        search_scale([W], from_inputs(X), X.abs().mean(0), 4, 100)
