"""Rotation of the residual stream (QuaRot-style): Hadamard matrices, norm fusion, invariance."""

import copy

import pytest
import torch

from edgellm.quant.qtensor import QuantError
from edgellm.quant.rotate import (
    activation_outliers,
    apply_rotation,
    fuse_norms,
    hadamard,
    hadamard_unnormalized,
    paley2,
    random_orthogonal,
)


@pytest.mark.parametrize("n", [1, 2, 16, 64, 36, 72, 576])
def test_hadamard_unnormalized_is_hadamard(n):
    H = hadamard_unnormalized(n)
    assert H.shape == (n, n) and H.dtype == torch.float64
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_paley_36_and_orthonormal_576():
    assert torch.equal(paley2(17) @ paley2(17).T, 36 * torch.eye(36, dtype=torch.float64))
    Q = hadamard(576)
    assert torch.allclose(Q @ Q.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q.abs(), torch.full_like(Q, 576 ** -0.5))


def test_hadamard_bad_orders():
    for n in (0, 12, 100, 48):
        with pytest.raises(QuantError, match="Hadamard"):
            hadamard(n)
    with pytest.raises(QuantError, match="q ≡ 1"):
        paley2(19)


def test_random_orthogonal_seeded():
    Q = random_orthogonal(48, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, random_orthogonal(48, seed=3))
    assert not torch.equal(Q, random_orthogonal(48, seed=4))


def _random_norms(model, seed=0):
    """Non-trivial RMSNorm weights, so that fusing them is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g) * 1.5)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fuse_norms_keeps_logits_and_unties(tiny):
    _random_norms(tiny)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(tiny, ids)
    emb_before = tiny.model.embed_tokens.weight.clone()
    info = fuse_norms(tiny)
    assert info["untied_lm_head"] and tiny.config.tie_word_embeddings is False
    assert tiny.lm_head.weight.data_ptr() != tiny.model.embed_tokens.weight.data_ptr()
    assert torch.equal(tiny.model.embed_tokens.weight, emb_before)
    for layer in tiny.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    torch.testing.assert_close(_logits(tiny, ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,hidden", [("hadamard", 64), ("hadamard", 72), ("random", 64)])
def test_rotation_keeps_logits(kind, hidden):
    from edgellm import tiny_llama

    model = tiny_llama(hidden_size=hidden)
    _random_norms(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    info = apply_rotation(model, kind=kind, seed=1)
    assert info["kind"] == kind and info["untied_lm_head"]
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)
    after = _logits(model, ids)
    assert (after - before).abs().max() < 1e-5 * max(1.0, before.abs().max().item())


def test_rotation_wrong_kind(tiny):
    with pytest.raises(QuantError, match="rotation kind"):
        apply_rotation(tiny, kind="givens")


def test_rotation_spreads_an_outlier_channel():
    """A residual channel made huge in the embedding: the rotation spreads it over all channels."""
    from edgellm import tiny_llama

    model = tiny_llama(hidden_size=64)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50.0
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    before = activation_outliers(model, ids)
    apply_rotation(model)
    after = activation_outliers(model, ids)
    assert before["q_proj"]["max_token"][0] > 2 * after["q_proj"]["max_token"][0]
    assert before["q_proj"]["kurtosis"][0] > 2 * after["q_proj"]["kurtosis"][0]


@pytest.mark.integration
def test_rotation_real_model_logits(default_model):
    model, tok = default_model
    ids = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
              return_tensors="pt")["input_ids"]
    before = _logits(model, ids)
    rotated = copy.deepcopy(model)
    info = apply_rotation(rotated)
    assert info["hidden_size"] == 576 and info["untied_lm_head"]
    after = _logits(rotated, ids)
    diff = (after - before).abs().max().item()
    assert diff < 1e-3, diff  # fp32 rounding only (logits are O(10))
    assert torch.equal(after.argmax(-1), before.argmax(-1))
