"""Importance-weighted quantization: never worse than RTN on its weighted objective (per group),
better in total, sensible on the real model; bad input."""

import copy

import pytest
import torch

from edgellm.calib import CalibrationError, LayerStream, collect_inputs, layer_linears
from edgellm.quant.imatrix import apply_imatrix, collect_imatrix, quantize_weighted, weighted_error
from edgellm.quant.qtensor import QuantError
from edgellm.quant.rtn import fake_quantize


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(40, 96, generator=g)
    imp = torch.rand(96, generator=g).pow(4) * 10  # a few channels matter much more
    return W, imp


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, None), (2, 16)])
def test_weighted_search_beats_rtn(sym, bits, group_size):
    W, imp = _toy()
    qt = quantize_weighted(W, imp, bits, group_size, sym)
    ours = weighted_error(W, qt.dequantize(), imp, group_size)
    rtn = weighted_error(W, fake_quantize(W, bits, group_size, sym), imp, group_size)
    assert (ours <= rtn * (1 + 1e-6)).all()  # RTN is one of the candidates
    assert ours.sum() < 0.9 * rtn.sum()
    assert qt.bits == bits and qt.sym == sym
    assert torch.equal(qt.scale, qt.scale.half().float())  # stored in fp16
    if sym:
        assert not qt.offset.any() and qt.codes.abs().max() <= 2 ** (bits - 1) - 1


def test_uniform_importance_is_plain_weighted_least_squares():
    W, _ = _toy(1)
    qt = quantize_weighted(W, torch.ones(96), 4, 32)
    plain = (W - qt.dequantize()).square().sum()
    assert plain <= (W - fake_quantize(W, 4, 32)).square().sum()


def test_collect_imatrix_is_mean_square_input(tiny):
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    imat = collect_imatrix(tiny, ids, progress=False)
    assert len(imat) == 14
    x = tiny.model.layers[0].input_layernorm(tiny.model.embed_tokens(ids)).reshape(-1, 64)
    assert torch.allclose(imat["model.layers.0.self_attn.k_proj"], x.square().mean(0), rtol=1e-4)


@pytest.mark.integration
def test_imatrix_on_real_layers(default_model):
    """smollm2-135m, 8×128 calibration tokens, 3-bit g64, first decoder layer: the weighted
    objective is below RTN's for every linear, and so is the true output error ‖ΔW X‖²."""
    from edgellm import get_calibration

    model, tok = default_model
    m = copy.deepcopy(model)
    calib = get_calibration(n_samples=8, seq_len=128, tokenizer=tok)
    stats = collect_inputs(m.model.layers[0], layer_linears(m, 0), LayerStream(m, calib))
    orig = {n: lin.weight.detach().clone() for n, lin in layer_linears(m, 0).items()}
    q = apply_imatrix(m, calib, bits=3, group_size=64, layers=[0], progress=False).qtensors
    assert len(q) == 7
    for name, W in orig.items():
        imp, H = stats[name].mean_sq, stats[name].H
        R = fake_quantize(W, 3, 64)
        Q = q[name].dequantize()
        assert weighted_error(W, Q, imp).sum() < weighted_error(W, R, imp).sum(), name
        dq, dr = W - Q, W - R
        assert ((dq @ H) * dq).sum() < ((dr @ H) * dr).sum(), name


def test_bad_input(tiny):
    W, imp = _toy()
    with pytest.raises(CalibrationError, match="empty"):
        apply_imatrix(tiny, torch.zeros(3, 0, dtype=torch.long), progress=False)
    with pytest.raises(QuantError, match="non-negative"):
        quantize_weighted(W, -imp)
    with pytest.raises(QuantError, match="imp"):
        quantize_weighted(W, imp[:10])
    with pytest.raises(QuantError, match="NaN"):
        quantize_weighted(W, imp * float("nan"))
    with pytest.raises(QuantError, match="group_size=50 does not divide in_features=96"):
        quantize_weighted(W, imp, 4, 50)
