"""GGUF export with llama.cpp's converters, and a LoRA adapter run by llama.cpp: the same greedy
tokens as Hugging Face + peft on the same prompt ids, as a run-time GGUF LoRA and merged."""

import json

import numpy as np
import pytest
import torch

from edgellm.deploy.adapters import first_difference


@pytest.mark.fast
def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 7]) == 2 and first_difference([], [4]) == 0


@pytest.mark.fast
def test_until_eos():
    from edgellm.lora.chat import until_eos

    assert until_eos([5, 6, 2, 7], eos=2) == [5, 6] and until_eos([5, 0, 0], 2, pad=0) == [5]
    assert until_eos([5, 6], eos=2) == [5, 6]


@pytest.mark.integration
@pytest.mark.llamacpp
def test_export_q8_0_reads_back_its_tensor_types(tmp_path, capsys):
    from edgellm.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "--type", "Q8_0", "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    types = rec["tensor_types"]
    linears = [n for n in types if n.startswith("blk.") and not n.endswith("norm.weight")]
    assert len(linears) == rec["n_linear"] == 210
    assert {types[n] for n in linears} == {"Q8_0"}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert 8.0 < rec["bpw"] < 8.6 and rec["size_bytes"] == out.stat().st_size
    assert not list(tmp_path.glob(".*part"))                 # nothing half-written is left


@pytest.mark.integration
@pytest.mark.llamacpp
def test_an_adapter_in_llamacpp_generates_what_hf_and_peft_generate(tmp_path):
    """A rank-4 adapter with large random B changes most answers, so an adapter that llama.cpp
    ignored (or applied with the wrong scale) would not agree with HF + peft."""
    from edgellm.deploy.adapters import eval_task_llamacpp
    from edgellm.lora.apply import apply_lora, peft_config, save_adapter
    from edgellm.models import load_model

    torch.set_num_threads(1)
    m, _ = load_model()
    layers = apply_lora(m, rank=4, alpha=8, targets="attn")
    torch.manual_seed(0)
    for lin in layers.values():
        lin.lora_B.data.normal_(0, 0.05)
    folder = save_adapter(m, tmp_path / "ad",
                          config=peft_config(rank=4, alpha=8, targets="attn",
                                             base=m.config._name_or_path))
    n = 8
    # the adapter matters: llama.cpp without it answers differently on most prompts
    from edgellm.deploy.export import adapter_to_gguf, model_to_gguf
    from edgellm.deploy.llamacpp import llamacpp_greedy
    from edgellm.lora.chat import TRAIN_STYLE, Prompting, prompt_ids
    from edgellm.lora.task import load_task

    base, tok = load_model()
    task = load_task("funccall")
    prompting = Prompting.from_style(TRAIN_STYLE, task.split("train"))
    rows = [prompt_ids(tok, prompting, it.prompt) for it in task.subset("test", n)]
    gguf = model_to_gguf(base, tok, tmp_path / "base.gguf")
    lora_gguf = adapter_to_gguf(folder, base, tok, tmp_path / "ad.gguf")
    plain = llamacpp_greedy(gguf, rows, eos=tok.eos_token_id, max_new_tokens=8)
    adapted = llamacpp_greedy(gguf, rows, eos=tok.eos_token_id, max_new_tokens=8, lora=lora_gguf)
    assert sum(a != b for a, b in zip(plain, adapted, strict=True)) >= n // 2
    del m, base
    lora = eval_task_llamacpp(adapter=folder, task="funccall", max_examples=n)
    assert lora["n_test"] == n and lora["adapter_gguf_bytes"] > 0
    assert lora["token_agreement"] >= 7 / 8, lora["diverged_examples"]
    merged = eval_task_llamacpp(adapter=folder, task="funccall", max_examples=n, merge=True)
    assert merged["token_agreement"] >= 7 / 8, merged["diverged_examples"]
    assert merged["adapter_gguf_bytes"] is None


@pytest.mark.fast
def test_a_missing_or_corrupt_gguf_is_a_clear_error(tmp_path):
    from edgellm.deploy.export import tensor_types
    from edgellm.deploy.llamacpp import LlamaCppError, llamacpp_greedy

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(LlamaCppError, match="no such GGUF"):
        llamacpp_greedy(tmp_path / "none.gguf", [[1, 2]], eos=2)
    with pytest.raises(LlamaCppError, match="could not load"):
        llamacpp_greedy(junk, [[1, 2]], eos=2)
    with pytest.raises(LlamaCppError, match="not a readable GGUF"):
        tensor_types(junk)


@pytest.mark.fast
def test_bytes_per_token_reads_one_embedding_row_and_the_kv_cache():
    from edgellm.deploy.roofline import bytes_per_token, decode_bound, prefill_bound

    tensors = {"token_embd.weight": 1000 * 64, "blk.0.w": 4096, "output (tied)": 1000 * 64}
    got = bytes_per_token(tensors, rows={"token_embd.weight": 1000}, kv_bytes_per_position=8,
                          position=10)
    assert got == 64 + 4096 + 64_000 + 80
    assert decode_bound(1e9, 500) == 2e6 and prefill_bound(1e12, 2e8) == 5e3


