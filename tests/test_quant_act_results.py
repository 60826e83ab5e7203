"""Lesson 04's results helpers (labels, table, α curve, smoothing ranges, KV memory) on synthetic
records, and the recorded sweeps' shape when they have been run."""

import pytest
import torch

from edgellm.lessons import act_quant as ar
from edgellm.models import tiny_llama
from edgellm.quant.qtensor import QuantError


def _rec(method, dn, se=0.01, **kw):
    r = {"method": method, "bits": 8, "group_size": None, "a_bits": 8, "a_format": "int",
         "alpha": None, "kv_bits": None, "threshold": None, "ppl": 10 + dn, "ppl_stderr": 0.5,
         "ppl_base": 10.0, "delta_nll": dn, "delta_nll_stderr": se, "kl_mean": dn / 2,
         "top1_agreement": 0.9, "n_tokens": 2044}
    r.update(kw)
    return r


RECORDS = [_rec("rtn", 0.001, a_bits=None, a_format=None), _rec("rtn", 0.02),
           _rec("smoothquant", 0.010, alpha=0.75), _rec("smoothquant", 0.004, alpha=0.5),
           _rec("smoothquant", 0.030, alpha=0.0), _rec("rtn", 0.01, a_format="fp8")]


def test_labels_name_each_setting():
    got = [ar.label(r) for r in RECORDS]
    assert got == ["W8 weight-only", "W8A8 naive", "SmoothQuant α=0.75 W8A8",
                   "SmoothQuant α=0.50 W8A8", "SmoothQuant α=0.00 W8A8", "W8A8-FP8 naive"]
    assert ar.label(_rec("llm_int8", 0.01, threshold=6.0)) == "LLM.int8() t=6"
    assert ar.label(_rec("llm_int8", 0.02)) == "absmax int8 (no decomposition)"
    assert ar.label(_rec("rtn", 0.0, bits=4, group_size=32, a_bits=None, kv_bits=4)) == \
        "KV int4 (weights W4 g32)"
    assert ar.label(_rec("rotate", 0.1, bits=4, a_bits=4)) == "rotate W4A4"
    assert ar.label(_rec("lwc", 0.1, bits=3, group_size=64, a_bits=None)) == "LWC W3 g64"


def test_alpha_curve_is_sorted_and_described():
    pts = ar.alpha_curve(RECORDS)
    assert [p["alpha"] for p in pts] == [0.0, 0.5, 0.75]
    assert pts[1]["delta_nll"] == 0.004
    text = ar.describe_alpha(RECORDS, 0.55)
    assert "α=0.50" in text and "+0.0040" in text and "naive W8A8" in text and "+0.0200" in text
    assert "not recorded yet" in ar.describe_alpha([], 0.5)


def test_table_and_find():
    rows = ar.table(RECORDS)
    assert [r["label"] for r in rows][:2] == ["W8 weight-only", "W8A8 naive"]
    text = ar.format_table(rows + [{**rows[0], "delta_nll": None, "kl_mean": None}])
    assert "+0.0200 ± 0.0100" in text and text.count("\n") == len(rows) + 2
    assert ar.find(RECORDS, method="rtn", a_format="fp8")["delta_nll"] == 0.01
    assert ar.find(RECORDS, method="gptq") is None


def test_smoothing_ranges_limits():
    x = torch.tensor([1.0, 2.0, 60.0, 0.5])
    w = torch.tensor([0.2, 0.1, 0.05, 0.4])
    r0 = ar.smoothing_ranges(x, w, 0.0)
    assert torch.allclose(r0["x_after"], x / r0["s"]) and torch.allclose(r0["w_after"],
                                                                          torch.ones(4))
    r1 = ar.smoothing_ranges(x, w, 1.0)
    assert torch.allclose(r1["x_after"], torch.ones(4))          # every channel reaches 1
    assert torch.allclose(r1["w_after"], w * x)                  # the weights take the outliers
    r5 = ar.smoothing_ranges(x, w, 0.5)
    assert torch.allclose(r5["x_after"], r5["w_after"])          # difficulty split evenly
    assert torch.allclose(r5["x_after"], (x * w).sqrt())
    assert r5["x_ratio_after"] < r5["x_ratio_before"]
    assert r5["x_max_before"] == 60.0
    with pytest.raises(QuantError, match="must both be"):
        ar.smoothing_ranges(x, w[:3])


def test_kv_memory_of_the_default_model_config():
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64,
                          hidden_size=576, num_attention_heads=9)
    rows = {r["bits"]: r for r in ar.kv_memory(cfg)}
    assert rows[16]["MB"] == pytest.approx(23.59, abs=0.01)
    assert rows[8]["MB"] == pytest.approx(12.53, abs=0.01)      # codes + fp16 scale and offset
    assert rows[4]["MB"] == pytest.approx(6.64, abs=0.01)
    assert rows[16]["saved_MB"] == 0 and rows[4]["ratio"] > 3.5
    small = ar.kv_memory(tiny_llama().config, bits=(16, 8))
    assert small[1]["bytes"] < small[0]["bytes"]


def test_load_sweeps_reports_missing(capsys):
    got = ar.load_sweeps(("04_does_not_exist",))
    assert got == {"04_does_not_exist": []}
    assert "not recorded yet — run `edgellm results --run 04_does_not_exist`" in \
        capsys.readouterr().out


def test_plots_draw_without_records():
    import matplotlib

    matplotlib.use("Agg")
    ax = ar.plot_alpha(RECORDS)
    assert len(ax.lines) >= 4                                    # curve + 3 reference lines
    ar.plot_alpha([])
    axes = ar.plot_ranges(ar.smoothing_ranges(torch.rand(8) + 0.1, torch.rand(8) + 0.1, 0.5))
    assert axes[0].get_yscale() == "log"


def test_recorded_sweeps_are_well_formed():
    for name, records in ar.load_sweeps(verbose=False).items():
        for r in records:
            assert {"method", "bits", "ppl", "ppl_base", "delta_nll", "command"} <= set(r), name
            assert r["command"].startswith("edgellm quantize")
            assert isinstance(ar.label(r), str)


def test_lin_name_and_layer_inputs(tiny):
    from conftest import random_ids

    ids = random_ids(2, 12)
    block = tiny.model.layers[1]
    assert tiny.get_submodule(ar.lin_name(1, "down_proj")) is block.mlp.down_proj
    assert tiny.get_submodule(ar.lin_name(1, "v_proj")) is block.self_attn.v_proj
    got = ar.layer_inputs(tiny, 1, ids)
    assert got["down"].shape == (24, block.mlp.down_proj.in_features)
    assert got["q"].shape == (24, block.self_attn.q_proj.in_features)
    assert not block.mlp.down_proj._forward_hooks and not block.self_attn.q_proj._forward_hooks
    with torch.no_grad():   # the captured input reproduces the layer's output
        out = {}
        h = block.mlp.down_proj.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
        tiny(input_ids=ids, use_cache=False)
        h.remove()
    torch.testing.assert_close(block.mlp.down_proj(got["down"]), out["y"].reshape(24, -1))
