"""``edgellm quantize`` from the command line (small token counts: the point is the plumbing)."""

import json

import pytest

from edgellm.cli import main


def _run(capsys, *argv):
    code = main(["quantize", *argv])
    out = capsys.readouterr()
    return code, out


def test_parser_group_size_channel():
    from edgellm.cli import build_parser

    args = build_parser().parse_args(["quantize", "--group-size", "channel", "--sym"])
    assert args.group_size is None and args.sym and args.method == "rtn"
    assert build_parser().parse_args(["quantize", "--group-size", "0"]).group_size is None
    assert build_parser().parse_args(["quantize"]).group_size == 64
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--group-size", "big"])


@pytest.mark.integration
def test_bad_group_size_is_a_clear_error(capsys):
    code, out = _run(capsys, "--method", "rtn", "--group-size", "100", "--json")
    assert code == 2
    assert "group_size=100 does not divide in_features=576" in out.err and "192" in out.err


@pytest.mark.integration
def test_bad_bits_is_a_clear_error(capsys):
    code, out = _run(capsys, "--bits", "9", "--json")
    assert code == 2 and "bits=9 is not supported" in out.err


@pytest.mark.integration
def test_rtn_q4_1_setting_is_lossless_with_eval(capsys, tmp_path):
    code, out = _run(capsys, "--method", "rtn", "--bits", "4", "--group-size", "32", "--eval",
                     "--ctx", "64", "--max-tokens", "128", "--out", str(tmp_path / "q"), "--json")
    assert code == 0
    rec = json.loads(out.out)
    for key in ("method", "bits", "group_size", "bpw", "size_bytes", "ppl", "ppl_base", "kl_mean",
                "seconds_quantize", "delta_nll", "delta_nll_stderr", "top1_agreement"):
        assert key in rec, key
    assert rec["bpw"] == 5.0 and rec["group_size"] == 32 and rec["sym"] is False
    assert rec["lossless"] and rec["max_abs_weight_change"] == 0.0
    assert rec["kl_mean"] == 0.0 and rec["ppl"] == rec["ppl_base"] and rec["delta_nll"] == 0.0
    assert abs(rec["file_bytes"] / rec["size_bytes"] - 1) < 0.01
    assert rec["embedding_quantized"] is False and rec["n_layers"] == 210


@pytest.mark.integration
def test_gguf_q4_0_loses_something(capsys):
    code, out = _run(capsys, "--method", "gguf", "--type", "Q4_0", "--eval", "--ctx", "64",
                     "--max-tokens", "128", "--json")
    assert code == 0
    rec = json.loads(out.out)
    assert rec["type"] == "Q4_0" and rec["bpw"] == 4.5 and rec["bits"] == 4
    assert rec["kl_mean"] > 0 and rec["ppl"] != rec["ppl_base"] and not rec["lossless"]
    assert rec["max_abs_weight_change"] > 0


# --------------------------------------------------------------------------------------------
# activations, SmoothQuant, LLM.int8, KV cache (lesson 04)


def test_parser_activation_flags():
    from edgellm.cli import build_parser

    args = build_parser().parse_args(["quantize"])
    assert args.a_bits is None and args.a_format == "int" and not args.a_static
    assert args.alpha == 0.5 and args.kv_bits is None and args.threshold == 6.0
    args = build_parser().parse_args(
        ["quantize", "--method", "smoothquant", "--a-bits", "8", "--a-format", "fp8",
         "--a-static", "--alpha", "0.75", "--kv-bits", "4", "--threshold", "inf"])
    assert (args.method, args.a_bits, args.a_format, args.a_static, args.alpha, args.kv_bits,
            args.threshold) == ("smoothquant", 8, "fp8", True, 0.75, 4, None)
    for m in ("llm_int8", "rotate", "lwc", "rtn", "gptq", "awq", "imatrix", "gguf"):
        assert build_parser().parse_args(["quantize", "--method", m]).method == m
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--a-format", "fp4"])


@pytest.mark.parametrize("argv, message", [
    (["--method", "smoothquant", "--alpha", "1.5"], "alpha=1.5 is outside [0, 1]"),
    (["--method", "smoothquant", "--alpha", "-0.5"], "alpha=-0.5 is outside [0, 1]"),
    (["--a-bits", "4", "--a-format", "fp8"], "fp8 activations are 8-bit"),
    (["--a-bits", "9"], "a_bits=9 is not supported"),
    (["--a-bits", "1"], "a_bits=1 is not supported"),
    (["--a-static"], "give --a-bits too"),
    (["--method", "llm_int8", "--a-bits", "8"], "llm_int8 quantizes its activations itself"),
    (["--method", "llm_int8", "--threshold", "-1"], "must be a positive magnitude"),
    (["--kv-bits", "12"], "kv_bits=12 is not supported"),
])
def test_bad_activation_options_are_clear_errors(capsys, argv, message):
    # checked before the model is loaded: exit code 2 with the message
    code, out = _run(capsys, *argv, "--json")
    assert code == 2 and message in out.err


