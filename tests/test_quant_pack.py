"""Bit packing, size accounting and packed save/reload."""

import copy
import os

import pytest
import torch

from edgellm.quant import pack, size
from edgellm.quant.qtensor import QuantError
from edgellm.quant.rtn import apply_rtn, quantize
from edgellm.quant.save import WEIGHTS, load_quantized, save_quantized


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001])
def test_pack_round_trip_bit_exact(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(bits * n))
    packed = pack.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == pack.packed_nbytes(n, bits)
    assert torch.equal(pack.unpack_bits(packed, bits, n), codes.int())


def test_pack_layout_is_a_little_endian_bit_stream():
    assert pack.pack_bits(torch.tensor([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    assert pack.pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]
    # 3-bit: 8 codes -> 3 bytes, code 2 straddles bytes 0 and 1
    b = pack.pack_bits(torch.tensor([7, 0, 7, 0, 0, 0, 0, 0]), 3)
    assert b.tolist() == [0b11000111, 0b00000001, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_codes_round_trip(bits):
    qt = quantize(torch.randn(16, 64), bits, 32, sym=True)
    packed = pack.pack_codes(qt.codes, bits, signed=True)
    assert torch.equal(pack.unpack_codes(packed, bits, qt.numel, True).reshape(qt.shape),
                       qt.codes.int())


def test_pack_rejects_out_of_range():
    with pytest.raises(QuantError, match="offset signed codes"):
        pack.pack_bits(torch.tensor([-1, 2]), 4)
    with pytest.raises(QuantError, match="cannot hold"):
        pack.unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


def test_bpw_formulas():
    assert size.bpw(4, 64, 16, 16) == 4.5 and size.bpw(4, 32, 16, 16) == 5.0
    assert size.bpw(3, 64, 16, 0) == 3.25
    assert size.nf4_bpw(double_quant=False) == 4.5
    assert abs(size.nf4_bpw() - 4.127) < 1e-3  # QLoRA's figure


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_bitsandbytes(double_quant):
    import bitsandbytes.functional as bnb

    W = torch.randn(256, 1024)
    packed, st = bnb.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                   compress_statistics=double_quant)
    held = packed.numel() + st.absmax.numel() * st.absmax.element_size()
    if double_quant:
        held += st.state2.absmax.numel() * 4 + st.offset.numel() * 4
    assert size.nf4_bytes(W.numel(), 64, double_quant) == held


def test_model_size_and_save_reload_tiny(tiny, tmp_path):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    qts = apply_rtn(tiny, bits=3, group_size=32, sym=False).qtensors
    info = size.model_size(tiny, qts)
    assert info["bpw"] == 3 + 32 / 32 and not info["embedding_quantized"]
    assert info["size_bytes"] == (info["size_bytes_linears"] + info["size_bytes_embedding"]
                                  + info["size_bytes_other"])
    assert info["size_bytes_embedding"] == 256 * 64 * 4  # tied: counted once, fp32
    save_quantized(tiny, qts, tmp_path, meta={"method": "rtn"})
    model, tok, q2 = load_quantized(tmp_path)
    assert tok is None and set(q2) == set(qts)
    for name in qts:
        assert torch.equal(q2[name].codes.int(), qts[name].codes.int())
        assert torch.equal(q2[name].scale, qts[name].scale)
    assert torch.equal(model(ids).logits, tiny(ids).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    file_bytes = os.path.getsize(tmp_path / WEIGHTS)
    assert file_bytes >= info["size_bytes"]  # the rest is the safetensors JSON header


@pytest.mark.parametrize("fmt", ["nf4", "fp8_e4m3", "mxfp4"])
def test_save_reload_table_formats(tiny, tmp_path, fmt):
    from edgellm.models import linear_layers
    from edgellm.quant.formats import quantize_format

    qts = {}
    with torch.no_grad():
        for name, lin in linear_layers(tiny).items():
            qts[name] = quantize_format(lin.weight, fmt, group_size=32)
            lin.weight.copy_(qts[name].dequantize())
    save_quantized(tiny, qts, tmp_path)
    model, _, q2 = load_quantized(tmp_path)
    for name, lin in linear_layers(model).items():
        assert torch.equal(lin.weight, qts[name].dequantize())
        assert q2[name].size_bytes == qts[name].size_bytes


def test_load_quantized_needs_its_config(tmp_path):
    with pytest.raises(QuantError, match="quant_config.json"):
        load_quantized(tmp_path)


@pytest.mark.integration
def test_default_model_packed_file_and_identical_logits(default_model, tmp_path):
    from edgellm.data import get_tokens

    model, tok = default_model
    qm = copy.deepcopy(model)
    qts = apply_rtn(qm, bits=4, group_size=64).qtensors
    info = size.model_size(qm, qts)
    assert info["size_bytes_linears"] == 106_168_320 * 4.5 / 8
    save_quantized(qm, qts, tmp_path, tok, meta={"method": "rtn"})
    file_bytes = os.path.getsize(tmp_path / WEIGHTS)
    assert abs(file_bytes / info["size_bytes"] - 1) < 0.01
    ids = get_tokens("pydoc", tok, "test", 64).unsqueeze(0)
    model2, tok2, _ = load_quantized(tmp_path)
    with torch.inference_mode():
        assert torch.equal(model2(ids).logits, qm(ids).logits)
    assert tok2("def f(x): return 12")["input_ids"] == tok("def f(x): return 12")["input_ids"]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "MXFP4", "F16"])
def test_save_reload_gguf_types(tiny, tmp_path, qtype):
    from edgellm.quant.gguf_formats import apply_gguf

    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    qts = apply_gguf(tiny, qtype)
    save_quantized(tiny, qts, tmp_path)
    model, _, q2 = load_quantized(tmp_path)
    assert torch.equal(model(ids).logits, tiny(ids).logits)
    info = size.model_size(tiny, qts)
    assert info["size_bytes_linears"] == sum(q.size_bytes for q in q2.values())
