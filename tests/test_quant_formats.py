"""Number formats against the production libraries: torch float8 casts, bitsandbytes, gguf."""

import numpy as np
import pytest
import torch

from edgellm.quant import formats as F
from edgellm.quant.gguf_formats import (
    GGUF_TYPES,
    TYPE_BPW,
    ggml_type,
    gguf_quantize_numpy,
    quantize_gguf,
    to_gguf_bytes,
)
from edgellm.quant.qtensor import QuantError


def _awkward_values(n=50_000, seed=0):
    """Normal values over 18 decades, plus the edge cases of every minifloat."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-12, 6, n)
    edges = [0.0, -0.0, 448.0, 460.0, 464.0, 480.0, 500.0, 1e6, float("inf"), -float("inf"),
             float("nan"), 57344.0, 61439.0, 61440.0, 2.0 ** -9, 2.0 ** -10, 2.0 ** -17,
             3 * 2.0 ** -11, 0.5, 0.25, 1.0625, 1.1875]
    return torch.cat([x, torch.tensor(edges)])


@pytest.mark.parametrize("fmt,dtype", [(F.E4M3, torch.float8_e4m3fn), (F.E5M2, torch.float8_e5m2)])
def test_fp8_rounding_equals_torch_cast(fmt, dtype):
    x = _awkward_values()
    ours, ref = F.round_to_float(x, fmt), x.to(dtype).float()
    same = (ours == ref) | (ours.isnan() & ref.isnan())
    assert same.all(), f"{(~same).sum()} values differ, e.g. {x[~same][:3]}"
    finite = torch.isfinite(ref)
    assert torch.equal(F.float_codes(ours[finite], fmt), x[finite].to(dtype).view(torch.uint8))
    assert torch.equal(F.float_decode(F.float_codes(ours[finite], fmt), fmt), ours[finite])


def test_minifloat_grids():
    assert F.E4M3.max == 448 and F.E5M2.max == 57344 and F.E2M1.max == 6
    assert F.E2M1.levels().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert len(F.E4M3.levels()) == 253 and len(F.E5M2.levels()) == 247  # 256 minus NaN/Inf/-0
    x = torch.tensor([0.2, 0.25, 0.26, 0.75, 1.25, 2.5, 3.5, 5.0, 5.1, 7.0, -2.5])
    # ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert F.round_to_float(x, F.E2M1).tolist() == [0, 0, 0.5, 1, 1, 2, 4, 4, 6, 6, -2]


def test_nf4_table_derives_from_normal_quantiles():
    assert (F.nf4_levels_from_normal() - F.NF4_LEVELS).abs().max() < 1e-6
    assert F.NF4_LEVELS[7] == 0 and F.NF4_LEVELS[0] == -1 and F.NF4_LEVELS[-1] == 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_4bit_blockwise_equals_bitsandbytes(quant_type, blocksize):
    import bitsandbytes.functional as bnb

    W = torch.randn(96, 512, generator=torch.Generator().manual_seed(blocksize))
    W[0, :blocksize] = 0  # an all-zero block
    packed, state = bnb.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)
    ref = bnb.dequantize_4bit(packed, state)
    q, d = (F.quantize_nf4, F.dequantize_nf4) if quant_type == "nf4" else \
        (F.quantize_bnb_fp4, F.dequantize_bnb_fp4)
    codes, absmax = q(W, blocksize)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(F.pack_nibbles_bnb(codes), packed.reshape(-1))  # same codes, same bytes
    assert (d(codes, absmax, W.shape) - ref).abs().max() <= 1e-6


def test_bnb_fp4_is_not_plain_e2m1():
    import bitsandbytes.functional as bnb

    table = bnb.get_4bit_type("fp4", device="cpu")
    assert torch.equal(table, F.BNB_FP4_LEVELS)
    e2m1 = F.E2M1_LEVELS / 6
    assert not torch.equal(table.abs().sort().values, e2m1.abs().sort().values)


def test_int8_vectorwise_equals_bitsandbytes():
    import bitsandbytes.functional as bnb

    A = (torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 3).half()
    codes, stats = F.int8_vectorwise(A)
    ref_codes, ref_stats, _ = bnb.int8_vectorwise_quant(A.clone())
    assert torch.equal(codes, ref_codes) and torch.equal(stats, ref_stats)
    err = (F.int8_vectorwise_dequant(codes, stats) - A.float()).abs()
    assert (err <= stats.unsqueeze(1) / 127 / 2 + 1e-3).all()


def _gguf_test_matrix():
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(3)) * torch.rand(48, 1)
    W[0, :32] = 0  # zero block
    W[1, :32] = 1.5  # constant block
    W[2, :32] = torch.arange(32) / 16  # evenly spaced: rounding ties
    W[3, :32] = -torch.arange(32) / 8
    return W


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_block_formats_equal_gguf_quants(qtype):
    from gguf import quants

    W = _gguf_test_matrix()
    qt = quantize_gguf(W, qtype)
    assert torch.equal(qt.dequantize(), gguf_quantize_numpy(W, qtype))
    a = W.numpy()
    ref = a.astype(np.float16).view(np.uint8) if qtype == "F16" else \
        quants.quantize(a, ggml_type(qtype))
    ours = to_gguf_bytes(qt)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)  # byte for byte
    assert qt.bpw == TYPE_BPW[qtype] and qt.size_bytes == ref.nbytes


def test_mxfp4_shared_power_of_two_scale():
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    codes, exp = F.quantize_mxfp4(W)
    amax = W.reshape(-1, 32).abs().amax(1)
    assert torch.equal(exp, torch.floor(torch.log2(amax)).int() - 2)
    w_hat = F.dequantize_mxfp4(codes, exp, W.shape)
    # each element lands on the nearest point of E2M1 * 2**exp
    grid = F.E2M1.levels().unsqueeze(0) * torch.ldexp(torch.ones(8), exp).repeat_interleave(32, 0
                                                                                             ).unsqueeze(1)
    best = (grid - W.reshape(-1, 1)).abs().min(1).values
    assert torch.allclose((w_hat.reshape(-1) - W.reshape(-1)).abs(), best)


@pytest.mark.parametrize("fmt", F.FORMATS)
@pytest.mark.parametrize("group_size", [32, None, -1])
def test_quantize_format_granularities(fmt, group_size):
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    qt = F.quantize_format(W, fmt, bits=4, group_size=group_size, sym=False)
    W_hat = qt.dequantize()
    assert W_hat.shape == W.shape and torch.isfinite(W_hat).all()
    err = F.quantization_error(W, W_hat)["rel_err"]
    assert 0 < err < (0.08 if fmt.startswith("fp8") else 0.35)
    n_scales = {32: 16 * 4, None: 16, -1: 1}[group_size] if fmt != "mxfp4" else 16 * 4
    assert qt.scale.numel() == n_scales
    assert qt.size_bytes == 16 * 128 * qt.bits // 8 + n_scales * (
        qt.scale_bits + (0 if qt.sym else qt.scale_bits)) // 8


def test_finer_granularity_lowers_error():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.rand(64, 1) * 4
    errs = [F.quantization_error(W, F.quantize_format(W, "int", 4, g).dequantize())["rel_err"]
            for g in (-1, None, 64, 16)]
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1] * 1.5


def test_format_bad_input():
    W = torch.randn(8, 64)
    with pytest.raises(QuantError, match="unknown format"):
        F.quantize_format(W, "int3")
    with pytest.raises(QuantError, match="bits=9"):
        F.quantize_format(W, "int", bits=9)
    with pytest.raises(QuantError, match="does not divide"):
        F.quantize_format(W, "nf4", group_size=48)
    with pytest.raises(QuantError, match="GGUF type"):
        quantize_gguf(W, "Q3_K")
    with pytest.raises(QuantError, match="divisible by 32"):
        quantize_gguf(torch.randn(8, 48), "Q4_0")
    W[0, 0] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        F.quantize_format(W, "fp8_e4m3")
