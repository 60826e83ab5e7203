"""ONNX Runtime and ExecuTorch: the model exported with its KV cache, run by each runtime, equal
to PyTorch (fp32) or close to it (int8, 8da4w), greedy generation identical, files written
atomically, the type read back."""

from __future__ import annotations

import json

import pytest
import torch

from edgellm.deploy.executorch_runtime import (
    PTE_TYPES,
    ExecuTorchError,
    PteLM,
    bench_executorch,
    check_pte_file,
    export_pte,
)
from edgellm.deploy.onnx_runtime import (
    ONNX_TYPES,
    OnnxError,
    OrtLM,
    bench_onnx,
    check_onnx_file,
    export_onnx,
    onnx_type,
)
from edgellm.models import tiny_llama

pytestmark = pytest.mark.runtimes


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {t: export_onnx(tiny_llama(), folder / f"{t}.onnx", qtype=t) for t in ONNX_TYPES}


def test_onnx_fp32_equals_pytorch_and_generates_the_same_tokens(onnx_files):
    rec, model = onnx_files["fp32"], tiny_llama()
    assert rec["quantized_linears"] == 0 and onnx_type(rec["out"]) == "fp32"
    lm = OrtLM(rec["out"])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    assert (lm(ids) - ref).abs().max() < 1e-4
    prompt = list(range(3, 19))
    res = bench_onnx(rec["out"], prompt, gen_tokens=8, repeats=1)
    assert res["generated_ids"] == greedy(model, prompt, 8)
    assert res["decode_tokens_per_s"] > 0 and res["ttft_s"] > 0


def test_onnx_int8_quantizes_every_linear_or_all_but_down_proj(onnx_files):
    n_linears = 2 * 7 + 1                              # 2 layers × (q k v o gate up down) + head
    assert onnx_files["int8"]["quantized_linears"] == n_linears
    assert onnx_files["int8-keep-down"]["quantized_linears"] == n_linears - 2
    sizes = {t: r["size_bytes"] for t, r in onnx_files.items()}
    assert sizes["int8"] < sizes["int8-keep-down"] < sizes["fp32"]
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    err = (OrtLM(onnx_files["int8"]["out"])(ids) - ref).abs().max()
    assert 1e-5 < err < 0.5 * ref.abs().max()          # quantized: not equal, but close


def test_a_failed_onnx_export_leaves_nothing(tmp_path, monkeypatch):
    import onnxruntime.quantization as q

    def boom(*a, **k):
        raise RuntimeError("quantizer failed")

    monkeypatch.setattr(q, "quantize_dynamic", boom)
    with pytest.raises(RuntimeError, match="quantizer failed"):
        export_onnx(tiny_llama(), tmp_path / "m.onnx", qtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_onnx_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(OnnxError, match="not an ONNX type"):
        export_onnx(tiny_llama(), tmp_path / "m.onnx", qtype="int4")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 junk \xff")
    with pytest.raises(OnnxError, match="not a readable ONNX model|not a decoder"):
        check_onnx_file(tmp_path / "junk.onnx")
    with pytest.raises(OnnxError, match="no such file"):
        check_onnx_file(tmp_path / "none.onnx")


@pytest.fixture(scope="module")
def pte_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pte")
    return {t: export_pte(tiny_llama(), folder / f"{t}.pte", qtype=t, max_len=64)
            for t in PTE_TYPES}


def test_executorch_fp32_equals_pytorch_and_generates_the_same_tokens(pte_files):
    rec, model = pte_files["fp32"], tiny_llama()
    check_pte_file(rec["out"])
    lm = PteLM(rec["out"])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    assert (lm(ids) - ref).abs().max() < 1e-4            # rows one after another: cache reused
    prompt = list(range(3, 19))
    res = bench_executorch(rec["out"], prompt, gen_tokens=8, repeats=1)
    assert res["generated_ids"] == greedy(model, prompt, 8)


def test_executorch_8da4w_is_smaller_and_close(pte_files):
    assert pte_files["8da4w"]["size_bytes"] < 0.6 * pte_files["fp32"]["size_bytes"]
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    err = (PteLM(pte_files["8da4w"]["out"])(ids) - ref).abs().max()
    assert 1e-5 < err < 0.5 * ref.abs().max()


def test_executorch_past_its_cache_is_a_clear_error(pte_files):
    lm = PteLM(pte_files["fp32"]["out"])
    with pytest.raises(ExecuTorchError, match="cache length"):
        lm.step(list(range(10)), 60)                   # positions 60..69 > max_len 64


def test_executorch_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ExecuTorchError, match="not an ExecuTorch type"):
        export_pte(tiny_llama(), tmp_path / "m.pte", qtype="int4")
    (tmp_path / "junk.pte").write_bytes(b"\x00" * 4 + b"XXXX junk")
    with pytest.raises(ExecuTorchError, match="not an ExecuTorch program"):
        check_pte_file(tmp_path / "junk.pte")
    assert not (tmp_path / "m.pte").exists()


@pytest.mark.integration
def test_cli_exports_the_default_model_to_onnx_and_benchmarks_it(tmp_path, capsys):
    """``edgellm export --format onnx --eval``, then ``bench-runtime --runtime onnxruntime`` on
    the file: the same model (ΔNLL ≈ 0, top-1 ≈ 1) and the runtime's speed keys."""
    from edgellm.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", "--format", "onnx", "--out", str(out), "--eval", "--max-tokens",
                 "1024", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["format"] == "onnx" and rec["type"] == "fp32" and rec["runtime"] == "onnxruntime"
    assert abs(rec["delta_nll"]) < 1e-3 and rec["top1_agreement"] > 0.99
    assert rec["size_bytes"] > 500e6 and (tmp_path / "m.onnx.data").is_file()
    assert main(["bench-runtime", "--runtime", "onnxruntime", "--model", str(out),
                 "--prompt-tokens", "32", "--gen-tokens", "8", "--repeats", "1", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["runtime"] == "onnxruntime" and b["decode_tokens_per_s"] > 0
    assert b["speed_protocol"]["decode_tokens_per_s"]["name"] == "decode"
    assert 0 < b["fraction_of_bound"] < 1.5
