"""The production libraries (bitsandbytes, torchao) against our from-scratch formats."""

import copy
import json

import pytest
import torch

from edgellm.lessons.production import (
    block_layout,
    describe,
    format_rows,
    production_rows,
    record_key,
)
from edgellm.measure import check_speed_keys, memory_report
from edgellm.models import linear_layers
from edgellm.quant import formats as F
from edgellm.quant.backends.bitsandbytes import (
    apply_bnb,
    bnb_dequantize,
    check_bnb_args,
    cpu_layout_codes,
    int8_state,
    nf4_layout,
)
from edgellm.quant.backends.torchao import (
    apply_torchao,
    check_torchao_mode,
    import_torchao,
    int8_symmetric_per_row,
    torchao_dequantize,
)
from edgellm.quant.blockwise import (
    OUR_MODES,
    blockwise_dequantized,
    check_our_args,
    double_quantize_absmax,
    dynamic_code,
    int4_levels,
    lut_table,
    our_bpw,
)
from edgellm.quant.qtensor import QuantError


def _tiny():
    from edgellm import tiny_llama

    return tiny_llama(hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_linear4bit_equals_our_blockwise_layer_by_layer(mode, double_quant):
    model = _tiny()
    ref = {n: lin.weight.detach().clone() for n, lin in linear_layers(model).items()}
    mods = apply_bnb(model, mode, double_quant, blocksize=64)
    assert set(mods) == set(ref) and len(mods) == 14
    import bitsandbytes as bnb

    for name, mod in mods.items():
        assert isinstance(mod, bnb.nn.Linear4bit)
        lay = nf4_layout(mod)
        codes, absmax = F.quantize_blockwise_lut(ref[name], lut_table(mode), 64)
        assert torch.equal(F.pack_nibbles_bnb(codes), lay["packed"])  # same bytes
        if not double_quant:
            assert torch.equal(lay["absmax"], absmax)
            assert torch.equal(bnb_dequantize(mod), blockwise_dequantized(ref[name], mode))
        else:  # our codes with bnb's (double-quantized) absmax: the same weights
            ours = F.dequantize_blockwise_lut(codes, lay["absmax"], lut_table(mode),
                                              ref[name].shape)
            assert torch.equal(bnb_dequantize(mod), ours)
            # our double quantization: the same 8-bit absmax codes but for rare ties of
            # bitsandbytes' CPU search (it may pick the second-nearest code, one step away)
            q, _, _ = double_quantize_absmax(absmax, dynamic_code())
            assert (q.int() - lay["absmax_q"].int()).abs().max() <= 1
            assert (q != lay["absmax_q"]).float().mean() < 0.02
    # the tied embedding / lm_head is untouched and still tied
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_cpu_fast_path_layout_decodes_to_the_same_codes():
    """After a forward on an AVX512-BF16 CPU the weight is re-laid out with bf16 absmax."""
    model = _tiny()
    mods = apply_bnb(model, "nf4", True)
    before = {n: bnb_dequantize(m) for n, m in mods.items()}
    with torch.inference_mode():
        model(torch.randint(0, 256, (1, 16)))
    for name, mod in mods.items():
        qs = mod.weight.quant_state
        after = bnb_dequantize(mod)
        if getattr(qs, "packing_format_for_cpu", False):
            # only the absmax changed: rounded to bf16 (8 significant bits)
            assert (after - before[name]).abs().max() <= before[name].abs().max() * 2 ** -8
        else:
            assert torch.equal(after, before[name])


def test_cpu_layout_codes_roundtrip():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 32), generator=g, dtype=torch.uint8)
    # build the tiled layout by hand: tile of 32 rows, column pairs, low nibbles then high
    qw = codes.reshape(2, 32, 16, 2).transpose(1, 2).reshape(-1, 64)
    packed = ((qw[:, 32:] << 4) | qw[:, :32]).reshape(64, 16)
    assert torch.equal(cpu_layout_codes(packed), codes)


