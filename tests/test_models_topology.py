"""The Llama topology helpers: decoder layers, linears by role, producer → consumer pairs, and
the one forward-hook input collector."""

import pytest
import torch

from edgellm import tiny_llama
from edgellm.calib import capture_inputs
from edgellm.models import (
    LINEAR_ROLES,
    TopologyError,
    decoder_layers,
    layer_linears,
    layer_prefix,
    linear_layers,
    linears_by_role,
    producer_pairs,
)


def test_layers_and_linears_by_role(tiny):
    layers = decoder_layers(tiny)
    assert len(layers) == 2 and layers is tiny.model.layers
    lins = linears_by_role(layers[1])
    assert list(lins) == list(LINEAR_ROLES)
    assert lins["q_proj"] is layers[1].self_attn.q_proj
    assert lins["down_proj"] is layers[1].mlp.down_proj
    names = layer_linears(tiny, 1)
    assert list(names) == [layer_prefix(1) + LINEAR_ROLES[r] for r in LINEAR_ROLES]
    assert list(names.values()) == list(lins.values())
    # every decoder linear belongs to exactly one layer and role
    assert [n for i in range(2) for n in layer_linears(tiny, i)] == list(linear_layers(tiny))
    with pytest.raises(TopologyError, match="model.model.layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_producer_pairs_feed_their_consumers(tiny):
    layer = decoder_layers(tiny)[0]
    pairs = {p.site: p for p in producer_pairs(layer)}
    assert list(pairs) == ["qkv", "o", "gate_up", "down"]
    assert pairs["qkv"].producer is layer.input_layernorm
    assert pairs["qkv"].consumers == ("q_proj", "k_proj", "v_proj")
    assert pairs["gate_up"].producer is layer.post_attention_layernorm
    assert pairs["down"].producer is layer.mlp.up_proj and pairs["down"].consumers == ("down_proj",)
    assert pairs["o"].producer is layer.self_attn.v_proj
    cfg = tiny.config
    assert pairs["o"].grouped == (cfg.num_key_value_heads != cfg.num_attention_heads)
    # the norms' outputs are exactly what their consumers read
    lins = linears_by_role(layer)
    got = {}
    mods = {"input_layernorm": layer.input_layernorm,
            "post_attention_layernorm": layer.post_attention_layernorm, **lins}
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o))
             for n, m in mods.items() if "norm" in n]
    with capture_inputs(lins, lambda n, x: got.__setitem__(n, x)):
        tiny(input_ids=torch.arange(12).reshape(2, 6))
    for h in hooks:
        h.remove()
    for pair in (pairs["qkv"], pairs["gate_up"]):
        norm_name = "input_layernorm" if pair.site == "qkv" else "post_attention_layernorm"
        for role in pair.consumers:
            assert torch.equal(got[role], outs[norm_name])


def test_capture_inputs_removes_hooks_even_on_error():
    m = tiny_llama()
    lins = linear_layers(m)
    seen = []
    with pytest.raises(RuntimeError, match="boom"), capture_inputs(lins, lambda n, x: seen.append(n)):
        m(input_ids=torch.arange(4).unsqueeze(0))
        raise RuntimeError("boom")
    assert len(seen) == len(lins)
    m(input_ids=torch.arange(4).unsqueeze(0))
    assert len(seen) == len(lins)  # no hook left behind
    assert all(not lin._forward_hooks for lin in lins.values())
