"""RTN: the min/max quantizer, its contract with the other methods, and the Q4_1 provenance."""

import copy

import pytest
import torch

from edgellm.quant import rtn
from edgellm.quant.modules import QuantLinear, swap_in, swap_out
from edgellm.quant.qtensor import QTensor, QuantError


def _W(out=8, n=64, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


def test_toy_asym_by_hand():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 0.25, 0.75]])
    scale, offset = rtn.minmax_params(w, bits=2, sym=False, scale_dtype=None)
    assert scale.shape == (1, 1) and scale.item() == 1.0 and offset.item() == -1.0
    q = rtn.quantize_codes(w, scale, offset, bits=2, sym=False)
    # (w + 1) / 1 = 0, .5, 1, 1.5, 2, 3, 1.25, 1.75 -> round half to even
    assert q.tolist() == [[0, 0, 1, 2, 2, 3, 1, 2]]
    assert rtn.dequantize_codes(q, scale, offset).tolist() == [[-1, -1, 0, 1, 1, 2, 0, 1]]


def test_toy_sym_by_hand():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.3, 0.7, 1.5]])
    scale, offset = rtn.minmax_params(w, bits=3, sym=True, scale_dtype=None)
    assert scale.item() == 0.5 and offset.item() == 0  # absmax / (2**2 - 1) ... 1.5 / 3
    q = rtn.quantize_codes(w, scale, offset, bits=3, sym=True)
    assert q.tolist() == [[-2, -1, 0, 1, 1, 3]] and q.dtype == torch.int8
    assert rtn.code_range(3, True) == (-3, 3) and rtn.code_range(3, False) == (0, 7)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 64, None])
def test_quantize_contract(sym, bits, group_size):
    W = _W()
    qt = rtn.quantize(W, bits, group_size, sym)
    g = 64 if group_size is None else group_size
    assert isinstance(qt, QTensor) and qt.shape == (8, 64) and qt.group_size == g
    assert qt.scale.shape == (8, 64 // g) and qt.scale.dtype == torch.float32
    lo, hi = rtn.code_range(bits, sym)
    assert qt.codes.min() >= lo and qt.codes.max() <= hi
    assert torch.equal(qt.scale, qt.scale.half().float())  # fp16-representable
    W_hat = rtn.fake_quantize(W, bits, group_size, sym)
    assert torch.equal(W_hat, qt.dequantize())
    # the error of every weight is at most half a step (plus fp16 rounding of the parameters)
    step = qt.scale.repeat_interleave(g, dim=1)
    assert ((W_hat - W).abs() <= step / 2 * 1.01 + 1e-3).all()
    assert qt.bpw == bits + (16 if sym else 32) / g
    assert qt.size_bytes == (8 * 64 * bits + 7) // 8 + qt.scale.numel() * (2 if sym else 4)


@pytest.mark.parametrize("sym", [False, True])
def test_more_bits_less_error(sym):
    W = _W(32, 128)
    errs = [(rtn.fake_quantize(W, b, 32, sym) - W).norm().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))


def test_asym_beats_sym_on_shifted_weights():
    W = _W() + 1.0  # every group off-centre: the zero point pays off
    e_asym = (rtn.fake_quantize(W, 4, 32, False) - W).norm()
    e_sym = (rtn.fake_quantize(W, 4, 32, True) - W).norm()
    assert e_asym < 0.7 * e_sym


def test_scale_dtype_none_keeps_fp32():
    W = _W() * 1e-3
    s16, _ = rtn.minmax_params(W, 4, False, torch.float16)
    s32, _ = rtn.minmax_params(W, 4, False, None)
    assert not torch.equal(s16, s32) and (s16 - s32).abs().max() < 1e-6
    assert rtn.quantize(W, 4, 32, scale_dtype=None).bpw == 4 + 64 / 32