def test_bnb_int8_equals_our_vectorwise():
    model = _tiny()
    ref = {n: lin.weight.detach().clone() for n, lin in linear_layers(model).items()}
    mods = apply_bnb(model, "int8", threshold=6.0)
    for name, mod in mods.items():
        CB, SCB = int8_state(mod)
        codes, stats = F.int8_vectorwise(ref[name].half())
        assert torch.equal(CB, codes) and torch.equal(SCB, stats)
        assert torch.equal(bnb_dequantize(mod), blockwise_dequantized(ref[name], "int8"))
    x = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        out = model(x).logits
    assert torch.isfinite(out).all()


def test_double_quantize_absmax_equals_bitsandbytes():
    import bitsandbytes.functional as BF

    W = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    _, st = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, absmax = F.quantize_nf4(W, 64)
    code = dynamic_code()
    codes, absmax2, offset = double_quantize_absmax(absmax, code)
    assert torch.equal(absmax2, st.state2.absmax) and torch.equal(offset, st.offset)
    # ours is the nearest code; bitsandbytes' CPU search sometimes stops one code away
    differ = codes != st.absmax
    assert differ.float().mean() < 0.02 and (codes.int() - st.absmax.int()).abs().max() <= 1
    c = (absmax - offset) / absmax2.repeat_interleave(256)[: len(absmax)]
    d_ours = (code[codes.long()] - c).abs()
    d_bnb = (code[st.absmax.long()] - c).abs()
    assert (d_ours <= d_bnb).all() and (d_ours[differ] < d_bnb[differ]).all()


def test_memory_bytes_counts_packed_storage_and_quant_states():
    from edgellm.quant.size import nf4_bytes

    model = _tiny()
    base = memory_report(model)
    n_lin = sum(lin.weight.numel() for lin in linear_layers(model).values())
    assert base["memory_bytes_linears"] == 4 * n_lin
    tied = model.model.embed_tokens.weight
    assert base["memory_bytes_embedding"] == tied.numel() * 4  # counted once
    for dq in (False, True):
        m = copy.deepcopy(model)
        apply_bnb(m, "nf4", dq)
        rep = memory_report(m)
        # codes + absmax (+ nested absmax, offset) + the 16-entry code table (+ 256-entry map)
        want = sum(nf4_bytes(lin.weight.numel(), 64, dq) + 16 * 4 + (256 * 4 if dq else 0)
                   for lin in linear_layers(model).values())
        assert rep["memory_bytes_linears"] == want
        assert rep["memory_bytes_embedding"] == base["memory_bytes_embedding"]
    m = copy.deepcopy(model)
    apply_bnb(m, "int8")
    rows = sum(lin.out_features for lin in linear_layers(model).values())
    assert memory_report(m)["memory_bytes_linears"] == n_lin + 4 * rows


def test_our_formats_and_the_qlora_levels():
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    err = {m: F.quantization_error(W, blockwise_dequantized(W, m))["rel_err"]
           for m in OUR_MODES}
    # normal weights: NF4 is the best 4-bit data type, symmetric absmax Int4 the worst
    assert err["nf4"] < err["fp4_e2m1"] < err["int4"]
    assert err["int8"] < err["nf4"]
    assert len(int4_levels()) == 15 and int4_levels()[7] == 0
    assert our_bpw("nf4") == 4.5 and our_bpw("int4_asym") == 4.5
    assert abs(our_bpw("nf4", double_quant=True) - 4.127) < 1e-3


def test_torchao_int8_on_tiny():
    import_torchao()
    model = _tiny()
    ref = {n: lin.weight.detach().clone() for n, lin in linear_layers(model).items()}
    x = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        y0 = model(x).logits
    m = copy.deepcopy(model)
    apply_torchao(m, "int8_weight_only")
    for name, lin in linear_layers(m).items():
        assert torch.equal(torchao_dequantize(lin), int8_symmetric_per_row(ref[name])), name
    assert type(m.lm_head.weight) is torch.nn.Parameter  # lm_head left alone
    rep = memory_report(m)
    n_lin = sum(w.numel() for w in ref.values())
    rows = sum(w.shape[0] for w in ref.values())
    assert rep["memory_bytes_linears"] == n_lin + rows * (4 + 1)  # int8 + fp32 scale + int8 zp
    with torch.inference_mode():
        y = m(x).logits
    assert (y - y0).abs().max() < 0.05
    m = copy.deepcopy(model)
    apply_torchao(m, "int8_dynamic")
    with torch.inference_mode():
        assert (m(x).logits - y0).abs().max() < 0.1


