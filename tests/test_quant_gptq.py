"""GPTQ and the layer-by-layer calibration loop: exactness of the loop, GPTQ beats RTN on the
layer-wise objective for every linear it touches (symmetric and asymmetric), bad input."""

import copy

import pytest
import torch

from edgellm.calib import (
    CalibrationError,
    LayerStream,
    collect_inputs,
    layer_linears,
    logits_from_stream,
    sequential,
)
from edgellm.hessian import layer_error
from edgellm.quant.gptq import apply_gptq, gptq_quantize
from edgellm.quant.qtensor import QuantError
from edgellm.quant.rtn import fake_quantize


def _toy(out=24, n=96, tokens=400, seed=0, dead=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g)  # correlated inputs
    if dead:
        X[:, 5] = 0  # a dead input channel: GPTQ zeroes its weights
    return W, X, 2 * X.T @ X / tokens


def test_stream_reproduces_the_model(tiny):
    ids = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(1))
    stream = sequential(tiny, ids, lambda i, layer, s: None, batch_size=2, progress=False)
    ref = tiny(input_ids=ids).logits
    assert torch.allclose(logits_from_stream(tiny, stream), ref, atol=1e-5)


def test_collect_inputs_shares_q_k_v_and_counts_tokens(tiny):
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    stream = LayerStream(tiny, ids, batch_size=2)
    lin = layer_linears(tiny, 0)
    stats = collect_inputs(tiny.model.layers[0], lin, stream, keep=2)
    p = "model.layers.0."
    assert stats[p + "self_attn.q_proj"] is stats[p + "self_attn.v_proj"]
    assert stats[p + "mlp.gate_proj"] is stats[p + "mlp.up_proj"]
    assert stats[p + "mlp.down_proj"] is not stats[p + "mlp.up_proj"]
    st = stats[p + "self_attn.q_proj"]
    assert st.n == 48 and st.X.shape == (2, 16, 64)
    x = tiny.model.layers[0].input_layernorm(stream.hidden).reshape(-1, 64)
    assert torch.allclose(st.xtx, x.T @ x, rtol=1e-4, atol=1e-4)
    assert torch.allclose(st.sq, st.xtx.diagonal(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size,act_order,static", [
    (32, False, False), (None, False, False), (32, True, False), (32, True, True), (48, False, False)])
def test_gptq_core_beats_rtn_and_matches_its_qtensor(sym, group_size, act_order, static):
    W, X, H = _toy()
    Q, qt = gptq_quantize(W, H, bits=3, group_size=group_size, sym=sym, act_order=act_order,
                          static_groups=static, block_size=40)  # blocks straddle groups
    R = fake_quantize(W, 3, group_size, sym)
    assert layer_error(W, Q, X) < 0.8 * layer_error(W, R, X)
    assert torch.equal(qt.dequantize(), Q)  # every column sits exactly on its group's grid
    assert qt.bits == 3 and qt.sym == sym and qt.shape == tuple(W.shape)
    if sym:
        assert qt.codes.min() >= -3 and qt.codes.max() <= 3 and not qt.offset.any()
    else:
        assert qt.codes.min() >= 0 and qt.codes.max() <= 7


def test_lazy_block_updates_change_nothing():
    W, X, H = _toy()
    Q1, _ = gptq_quantize(W, H, 4, 32, block_size=1)
    Q2, _ = gptq_quantize(W, H, 4, 32, block_size=128)
    Q3, _ = gptq_quantize(W, H, 4, 32, block_size=40)
    # the same arithmetic in another order: a few codes may flip where ties round differently
    assert (Q1 != Q2).float().mean() < 0.01 and (Q1 != Q3).float().mean() < 0.01
    assert abs(layer_error(W, Q1, X) - layer_error(W, Q2, X)) < 1e-3 * layer_error(W, Q1, X)


def test_first_column_is_plain_rtn_and_per_channel_params_are_rtn():
    W, X, H = _toy(dead=False)
    Q, qt = gptq_quantize(W, H, 4, None)
    R = fake_quantize(W, 4, None)
    assert torch.equal(Q[:, 0], R[:, 0])  # nothing has been updated before column 0
    # per channel, the parameters are taken at column 0, before any update: RTN's
    from edgellm.quant.rtn import quantize
    assert torch.equal(qt.scale, quantize(W, 4, None).scale)