def test_calibration_missing_for_static_and_smoothquant(tiny):
    from edgellm.quant.actquant import apply_act_quant
    from edgellm.quant.qtensor import QuantError
    from edgellm.quant.smoothquant import apply_smoothquant

    with pytest.raises(QuantError, match="calibration"):
        apply_act_quant(tiny, a_bits=8, static=True, calib=None)
    with pytest.raises(QuantError, match="calibration"):
        apply_smoothquant(tiny, None)


def test_quantize_model_w8a8_and_llm_int8_on_tiny(tiny, monkeypatch):
    import torch

    import edgellm.data
    from edgellm.quant.actquant import ActQuantLinear
    from edgellm.quant.apply import quantize_model
    from edgellm.quant.llm_int8 import Int8Linear

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(edgellm.data, "get_calibration", lambda *a, **k: ids)
    res = quantize_model(tiny, method="smoothquant", bits=8, group_size=None, sym=True,
                         a_bits=8, alpha=0.25)
    qts, info = res.qtensors, res.info
    assert info["alpha"] == 0.25 and info["a_bits"] == 8 and info["granularity"] == "token"
    assert len(qts) == 14 and all(q.bits == 8 for q in qts.values())
    assert isinstance(tiny.model.layers[0].mlp.down_proj, ActQuantLinear)
    from edgellm import tiny_llama

    m = tiny_llama()
    res = quantize_model(m, method="llm_int8", threshold=None)
    qts, info = res.qtensors, res.info
    assert info["threshold"] is None and info["bits"] == 8 and info["a_bits"] == 8
    assert isinstance(m.model.layers[0].self_attn.q_proj, Int8Linear)
    m = tiny_llama()
    info = quantize_model(m, method="rtn", bits=4, a_bits=8, a_format="fp8", a_static=True).info
    assert info["granularity"] == "tensor" and info["a_format"] == "fp8" and info["alpha"] is None


@pytest.mark.integration
def test_smoothquant_w8a8_cli_record(capsys):
    code, out = _run(capsys, "--method", "smoothquant", "--alpha", "0.5", "--bits", "8",
                     "--group-size", "0", "--sym", "--a-bits", "8", "--n-samples", "1",
                     "--seq-len", "64", "--eval", "--ctx", "64", "--max-tokens", "128", "--json")
    assert code == 0
    rec = json.loads(out.out)
    for key in ("method", "bits", "a_bits", "a_format", "alpha", "kv_bits", "group_size", "bpw",
                "size_bytes", "ppl", "ppl_base", "kl_mean", "eval_tokens_per_s",
                "seconds_quantize"):
        assert key in rec, key
    assert rec["alpha"] == 0.5 and rec["a_bits"] == 8 and rec["a_format"] == "int"
    assert rec["kv_bits"] is None and rec["group_size"] is None
    # size_bytes is the packed size; no memory_bytes (the weights are fake-quantized fp32)
    assert "memory_bytes" not in rec and rec["eval_tokens_per_s"] > 0
    assert rec["speed_protocol"]["eval_tokens_per_s"]["name"] == "eval-loop"
    assert rec["kl_mean"] > 0 and rec["bpw"] == pytest.approx(8.0234375)  # fp16 scale per row


def test_save_clips_needs_lwc(capsys):
    from edgellm.cli import main

    code = main(["quantize", "--method", "rtn", "--save-clips", "x.safetensors", "--json"])
    assert code == 2 and "--method lwc" in capsys.readouterr().err


@pytest.mark.integration  # reads the cached model's config.json (no weights are loaded)
def test_lorc_rank_above_a_layer_fails_before_the_model_load(monkeypatch, capsys):
    from edgellm import models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the bad LoRC rank was rejected")

    monkeypatch.setattr(models, "load_model", no_load)
    code, out = _run(capsys, "--lorc-rank", "192")
    assert code == 2
    assert "k_proj (192×576)" in out.err and "below 192" in out.err, out.err


@pytest.mark.integration
def test_lorc_rank_record_counts_the_factors(capsys):
    code, out = _run(capsys, "--method", "rtn", "--bits", "3", "--group-size", "64",
                     "--lorc-rank", "4", "--eval", "--ctx", "64", "--max-tokens", "128", "--json")
    assert code == 0, out.err
    rec = json.loads(out.out)
    assert rec["rank"] == 4 and rec["bpw_quant"] == 3.5
    extra = rec["lorc"]["lorc_params"]  # rank · (out + in) summed over the 210 linears
    assert extra == 4 * 30 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert rec["bpw"] == pytest.approx(3.5 + 16 * extra / rec["n_quantized"])
    assert rec["size_bytes"] - rec["size_bytes_linears"] == rec["size_bytes_embedding"] + rec[
        "size_bytes_other"]
    assert rec["n_params"] == 134515008 + extra
    assert rec["lorc"]["error_after"] < rec["lorc"]["error_before"] and not rec["lossless"]