def test_bad_arguments():
    with pytest.raises(QuantError, match="unknown bitsandbytes mode 'int4'.*--impl edgellm"):
        check_bnb_args("int4")
    with pytest.raises(QuantError, match="drop --double-quant"):
        check_bnb_args("int8", double_quant=True)
    with pytest.raises(QuantError, match="blocksize=48 is not supported"):
        check_bnb_args("nf4", blocksize=48)
    with pytest.raises(QuantError, match="threshold=-1"):
        check_bnb_args("int8", threshold=-1)
    with pytest.raises(QuantError, match="unknown torchao mode"):
        check_torchao_mode("int4")
    with pytest.raises(QuantError, match="not 'int4_asym'"):
        check_our_args("int4_asym", double_quant=True)
    with pytest.raises(QuantError, match="not a whole number of blocks of 4096"):
        from edgellm import tiny_llama

        apply_bnb(tiny_llama(), "nf4", blocksize=4096)  # k_proj: 32 x 64 weights


def test_widget_functions():
    recs = [{"library": "bnb", "mode": "nf4", "double_quant": True, "cpu_kernel": True,
             "blocksize": 64, "ppl": 12.0, "ppl_base": 10.0, "delta_nll": 0.18,
             "delta_nll_stderr": 0.01, "kl_mean": 0.2, "top1_agreement": 0.8, "n_tokens": 100,
             "memory_bytes": 170e6, "memory_bytes_runtime": 168e6, "memory_bytes_base": 538e6,
             "prefill_tokens_per_s": 100.0, "prefill_tokens_per_s_base": 200.0,
             "seconds_load": 5.0, "decode_tokens_per_s": 24.0, "decode_tokens_per_s_base": 16.0,
             "speed_protocol": {"prefill_tokens_per_s": {"name": "prefill"},
                                "decode_tokens_per_s": {"name": "decode"}}},
            {"library": "edgellm", "mode": "int4", "double_quant": False, "blocksize": 64,
             "ppl": 14.0, "ppl_base": 10.0, "delta_nll": 0.3, "delta_nll_stderr": 0.02,
             "kl_mean": 0.3, "top1_agreement": 0.7, "n_tokens": 100, "memory_bytes": 538e6,
             "size_bytes": 170e6, "memory_bytes_base": 538e6}]
    assert [record_key(r) for r in recs] == ["bnb nf4+dq", "edgellm int4"]
    rows = production_rows(recs)
    assert rows[0]["speed_vs_fp32"] == 0.5 and rows[1]["speed_vs_fp32"] is None
    assert rows[0]["decode_vs_fp32"] == 1.5 and rows[1]["decode_vs_fp32"] is None
    assert "bnb nf4+dq" in format_rows(rows)
    text = describe(recs, "bnb nf4+dq")
    assert "0.50 x fp32" in text and "4.127 bits/weight" in text
    assert "protocol prefill" in text and "protocol decode" in text
    assert "decode  : 24.0 tokens/s = 1.50 x fp32" in text
    assert "fp32 speed" in describe(recs, "edgellm int4")
    assert "no recorded run" in describe(recs, "bnb fp4")
    lay = block_layout("nf4")
    assert lay["code_bytes"] == 32 and lay["scale_bytes"] == 4 and lay["bpw"] == 4.5
    assert block_layout("int8", in_features=576)["bpw"] == pytest.approx(8 + 32 / 576)


# --------------------------------------------------------------------------------------------
# the command line