def test_apply_gptq_on_tiny_model(tiny):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(tiny)
    q = apply_gptq(tiny, ids, bits=4, group_size=32, progress=False, batch_size=3).qtensors
    assert len(q) == 14 and list(q)[0] == "model.layers.0.self_attn.q_proj"
    for name, lin in layer_linears(tiny, 1).items():
        assert torch.equal(lin.weight, q[name].dequantize())
        assert not torch.equal(lin.weight, dict(ref.named_modules())[name].weight)
    with torch.no_grad():
        out, want = tiny(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (out - want).abs().mean() < 0.1 * want.abs().mean()


@pytest.mark.parametrize("setting", [{"act_order": True}, {"damp": 0.1},
                                     {"group_params": "block_start"}])
def test_gptq_settings_reach_the_quantizer_and_the_record(tiny, setting):
    # each of --act-order / --damp / --group-params reaches GPTQ: the codes change
    from edgellm.quant.apply import quantize_weights

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    base = quantize_weights(copy.deepcopy(tiny), ids, method="gptq", bits=3, group_size=16)
    got = quantize_weights(copy.deepcopy(tiny), ids, method="gptq", bits=3, group_size=16,
                           **setting)
    assert any(not torch.equal(base.qtensors[n].codes, got.qtensors[n].codes)
               for n in base.qtensors)


@pytest.mark.integration
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn_on_every_linear_of_the_real_model(default_model, sym):
    """The issue's cross-check, on the first two decoder layers of smollm2-135m with 8×128
    calibration tokens: ‖WX − QX‖ of GPTQ below RTN's on the same calibration inputs, for every
    linear layer it touches (4-bit, groups of 64; note the model's own Q4_1 g32 provenance makes
    *asymmetric g32* lossless, so g64 is where the methods differ)."""
    from edgellm import get_calibration

    model, tok = default_model
    model = copy.deepcopy(model)
    calib = get_calibration(n_samples=8, seq_len=128, tokenizer=tok)
    ratios = {}

    def check_layer(i, layer, stream):
        linears = layer_linears(model, i)
        stats = collect_inputs(layer, linears, stream)
        for name, lin in linears.items():
            W, H = lin.weight.detach(), stats[name].H
            Q, _ = gptq_quantize(W, H, 4, 64, sym)
            R = fake_quantize(W, 4, 64, sym)
            ratios[name] = layer_error(W, Q, H=H) / layer_error(W, R, H=H)
            lin.weight.copy_(Q)

    sequential(model, calib, check_layer, layers=[0, 1], progress=False)
    assert len(ratios) == 14
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] < 0.95, (worst, ratios[worst])

    # apply_gptq does the same thing (stacked q/k/v and gate/up give the same result)
    m2 = copy.deepcopy(default_model[0])
    q = apply_gptq(m2, calib, bits=4, group_size=64, sym=sym, layers=[0], progress=False).qtensors
    assert set(q) == set(layer_linears(m2, 0))
    for name, lin in layer_linears(m2, 0).items():
        want = dict(model.named_modules())[name].weight
        assert (lin.weight != want).float().mean() < 0.01, name


def test_bad_input(tiny):
    W, X, H = _toy()
    with pytest.raises(CalibrationError, match="empty"):
        apply_gptq(tiny, torch.zeros(0, 16, dtype=torch.long), progress=False)
    with pytest.raises(CalibrationError, match="calibration"):
        apply_gptq(tiny, None, progress=False)
    with pytest.raises(QuantError, match="does not divide in_features=96"):
        gptq_quantize(W, H, 4, group_size=50)
    with pytest.raises(QuantError, match="bits=1"):
        gptq_quantize(W, H, 1)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        gptq_quantize(bad, H)
    with pytest.raises(QuantError, match="H"):
        gptq_quantize(W, H[:10, :10])
    with pytest.raises(QuantError, match="group_size=48 does not divide in_features=64"):
        apply_gptq(tiny, torch.ones(1, 8, dtype=torch.long), group_size=48, progress=False)
    with pytest.raises(CalibrationError, match="layers"):
        apply_gptq(tiny, torch.ones(1, 8, dtype=torch.long), layers=[5], progress=False)
