"""llama.cpp's K-quants (Q4_K, Q6_K): our bytes against llama.cpp's own quantizer, our
dequantizer against ``gguf.quants``, and the bits per weight from the block structs."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.fast


def _weights(seed, out=8, n=512, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * 0.05 + shift


def test_bits_per_weight_from_the_structs():
    from edgellm.quant.kquants import BLOCK_BYTES, KQUANT_BPW

    assert BLOCK_BYTES == {"Q4_K": 144, "Q6_K": 210}
    assert KQUANT_BPW == {"Q4_K": 4.5, "Q6_K": 6.5625}


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("seed,shift", [(0, 0.0), (1, 0.03), (2, -0.03)])
def test_bytes_equal_llamacpp(qtype, seed, shift):
    """Same bytes as ggml_quantize_chunk (llama.cpp's reference quantizer, no imatrix), also
    for blocks whose values are all of one sign (the min clamp at 0)."""
    from edgellm.quant.kquants import ggml_quantize, quantize_kquant

    W = _weights(seed, shift=shift)
    ours = quantize_kquant(W, qtype)
    ref = ggml_quantize(W, qtype)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def test_bytes_equal_llamacpp_with_zero_and_constant_blocks():
    from edgellm.quant.kquants import ggml_quantize, quantize_kquant

    W = _weights(3, out=4, n=512)
    W[0, :256] = 0.0  # an all-zero super-block
    W[1, :32] = 0.01  # a constant sub-block
    W[2, 256:272] = 0.0  # an all-zero Q6_K sub-block
    for qtype in ("Q4_K", "Q6_K"):
        assert np.array_equal(quantize_kquant(W, qtype), ggml_quantize(W, qtype)), qtype


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_dequantize_matches_gguf_bit_exact(qtype):
    from edgellm.quant.kquants import dequantize_kquant, gguf_dequantize, quantize_kquant

    W = _weights(4, out=6, n=768)
    raw = quantize_kquant(W, qtype)
    ours = dequantize_kquant(raw, qtype, tuple(W.shape))
    ref = gguf_dequantize(raw, qtype).reshape(W.shape)
    assert torch.equal(ours, ref)
    # the grids: Q6_K is finer than Q4_K
    err = {t: (dequantize_kquant(quantize_kquant(W, t), t, W.shape) - W).pow(2).mean()
           for t in ("Q4_K", "Q6_K")}
    assert err["Q6_K"] < err["Q4_K"] / 4


def test_codes_and_scales_are_where_the_struct_says():
    """Q4_K: d, dmin fp16 first, 12 bytes of 6-bit scales/mins, then 128 bytes of nibbles."""
    from edgellm.quant.kquants import quantize_kquant

    W = _weights(5, out=1, n=256)
    raw = quantize_kquant(W, "Q4_K")[0]
    d, dmin = raw[:4].view(np.float16).astype(np.float32)
    assert d > 0 and dmin > 0  # a centred block has a positive scale and a negative minimum
    raw6 = quantize_kquant(W, "Q6_K")[0]
    sc = raw6[192:208].view(np.int8)
    assert sc.min() == -128 or sc.max() == 127 or np.abs(sc).max() == 128  # largest on the grid


def test_rows_must_tile_into_super_blocks():
    from edgellm.quant.kquants import fake_quantize_kquant
    from edgellm.quant.qtensor import QuantError

    with pytest.raises(QuantError, match=r"576 = 2·256 \+ 64.*Q5_0"):
        fake_quantize_kquant(torch.zeros(4, 576), "Q4_K")
    with pytest.raises(QuantError, match="Q8_0"):
        fake_quantize_kquant(torch.zeros(4, 576), "Q6_K")
    with pytest.raises(QuantError, match="Q4_K, Q6_K"):
        fake_quantize_kquant(torch.zeros(4, 256), "Q5_K")
    w = torch.zeros(2, 256)
    w[0, 0] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        fake_quantize_kquant(w, "Q4_K")


def test_lesson_format_errors_orders_the_formats_on_gaussian_weights():
    """lessons.weight_quant.format_errors: more bits, less error; Q4_K below Q4_0 at 4.5 bpw."""
    from edgellm.lessons import weight_quant as wq

    rows = {r["type"]: r for r in wq.format_errors({"w": _weights(6, out=4, n=512)},
                                                   control_seed=None)}
    assert rows["Q4_K"]["bpw"] == rows["Q4_0"]["bpw"] == 4.5
    assert rows["Q4_K"]["rel_rms"] < rows["Q4_0"]["rel_rms"]
    assert rows["Q8_0"]["rel_rms"] < rows["Q6_K"]["rel_rms"] < rows["Q5_1"]["rel_rms"]
    assert "rel_rms_control" not in rows["Q4_K"]