def test_constant_and_zero_groups():
    W = torch.zeros(2, 32)
    W[1] = 0.75
    assert torch.equal(rtn.fake_quantize(W, 4, 32, sym=False), W)  # offset = the constant
    W_sym = rtn.fake_quantize(W, 4, 32, sym=True)  # 7 * fp16(0.75 / 7): fp16 rounding only
    assert torch.equal(W_sym[0], W[0]) and (W_sym[1] - 0.75).abs().max() < 1e-3


def test_bad_input_errors():
    W = _W(4, 576)
    with pytest.raises(QuantError, match=r"group_size=100 does not divide in_features=576; "
                                         r"use .*32, .*64, .*192, .* or 576"):
        rtn.quantize(W, 4, 100)
    with pytest.raises(QuantError, match="bits=1 is not supported"):
        rtn.quantize(W, 1, 64)
    with pytest.raises(QuantError, match="bits=16"):
        rtn.minmax_params(W, 16)
    W[1, 3] = float("inf")
    with pytest.raises(QuantError, match="NaN/Inf"):
        rtn.quantize(W, 4, 64)
    with pytest.raises(QuantError, match="2-D"):
        rtn.quantize(torch.randn(4), 4, None)
    rtn.check_group_size(576, None)
    rtn.check_group_size(576, 192)


def test_apply_rtn_tiny_and_modules(tiny):
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(tiny)
    qts = rtn.apply_rtn(tiny, bits=3, group_size=32).qtensors
    assert len(qts) == 2 * 7
    for name, qt in qts.items():
        assert torch.equal(tiny.get_submodule(name).weight, qt.dequantize())
    fake = tiny(ids).logits
    # the swap-in module holds only codes + scales and gives the same logits
    originals = swap_in(ref, qts)
    assert isinstance(ref.get_submodule(next(iter(qts))), QuantLinear)
    assert torch.equal(ref(ids).logits, fake)
    swap_out(ref, originals)
    assert isinstance(ref.get_submodule(next(iter(qts))), torch.nn.Linear)
    assert not torch.equal(ref(ids).logits, fake)  # the original weights are back
    lin = QuantLinear.from_linear(ref.get_submodule(next(iter(qts))), bits=3, group_size=32)
    assert torch.equal(lin.to_linear().weight, qts[next(iter(qts))].dequantize())


def test_apply_rtn_bits_per_layer(tiny):
    from edgellm.models import linear_layers

    names = list(linear_layers(tiny))
    bits = {n: (8 if i % 2 else 2) for i, n in enumerate(names)}
    qts = rtn.apply_rtn(tiny, bits=bits, group_size=32).qtensors
    assert {n: q.bits for n, q in qts.items()} == bits


def test_apply_rtn_names_the_failing_layer(tiny):
    with pytest.raises(QuantError, match=r"model\.layers\.0\..*group_size=48"):
        rtn.apply_rtn(tiny, bits=4, group_size=48)


@pytest.mark.integration
def test_provenance_q4_1_is_reproduced_exactly(default_model):
    """The default model's 210 linears were stored as Q4_1 (asym 4-bit g32, fp16 d and m):
    re-quantizing them that way, with our RTN and with gguf.quants, changes nothing."""
    from edgellm.models import linear_layers
    from edgellm.quant.gguf_formats import gguf_quantize_numpy

    model, _ = default_model
    layers = linear_layers(model)
    assert len(layers) == 210
    worst_rtn = worst_gguf = 0.0
    for lin in layers.values():
        W = lin.weight.detach()
        worst_rtn = max(worst_rtn, (rtn.fake_quantize(W, 4, 32, sym=False) - W).abs().max().item())
        worst_gguf = max(worst_gguf, (gguf_quantize_numpy(W, "Q4_1") - W).abs().max().item())
    assert worst_rtn == 0.0 and worst_gguf == 0.0
    # ... while the neighbouring settings do lose something
    W = layers["model.layers.0.mlp.down_proj"].weight.detach()
    assert (rtn.fake_quantize(W, 4, 64, sym=False) - W).abs().max() > 0
    assert (rtn.fake_quantize(W, 4, 32, sym=True) - W).abs().max() > 0
