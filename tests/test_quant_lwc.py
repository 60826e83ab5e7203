"""Learnable weight clipping (OmniQuant's LWC): never worse than min/max, cache round trip."""

import pytest
import torch

from edgellm.quant.lwc import (
    apply_lwc,
    learn_clipping,
    load_clips,
    quantize_with_clips,
    save_clips,
)
from edgellm.quant.qtensor import QuantError
from edgellm.quant.rtn import quantize


def _toy(seed=0, out=16, n=64, tokens=256):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    W[:, 3] *= 6  # a few large weights: min/max wastes the grid on them
    X = torch.randn(tokens, n, generator=g)
    return W, X


def _err(W, Wq, X):
    return ((X @ (W - Wq).T) ** 2).sum().item() / X.shape[0]


def test_ones_is_minmax_rtn():
    W, _ = _toy()
    for sym in (False, True):
        ones = {"gamma": torch.ones(16, 2)} | ({} if sym else {"beta": torch.ones(16, 2)})
        qt = quantize_with_clips(W, ones, bits=3, group_size=32, sym=sym)
        ref = quantize(W, bits=3, group_size=32, sym=sym)
        assert torch.equal(qt.dequantize(), ref.dequantize())


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("clip_per", ["group", "channel"])
def test_lwc_beats_minmax_on_toy_layer(sym, clip_per):
    W, X = _toy()
    fit = learn_clipping(W, X, bits=3, group_size=32, sym=sym, steps=60, lr=0.05,
                         clip_per=clip_per)
    qt, params = fit.qtensor, fit.params
    assert set(params) == ({"gamma"} if sym else {"gamma", "beta"})
    assert params["gamma"].shape == ((16, 2) if clip_per == "group" else (16, 1))
    assert ((params["gamma"] > 0) & (params["gamma"] <= 1)).all()
    err_lwc = _err(W, qt.dequantize(), X)
    err_rtn = _err(W, quantize(W, bits=3, group_size=32, sym=sym).dequantize(), X)
    assert err_lwc == pytest.approx(fit.err_lwc, rel=1e-3)
    assert fit.err_minmax == pytest.approx(err_rtn, rel=1e-3)
    assert err_lwc < 0.9 * err_rtn  # the outlier column makes clipping pay off
    assert qt.codes.min() >= (-3 if sym else 0) and qt.codes.max() <= (3 if sym else 7)


def test_lwc_never_worse_with_zero_steps():
    W, X = _toy(1)
    fit = learn_clipping(W, X, bits=4, group_size=64, steps=0)
    params = fit.params
    # no training: the better of min/max (γ = 1) and the initial point (γ = sigmoid(4))
    start = torch.sigmoid(torch.tensor(4.0)).half().float()
    assert params["gamma"].unique().tolist() in ([1.0], [start.item()])
    assert fit.err_lwc <= fit.err_minmax and fit.losses == []


def test_bad_inputs():
    W, X = _toy()
    with pytest.raises(QuantError, match="group_size=48"):
        learn_clipping(W, X, group_size=48)
    with pytest.raises(QuantError, match="X has 32 features"):
        learn_clipping(W, X[:, :32])
    with pytest.raises(QuantError, match="clip_per"):
        learn_clipping(W, X, clip_per="tensor")
    with pytest.raises(QuantError, match="calibration inputs"):
        learn_clipping(W)


def test_apply_lwc_and_cache_round_trip(tmp_path):
    from edgellm import tiny_llama
    from edgellm.models import linear_layers

    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    res = apply_lwc(model, calib, bits=3, group_size=32, steps=10)
    qts, info = res.qtensors, {**res.info, "clips": res.clips}
    names = list(linear_layers(model))
    assert list(qts) == names and set(info["errors"]) == set(names)
    assert all(e["err_lwc"] <= e["err_minmax"] for e in info["errors"].values())
    for name, lin in linear_layers(model).items():
        assert torch.equal(lin.weight, qts[name].dequantize())
    path = save_clips(info["clips"], tmp_path / "clips.safetensors", {"bits": 3})
    clips = load_clips(path)
    for name in names:
        for k, v in info["clips"][name].items():
            assert torch.equal(clips[name][k], v)  # stored values are fp16 already
    again = tiny_llama()
    qts2 = apply_lwc(again, bits=3, group_size=32, clips=clips).qtensors
    for name, lin in linear_layers(again).items():
        assert torch.equal(lin.weight, linear_layers(model)[name].weight)
        assert torch.equal(qts2[name].codes, qts[name].codes)
    with pytest.raises(QuantError, match="no entry"):
        apply_lwc(tiny_llama(), bits=3, group_size=32, clips={names[0]: clips[names[0]]})
    with pytest.raises(QuantError, match="no clip cache"):
        load_clips(tmp_path / "missing.safetensors")
