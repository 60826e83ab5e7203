"""Quantization-aware training (edgellm.qat): the straight-through estimator, the grids it trains
through (lesson 03's min-max, llama.cpp's Q4_0, BitNet's ternary), LSQ's step gradient, ternary
packing, and the layer swap in and out of a model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgellm.qat.apply import check_options, parse_bits, qat_train, quantized_size, ramp_lambda
from edgellm.qat.bitnet import absmean_ternary, pack_ternary, ternary_bytes, unpack_ternary
from edgellm.qat.fake import QATError, absmax_act, quantize_weight, round_ste, ste
from edgellm.qat.layers import FakeQuantLinear, finalize, prepare, set_lambda
from edgellm.qat.lsq import init_step, lsq_codes, lsq_quantize, qrange


def _w(out=8, n=64, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed)) * 0.05


# --------------------------------------------------------------------------------------------
# the estimator


def test_ste_forward_is_the_mix_and_backward_the_identity():
    x = torch.randn(5, 7, requires_grad=True)
    xq = x.detach().round()
    for lam in (0.0, 0.3, 1.0):
        y = ste(x, xq, lam)
        torch.testing.assert_close(y, (1 - lam) * x.detach() + lam * xq, rtol=0, atol=1e-6)
        (g,) = torch.autograd.grad((y * torch.arange(7.0)).sum(), x)
        torch.testing.assert_close(g, torch.arange(7.0).expand(5, 7))  # ∂y/∂x = 1


def test_round_ste_rounds_forward_and_passes_gradients():
    x = torch.tensor([0.2, 0.7, -1.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 1.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_ramp_rises_linearly_to_one():
    assert [ramp_lambda(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp_lambda(0, 0) == 1.0


# --------------------------------------------------------------------------------------------
# the grids are the course's own


def test_minmax_grid_is_lesson_03s_rtn():
    from edgellm.quant.rtn import fake_quantize

    w = _w()
    assert torch.equal(quantize_weight(w, grid="minmax", bits=2, group_size=32),
                       fake_quantize(w, 2, 32, sym=False))
    for row in quantize_weight(w, grid="minmax", bits=2, group_size=32).reshape(-1, 32):
        assert len(row.unique()) <= 4


def test_q4_0_grid_is_llamacpps_and_idempotent():
    from edgellm.quant.gguf_formats import quantize_gguf

    w = _w(n=96)
    q = quantize_weight(w, grid="q4_0")
    assert torch.equal(q, quantize_gguf(w, "Q4_0").dequantize())
    # what QAT ends on re-quantizes to itself: the export is bit for bit
    again = quantize_gguf(q, "Q4_0")
    assert torch.equal(again.dequantize(), q)
    assert torch.equal(again.codes, quantize_gguf(w, "Q4_0").codes)


def test_absmean_ternary_by_hand():
    w = torch.tensor([[0.9, -0.1, 0.0, -2.0], [0.4, 0.3, -0.5, 0.2]])
    codes, gamma = absmean_ternary(w)
    assert gamma.item() == pytest.approx(w.abs().mean().item())  # 0.55
    assert codes.tolist() == [[1, 0, 0, -1], [1, 1, -1, 0]]  # round(w/0.55) clamped to ±1
    q = quantize_weight(w, grid="ternary")
    assert set(q.unique().tolist()) <= {-gamma.item(), 0.0, gamma.item()}


def test_absmax_activations_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.1], [10.0, 3.0, -7.0, 0.0]])
    y = absmax_act(x, 8)
    assert y[:, 0].tolist() == [1.0, 10.0]  # the largest magnitude is exact (code 127)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((y - x).abs() <= step / 2 + 1e-7).all()
    assert len(y[0].unique()) == 4


def test_bad_grid_and_bits():
    with pytest.raises(QATError, match="grid"):
        quantize_weight(_w(), grid="nf4")
    for bad in ("5", "1", "x", "1.5"):
        with pytest.raises(QATError, match="1.58, 2, 3, 4"):
            parse_bits(bad)
    assert parse_bits("1.58") == 1.58 and parse_bits("2.0") == 2
    with pytest.raises(QATError, match="groups of 32"):
        check_options(bits=4, group_size=64)
    with pytest.raises(QATError, match="ramp"):
        check_options(bits=2, steps=10, ramp=11)
    with pytest.raises(QATError, match="lsq"):
        check_options(bits=1.58, lsq=True)


# --------------------------------------------------------------------------------------------
# LSQ


def test_lsq_step_gradient_matches_the_paper():
    bits, g = 2, 4
    qn, qp = qrange(bits)
    w = torch.tensor([[0.05, -0.30, 0.12, 0.9]])  # one group of 4; 0.9 clips at Q_P
    s = torch.tensor([[0.1]], requires_grad=True)
    lsq_quantize(w, s, bits).sum().backward()
    v = w / 0.1
    inside = (v > -qn) & (v < qp)
    per = torch.where(inside, v.round() - v, torch.where(v <= -qn, -qn, qp) * torch.ones_like(v))
    want = per.sum() / math.sqrt(g * qp)
    assert s.grad.item() == pytest.approx(want.item(), rel=1e-5)


def test_lsq_codes_and_init():
    w = _w(n=64)
    s = init_step(w, 3, 32)
    assert s.shape == (8, 2)
    torch.testing.assert_close(s, 2 * w.reshape(8, 2, 32).abs().mean(-1) / math.sqrt(3))
    c = lsq_codes(w, s, 3)
    assert c.min() >= -4 and c.max() <= 3
    torch.testing.assert_close(lsq_quantize(w, s, 3),
                               (c.float().reshape(8, 2, 32) * s.unsqueeze(-1)).reshape(8, 64))


# --------------------------------------------------------------------------------------------
# ternary packing


@pytest.mark.parametrize("n", [1, 5, 6, 1003])
def test_ternary_packs_five_per_byte_and_round_trips(n):
    c = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n)).to(torch.int8)
    p = pack_ternary(c)
    assert p.dtype == torch.uint8 and p.numel() == -(-n // 5)
    assert torch.equal(unpack_ternary(p, n), c)
    assert ternary_bytes(n) == p.numel() + 2


def test_ternary_pack_rejects_other_codes():
    with pytest.raises(ValueError, match="-1, 0, \\+1"):
        pack_ternary(torch.tensor([2]))


# --------------------------------------------------------------------------------------------
# the model: prepare → train → finalize


@pytest.mark.parametrize("grid,bits,a_bits", [("minmax", 2, None), ("q4_0", 4, None),
                                               ("ternary", 4, 8)])
def test_prepare_then_finalize_is_the_same_function(tiny, grid, bits, a_bits):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = prepare(tiny, grid=grid, bits=bits, group_size=32, a_bits=a_bits)
    assert len(layers) == 14 and all(isinstance(m, FakeQuantLinear) for m in layers.values())
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert not any("embed" in n for n in trainable)
    assert any("norm" in n for n in trainable) and any("q_proj" in n for n in trainable)
    loss = tiny(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for m in layers.values())
    with torch.no_grad():
        before = tiny(input_ids=ids).logits
    qts = finalize(tiny)
    with torch.no_grad():
        after = tiny(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny.modules())
    name, qt = next(iter(qts.items()))
    torch.testing.assert_close(tiny.get_submodule(name).weight, qt.dequantize(), rtol=0, atol=0)


def test_lambda_zero_is_the_fp32_model(tiny):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny(input_ids=ids).logits
    prepare(tiny, grid="minmax", bits=2, group_size=32)
    set_lambda(tiny, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(tiny(input_ids=ids).logits, ref, rtol=0, atol=1e-6)
    set_lambda(tiny, 1.0)
    with torch.no_grad():
        assert (tiny(input_ids=ids).logits - ref).abs().max() > 1e-3


def test_qat_training_lowers_the_loss_of_the_quantized_model(tiny):
    # a repetitive stream a tiny model can learn in a few steps
    stream = torch.arange(64).repeat(40) % 32
    out = qat_train(tiny, stream, bits=2, group_size=32, steps=15, batch_size=2, seq_len=32,
                    lr=3e-3, ramp=5)
    losses = out["train"].losses
    assert losses[-1] < losses[0] - 0.5
    assert len(out["qtensors"]) == 14


def test_size_counts_ternary_below_two_bits(tiny):
    prepare(tiny, grid="ternary", group_size=32, a_bits=8)
    qts = finalize(tiny)
    s = quantized_size(tiny, qts, 1.58)
    n_lin = sum(q.numel for q in qts.values())
    assert s["size_bytes_linears"] == sum(-(-q.numel // 5) + 2 for q in qts.values())
    assert 1.6 <= s["bpw"] < 1.61 + 8 * 2 * 14 / n_lin
    assert s["size_bytes_embedding"] == 256 * 64 * 2  # fp16


# --------------------------------------------------------------------------------------------
# the command on the default model


@pytest.mark.integration
def test_qat_4bit_saves_codes_that_export_bit_for_bit(tmp_path):
    from edgellm.quant.gguf_formats import quantize_gguf
    from edgellm.quant.save import load_quantized

    out = tmp_path / "q"
    edgellm = Path(sys.executable).parent / "edgellm"
    r = subprocess.run([str(edgellm), "qat", "--bits", "4", "--steps",
                        "1", "--batch-size", "1", "--seq-len", "32", "--out", str(out),
                        "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    model, _, qts = load_quantized(out)
    assert len(qts) == 210
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        w = model.get_submodule(name).weight
        again = quantize_gguf(w, "Q4_0")
        assert torch.equal(again.codes, qts[name].codes)
        assert torch.equal(again.scale, qts[name].scale)