@pytest.mark.fast
def test_roofline_measures_positive_numbers_and_names_its_method(capsys):
    from edgellm.cli import main

    assert main(["roofline", "--threads", "1", "--size-mib", "16", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["threads"] == 1 and rec["bandwidth_bytes_per_s"] > 1e8 and rec["peak_flops"] > 1e8
    assert "read-only sum over a 16 MiB" in rec["method"]["bandwidth_bytes_per_s"]
    assert rec["protocol"] == "roofline"


@pytest.mark.integration
@pytest.mark.llamacpp
def test_llamacpp_and_torch_generate_the_same_tokens_from_the_same_prompt(tmp_path, capsys):
    """bench-runtime feeds both runtimes the same ids; on the F32 export the greedy tokens agree,
    so their speeds compare the same model."""
    from edgellm.cli import main

    gguf = tmp_path / "f32.gguf"
    assert main(["export", "--type", "F32", "--out", str(gguf), "--json"]) == 0
    capsys.readouterr()
    recs = {}
    for runtime, model in (("llamacpp", str(gguf)), ("torch", "smollm2-135m")):
        assert main(["bench-runtime", "--runtime", runtime, "--model", model, "--prompt-tokens",
                     "32", "--gen-tokens", "8", "--repeats", "1", "--json"]) == 0
        recs[runtime] = json.loads(capsys.readouterr().out)
    a, b = recs["llamacpp"], recs["torch"]
    assert a["generated_ids"] == b["generated_ids"] and len(a["generated_ids"]) == 8
    for r in (a, b):
        assert r["decode_tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["load_s"] > 0
        assert 0 < r["fraction_of_bound"] and r["speed_protocol"]["decode_bound_tokens_per_s"]
    assert a["bytes_per_token"] == pytest.approx(b["bytes_per_token"], rel=0.02)


@pytest.mark.fast
@pytest.mark.parametrize("bits,sym,kind", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")])
def test_our_g32_codes_are_llamacpp_blocks_bit_for_bit(bits, sym, kind):
    import gguf
    from gguf import quants

    from edgellm.deploy.gguf_blocks import as_block_qtensor, block_type
    from edgellm.quant.gguf_formats import to_gguf_bytes
    from edgellm.quant.rtn import quantize

    torch.manual_seed(0)
    qt = quantize(torch.randn(6, 128) * 0.05, bits, 32, sym=sym)
    assert block_type(qt) == kind
    raw = to_gguf_bytes(as_block_qtensor(qt))
    back = quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
    assert np.array_equal(back.astype(np.float32), qt.dequantize().numpy())


@pytest.mark.fast
def test_formats_without_an_exact_block_are_refused():
    from edgellm.deploy.gguf_blocks import block_type
    from edgellm.deploy.llamacpp import LlamaCppError
    from edgellm.quant.rtn import quantize

    w = torch.randn(4, 128)
    for bits, g, sym in ((4, 64, True), (3, 32, True), (8, 32, False)):
        with pytest.raises(LlamaCppError, match="no exact GGUF block"):
            block_type(quantize(w, bits, g, sym=sym))


@pytest.mark.fast
def test_rope_row_order_interleaves_the_two_halves_of_each_head():
    from edgellm.deploy.gguf_blocks import rope_row_order

    order = rope_row_order(12, 2)                  # 2 heads of 6 rows: halves of 3
    assert order.tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


@pytest.mark.integration
@pytest.mark.llamacpp
def test_an_rtn_model_exports_to_q4_0_and_llamacpp_runs_it(tmp_path, capsys):
    from edgellm.cli import main
    from edgellm.deploy.runtime import bench_llamacpp, bench_torch, prompt_ids
    from edgellm.quant.save import load_quantized

    q = tmp_path / "rtn"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--sym",
                 "--out", str(q), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "rtn.gguf"
    assert main(["export", "--from-quantized", str(q), "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    linears = {n: t for n, t in rec["tensor_types"].items()
               if n.startswith("blk.") and not n.endswith("norm.weight")}
    assert len(linears) == 210 and set(linears.values()) == {"Q4_0"}
    assert rec["tensor_types"]["token_embd.weight"] == "F32" and rec["blocks_checked"] > 0
    assert 4.5 < rec["bpw"] < 4.6
    model, tok, _ = load_quantized(q)
    from edgellm.models import load_model

    tok = tok or load_model()[1]
    ids = prompt_ids(tok, 64)
    theirs = bench_llamacpp(out, ids, gen_tokens=8, repeats=1)["generated_ids"]
    ours = bench_torch(model, ids, gen_tokens=8, repeats=1)["generated_ids"]
    assert theirs[:4] == ours[:4]          # later tokens may part: llama.cpp rounds activations
    ppl = {}
    for runtime, model_arg in (("llamacpp", str(out)), ("torch", str(q))):
        assert main(["ppl", "--runtime", runtime, "--model", model_arg, "--protocol", "llamacpp",
                     "--chunks", "2", "--json"]) == 0
        ppl[runtime] = json.loads(capsys.readouterr().out)
    assert ppl["llamacpp"]["n_tokens"] == ppl["torch"]["n_tokens"] == 510
    # the same codes in llama.cpp's kernels: within 0.5 % (it rounds activations to 8 bits)
    assert ppl["llamacpp"]["ppl"] == pytest.approx(ppl["torch"]["ppl"], rel=5e-3)
    g64 = tmp_path / "g64"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "64", "--out",
                 str(g64), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", "--from-quantized", str(g64), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "no exact GGUF block" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.fast
def test_a_quantized_folder_is_not_loaded_as_plain_weights(tmp_path):
    from edgellm.models import ModelUnavailable, load_model

    (tmp_path / "quant_config.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="quantized model"):
        load_model(str(tmp_path))
