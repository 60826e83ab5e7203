"""llama.cpp's own types (llama-quantize, llama-imatrix, llama-perplexity --kl-divergence) and our
quantizers written into llama.cpp's blocks by ``edgellm quantize --gguf``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.deploy.export_quant import type_counts
from edgellm.deploy.gguf_blocks import check_block_settings
from edgellm.deploy.llamacpp import LlamaCppError
from edgellm.deploy.llamacpp_quant import (
    NEEDS_IMATRIX,
    check_quant_type,
    parse_kl_log,
)

FIXTURES = Path(__file__).parent / "fixtures"


def test_parse_kl_log_reads_every_statistic_with_its_error():
    s = parse_kl_log((FIXTURES / "llama_perplexity_kl.log").read_text())
    assert s["ppl"] == pytest.approx(7.235954) and s["ppl_se"] == pytest.approx(0.799569)
    assert s["ppl_base"] == pytest.approx(6.689318)
    assert s["delta_nll"] == pytest.approx(0.078550) and s["delta_nll_se"] == pytest.approx(0.016220)
    assert s["kl_mean"] == pytest.approx(0.053240) and s["kl_mean_se"] == pytest.approx(0.002693)
    assert s["top1_agreement"] == pytest.approx(0.90) and s["top1_agreement_se"] == pytest.approx(
        0.0133)


def test_parse_kl_log_refuses_a_log_without_the_statistics():
    with pytest.raises(LlamaCppError, match="delta_nll|ppl"):
        parse_kl_log("main: error: failed to load model\n")


def test_type_names_and_the_importance_matrix_rule():
    assert check_quant_type("q4_k_m") == "Q4_K_M"
    for t in NEEDS_IMATRIX[:2]:
        with pytest.raises(LlamaCppError, match="importance matrix"):
            check_quant_type(t)
        assert check_quant_type(t, imatrix="x.gguf") == t
    with pytest.raises(LlamaCppError, match="not one of"):
        check_quant_type("Q9_X")


def test_export_check_type_splits_converter_and_llama_quantize():
    from edgellm.deploy.export import check_type

    assert check_type("f16") == "F16" and check_type("Q8_0") == "Q8_0"
    assert check_type("Q4_K_M") == "Q4_K_M"
    with pytest.raises(LlamaCppError, match="add --merge"):
        check_type("Q4_K_M", adapter=True)
    with pytest.raises(LlamaCppError, match="importance matrix"):
        check_type("IQ2_XXS")


def test_type_counts_counts_the_linears_only():
    types = {"token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32",
             "blk.0.attn_q.weight": "Q5_0", "blk.0.ffn_down.weight": "Q4_K",
             "blk.1.attn_q.weight": "Q5_0", "output_norm.weight": "F32"}
    assert type_counts(types) == {"Q4_K": 1, "Q5_0": 2}


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=64, sym=True),
                                dict(bits=3, group_size=32, sym=True),
                                dict(bits=8, group_size=32, sym=False),
                                dict(bits=4, group_size=None, sym=True)])
def test_block_settings_outside_llama_cpps_blocks_are_refused(kw):
    with pytest.raises(LlamaCppError, match="blocks of 32"):
        check_block_settings("rtn", **kw)


def test_block_settings_refuse_activation_quantizers():
    check_block_settings("gptq", bits=4, group_size=32, sym=False)
    with pytest.raises(LlamaCppError, match="weights only"):
        check_block_settings("rtn", bits=4, group_size=32, sym=True, a_bits=8)
    with pytest.raises(LlamaCppError, match="not a plain weight quantizer"):
        check_block_settings("smoothquant", bits=4, group_size=32, sym=True)


# ---------------------------------------------------------------------------------------------
# with llama.cpp's tools (built once from the sdist, ~5 min on 2 cores) and the default model

@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    from edgellm.deploy.export import model_to_gguf
    from edgellm.models import load_model

    model, tok = load_model()
    return model_to_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "f32.gguf")


@pytest.mark.integration
@pytest.mark.tools
def test_llama_quantize_falls_back_on_576_wide_rows_and_keeps_k_quants_on_ffn_down(f32_gguf,
                                                                                tmp_path):
    """Q4_K_M on SmolLM2: the 256-wide super-blocks fit only ffn_down (1536 wide); the other
    linears fall back (read from the file, not from a list)."""
    from edgellm.deploy.export import gguf_bpw, tensor_types
    from edgellm.deploy.llamacpp_quant import quantize

    out = quantize(f32_gguf, tmp_path / "q4km.gguf", "Q4_K_M", token_embedding_type="Q8_0")
    types = tensor_types(out)
    k_quants = {n for n, t in types.items() if t.endswith("_K")}
    assert k_quants and all(".ffn_down." in n for n in k_quants), sorted(k_quants)[:5]
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] in ("Q5_0", "Q5_1", "Q4_0", "Q4_1")
    assert 4.5 < gguf_bpw(out) < 6.0
    assert not list(tmp_path.glob(".*part*"))  # nothing half-written left


@pytest.mark.integration
@pytest.mark.tools
def test_imatrix_then_iq2_and_llama_perplexity_kl_agrees_with_ours(f32_gguf, tmp_path):
    """An IQ2_XXS file needs the importance matrix; llama-perplexity's KL against the F32 file
    and ours (the file in llama-cpp-python against the model in PyTorch) agree on the same
    windows."""
    from edgellm.data import load_text
    from edgellm.deploy.export_quant import evaluate_gguf
    from edgellm.deploy.llamacpp_quant import compute_imatrix, kl_base, kl_divergence, quantize
    from edgellm.models import load_model

    train = tmp_path / "train.txt"
    train.write_text(load_text("pydoc", "train"))
    imat = compute_imatrix(f32_gguf, train, tmp_path / "imatrix.gguf", chunks=4)
    q = quantize(f32_gguf, tmp_path / "iq2.gguf", "IQ2_XXS", imatrix=imat)
    test = tmp_path / "test.txt"
    test.write_text(load_text("pydoc", "test"))
    base = kl_base(f32_gguf, test, tmp_path / "base.kld", chunks=4)
    theirs = kl_divergence(q, base)
    base.unlink()
    model, tok = load_model()
    ours = evaluate_gguf(q, model, tok, protocol="llamacpp", ctx=512, chunks=4)
    assert theirs["delta_nll"] > 0.2  # 2 bits on 135M parameters is far from lossless
    assert ours["n_tokens"] == 4 * 255
    assert ours["delta_nll"] == pytest.approx(theirs["delta_nll"], rel=0.05, abs=0.01)
    assert ours["kl_mean"] == pytest.approx(theirs["kl_mean"], rel=0.05, abs=0.01)


@pytest.mark.integration
@pytest.mark.tools
def test_cli_export_q4_0_with_eval_is_a_record_with_the_public_keys(tmp_path):
    from edgellm.cli import run_command

    out = tmp_path / "q4_0.gguf"
    rec = run_command(f"edgellm export --type Q4_0 --token-embedding-type Q8_0 --out {out} "
                      "--eval --max-tokens 1024 --json")
    for key in ("type", "size_bytes", "bpw", "tensor_types", "ppl", "ppl_base", "delta_nll",
                "kl_mean", "top1_agreement", "n_tokens", "protocol", "model", "data"):
        assert key in rec, key
    assert rec["type"] == "Q4_0" and rec["type_counts"] == {"Q4_0": 210}
    assert rec["bpw"] == pytest.approx(4.5, abs=0.01)  # 18 bytes per 32 weights
    assert rec["runtime"] == "llamacpp" and rec["delta_nll"] > 0
    assert json.loads(json.dumps(rec)) == rec


@pytest.mark.integration
@pytest.mark.llamacpp
def test_quantize_gguf_writes_our_codes_and_llama_cpp_runs_them_like_the_simulation(tmp_path):
    """RTN 4-bit g32 symmetric → Q4_0 blocks; llama.cpp on the file against our simulation of the
    same codes differs only by its kernels' rounding (activations to 8 bits)."""
    from edgellm.cli import run_command

    out = tmp_path / "rtn.gguf"
    rec = run_command(f"edgellm quantize --method rtn --bits 4 --group-size 32 --sym --gguf {out} "
                      "--eval --max-tokens 1024 --json")
    g = rec["gguf"]
    assert g["type"] == "Q4_0" and g["type_counts"] == {"Q4_0": 210} and g["blocks_checked"] > 0
    assert g["n_tokens"] == rec["n_tokens"]
    assert abs(g["delta_nll_vs_simulated"]) < 0.01 and g["top1_agreement_vs_simulated"] > 0.95
    assert g["ppl_simulated"] == pytest.approx(rec["ppl"], rel=1e-6)
    assert "out" not in rec and out.is_file()


@pytest.mark.integration
@pytest.mark.tools
def test_lab11_lean_file_task_fails_the_f32_file_and_q8_0_itself(f32_gguf, tmp_path):
    """The grader can fail: the F32 file is not quantized, and Q8_0 reads as much as Q8_0."""
    from edgellm.course.labchecks_deploy import lean_file_task
    from edgellm.deploy.llamacpp_quant import quantize
    from edgellm.models import load_model

    model, tok = load_model()
    v = lean_file_task(f32_gguf, f32_gguf, model, tok, max_tokens=512, gen_tokens=16,
                       rounds=1)
    assert not v.constraints_ok and "not quantized" in v.violations[0]
    q8 = quantize(f32_gguf, tmp_path / "q8.gguf", "Q8_0", token_embedding_type="Q8_0")
    v = lean_file_task(q8, f32_gguf, model, tok, max_tokens=512, gen_tokens=16)
    assert v.constraints_ok and not v.target_met, v.summary()
    assert v.value == pytest.approx(1.0) and v.details["decode_tokens_per_s"] > 0
