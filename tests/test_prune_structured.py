"""Model-level pruning on the tiny random Llama: apply_* in place, structured pruning giving a
genuinely smaller model that saves, reloads and generates with the KV cache; bad input."""

import copy

import pytest
import torch

from edgellm import tiny_llama
from edgellm.models import linear_layers, n_params
from edgellm.prune import (
    PruneError,
    apply_magnitude,
    apply_sparsegpt,
    apply_structured,
    apply_wanda,
    drop_layers,
    is_nm,
    prune_heads,
    prune_layers,
)


def _tiny():  # 6 query heads in 2 KV groups of 3 (like SmolLM2's 9 in 3 groups of 3)
    return tiny_llama(n_layers=4, hidden_size=48, n_heads=6, n_kv_heads=2, intermediate_size=128)


def _calib(n=4, t=32, seed=0):
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("apply", [apply_magnitude, apply_wanda, apply_sparsegpt])
def test_apply_unstructured_and_nm(apply):
    m = _tiny()
    before = {n: lin.weight.clone() for n, lin in linear_layers(m).items()}
    stats = apply(m, _calib(), 0.5, **({} if apply is apply_magnitude else {"progress": False}))
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert set(stats["layers"]) == set(before)
    for v in stats["layers"].values():
        assert v == pytest.approx(0.5, abs=0.02)
    assert not torch.equal(m.lm_head.weight, torch.zeros_like(m.lm_head.weight))
    m2 = _tiny()
    apply(m2, _calib(), None, nm=(2, 4), **({} if apply is apply_magnitude else
                                            {"progress": False}))
    assert all(is_nm(lin.weight, 2, 4) for lin in linear_layers(m2).values())


def test_wanda_differs_from_magnitude_and_is_deterministic():
    a, b, c = _tiny(), _tiny(), _tiny()
    apply_wanda(a, _calib(), 0.5, progress=False)
    apply_wanda(b, _calib(), 0.5, progress=False)
    apply_magnitude(c, sparsity=0.5)
    wa = linear_layers(a)["model.layers.1.mlp.down_proj"].weight
    assert torch.equal(wa, linear_layers(b)["model.layers.1.mlp.down_proj"].weight)
    assert not torch.equal(wa != 0, linear_layers(c)["model.layers.1.mlp.down_proj"].weight != 0)


def test_magnitude_global_scope_varies_per_layer():
    m = _tiny()
    stats = apply_magnitude(m, sparsity=0.5, scope="global")
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert max(stats["layers"].values()) - min(stats["layers"].values()) > 0.01


@pytest.mark.parametrize("kind,kw", [("heads", {"ratio": 1 / 3}),
                                     ("heads", {"ratio": 0.5, "granularity": "group"}),
                                     ("channels", {"ratio": 0.25}),
                                     ("layers", {"ratio": 0.5})])
def test_structured_smaller_saves_reloads_generates(kind, kw, tmp_path):
    from transformers import AutoModelForCausalLM

    m = _tiny()
    p0, ids = n_params(m), _calib()
    info = apply_structured(m, ids, kind=kind, **kw)
    assert n_params(m) < p0
    m.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert n_params(r) == n_params(m)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, r(ids).logits)
    prompt = ids[:1, :8]
    with_cache = r.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    no_cache = r.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, no_cache)
    if kind == "layers":
        assert info["num_hidden_layers"] == 2 == r.config.num_hidden_layers
        assert [layer.self_attn.layer_idx for layer in r.model.layers] == [0, 1]
    if kind == "heads":
        n_kv = r.config.num_key_value_heads
        assert r.config.num_attention_heads == (4 if n_kv == 2 else 3)
        assert r.model.layers[0].self_attn.q_proj.out_features == r.config.num_attention_heads * 8


def test_structured_heads_keep_importance_order():
    m = _tiny()
    with torch.no_grad():  # make head 1 of group 0 worthless: its o_proj columns are zero
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[:, 8:16] = 0
    ref = copy.deepcopy(m)
    prune_heads(m, None, 1 / 3)
    q_old = ref.model.layers[0].self_attn.q_proj.weight
    q_new = m.model.layers[0].self_attn.q_proj.weight
    # group 0 keeps heads 0 and 2 (head 1 removed); group 1 keeps two of heads 3, 4, 5
    assert torch.equal(q_new[:8], q_old[:8]) and torch.equal(q_new[8:16], q_old[16:24])


def test_drop_layers_renumbers_and_keeps_outputs_of_identity_layers():
    m = _tiny()
    drop_layers(m, [1, 2])
    assert m.config.num_hidden_layers == 2
    assert [lyr.self_attn.layer_idx for lyr in m.model.layers] == [0, 1]


def test_structured_bad_input():
    m = _tiny()
    with pytest.raises(PruneError, match="zero heads"):
        prune_heads(m, None, 0.9)  # would drop all 3 query heads of each group
    with pytest.raises(PruneError, match="zero heads"):
        prune_heads(m, None, 0.8, granularity="group")
    with pytest.raises(PruneError, match="leave none"):
        drop_layers(m, [0, 1, 2, 3])  # pruning every layer
    with pytest.raises(PruneError, match=r"outside \[0, 1\)"):
        prune_layers(m, _calib(), 1.0)
    with pytest.raises(PruneError, match="would remove all 4 layers"):
        prune_layers(m, _calib(), 0.9)  # round(0.9 * 4) = 4: every layer
    with pytest.raises(PruneError, match="no MLP channel"):
        apply_structured(m, None, kind="channels", ratio=0.9)  # 128 channels, kept in multiples of 32
    with pytest.raises(PruneError, match="calibration"):
        prune_layers(m, None, 0.5)
    with pytest.raises(PruneError, match="structured="):
        apply_structured(m, None, kind="rows", ratio=0.2)
    assert n_params(m) == n_params(_tiny())  # nothing changed by the failed calls


def test_apply_bad_input():
    m = _tiny()
    with pytest.raises(PruneError, match="sparsity"):
        apply_magnitude(m, sparsity=1.0)
    with pytest.raises(PruneError, match="1 <= N < M"):
        apply_wanda(m, _calib(), nm=(4, 4), progress=False)
    with pytest.raises(PruneError, match="does not divide"):
        apply_sparsegpt(m, _calib(), nm=(2, 5), progress=False)