def _cli(capsys, *argv):
    from edgellm.cli import main

    code = main(list(argv))
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv,message", [
    (["bnb", "--mode", "int8", "--double-quant"], "drop --double-quant"),
    (["bnb", "--mode", "int4"], "--impl edgellm"),
    (["bnb", "--mode", "nf4", "--blocksize", "48"], "blocksize=48 is not supported"),
    (["bnb", "--mode", "int8", "--threshold", "-2"], "threshold=-2"),
    (["bnb", "--mode", "int8", "--no-cpu-kernel"], "4-bit modes"),
    (["bnb", "--impl", "edgellm", "--mode", "int4_asym", "--double-quant"], "not 'int4_asym'"),
    (["torchao", "--decode-tokens", "-1"], "0 to skip the decode speed"),
])
def test_cli_bad_combinations_fail_before_loading(capsys, argv, message):
    code, out = _cli(capsys, *argv, "--json")
    assert code == 2 and message in out.err and "Traceback" not in out.err


def test_cli_unknown_mode_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _cli(capsys, "bnb", "--mode", "q4_0")
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(capsys, "torchao", "--mode", "int4_weight_only")


@pytest.mark.integration
def test_cli_bnb_nf4_record(capsys):
    code, out = _cli(capsys, "bnb", "--mode", "nf4", "--double-quant", "--eval", "--ctx", "64",
                     "--max-tokens", "128", "--decode-tokens", "2", "--json")
    assert code == 0
    rec = json.loads(out.out)
    for key in ("mode", "double_quant", "ppl", "ppl_base", "kl_mean", "top1_agreement",
                "memory_bytes", "memory_bytes_base", "prefill_tokens_per_s",
                "prefill_tokens_per_s_base", "decode_tokens_per_s", "decode_tokens_per_s_base",
                "eval_tokens_per_s", "seconds_load", "n_tokens", "protocol", "ctx", "model", "data"):
        assert key in rec, key
    check_speed_keys(rec)
    assert rec["speed_protocol"]["prefill_tokens_per_s_base"]["name"] == "prefill"
    assert rec["speed_protocol"]["decode_tokens_per_s"]["new_tokens"] == 2
    assert rec["decode_tokens_per_s"] > 0 and rec["decode_new_tokens"] == 2
    assert rec["mode"] == "nf4" and rec["double_quant"] is True and rec["ctx"] == 64
    assert 0 < rec["kl_mean"] < 1 and rec["ppl"] > 0 and rec["n_tokens"] == 126
    # 4.127 bits for the linears + the fp32 embedding: about a third of the fp32 bytes
    assert 0.25 < rec["memory_bytes"] / rec["memory_bytes_base"] < 0.4
    assert rec["memory_bytes_embedding"] == 49152 * 576 * 4


@pytest.mark.integration
def test_real_model_nf4_layers_equal_ours(default_model):
    model, _ = default_model
    names = ["model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"]
    lins = {n: copy.deepcopy(model.get_submodule(n)) for n in names}
    holder = torch.nn.Module()
    for i, lin in enumerate(lins.values()):
        holder.add_module(f"l{i}", lin)
    ref = {f"l{i}": lin.weight.detach().clone() for i, lin in enumerate(lins.values())}
    mods = apply_bnb(holder, "nf4", False, layers={f"l{i}": lin for i, lin in
                                                     enumerate(lins.values())})
    for name, mod in mods.items():
        assert torch.equal(bnb_dequantize(mod), blockwise_dequantized(ref[name], "nf4"))


def test_recorded_runs_skips_a_sweep_not_recorded_yet(monkeypatch, capsys):
    import edgellm.results
    from edgellm.lessons.production import recorded_runs

    def load_records(name):
        if name == "05_torchao":
            raise FileNotFoundError("results/05_torchao.json: not recorded yet")
        return [{"library": "bnb", "mode": "nf4"}]

    monkeypatch.setattr(edgellm.results, "load_records", load_records)
    assert recorded_runs() == [{"library": "bnb", "mode": "nf4"}]
    assert "05_torchao" in capsys.readouterr().out
    assert recorded_runs(verbose=False) == [{"library": "bnb", "mode": "nf4"}]
    assert capsys.readouterr().out == ""
