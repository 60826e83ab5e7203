"""Lesson 10's helpers: the 4-bit base priced by formula, the NF4 LoRA forward by hand, and the
two merges into a 4-bit base."""

import pytest
import torch

from edgellm import tiny_llama
from edgellm.lessons import qlora as Q
from edgellm.models import linear_layers
from edgellm.quant.size import nf4_bytes


def test_base_memory_counts_linears_in_nf4_and_the_rest_once():
    m = tiny_llama()
    r = Q.base_memory(m)
    assert r["fp32"] == sum(p.numel() * 4 for p in m.parameters())      # tied embedding once
    lin = [x.weight.numel() for x in linear_layers(m).values()]
    assert r["linears_nf4"] == sum(nf4_bytes(n) for n in lin)
    assert r["nf4"] == r["linears_nf4"] + r["rest"] and r["ratio"] == r["fp32"] / r["nf4"]


def test_a_7b_shape_keeps_a_seventh_in_full_precision():
    r = Q.base_memory_of_shape(vocab=32_000, hidden=4_096, layers=32, intermediate=11_008,
                               tied=False)
    assert r["linears_fp32"] / 4 == pytest.approx(6.48e9, rel=0.01)     # Llama-2-7B's linears
    assert 3.4 < r["ratio"] < 3.6 and 0.12 < r["rest_share_nf4"] < 0.15


def test_nf4_lora_forward_by_hand_matches_peft_on_linear4bit():
    import collections

    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.05, torch.randn(3, 128)
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state,
                                   quant_type="nf4", bnb_quantized=True)
    net = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]),
                                  torch.nn.Sequential(collections.OrderedDict(lin=lin)))
    with torch.no_grad():
        net.lin.lora_B["default"].weight.normal_()
    A, B = net.lin.lora_A["default"].weight, net.lin.lora_B["default"].weight
    ours = Q.nf4_lora_forward(x, packed, state, A, B, 2.0)
    assert torch.allclose(ours, net(x), atol=1e-5)
    assert not torch.allclose(ours, Q.nf4_lora_forward(x, packed, state, A, B, 2.02), atol=1e-5)


def test_merges_exact_in_fp32_and_rounded_in_nf4():
    torch.manual_seed(0)
    w = Q.nf4_roundtrip(torch.randn(64, 128))
    delta = 1e-4 * torch.randn(64, 128)
    r = Q.merged_weights(w, delta)
    assert torch.equal(r["fp32"], w + delta)
    assert r["requant_rel_err"] > 0.5                       # a tiny update is mostly rounded away
    big = Q.merged_weights(w, 0.5 * torch.randn(64, 128))
    assert big["requant_rel_err"] < r["requant_rel_err"]    # a large one mostly survives


@pytest.mark.integration
@pytest.mark.integration  # counts the default model's own parameters
def test_lesson_10_states_the_savings_it_computes():
    """The summary's 3.5× (7B shape, fp16 base) and 2.4× (this model, fp16 base, half of the NF4
    base in full precision) are what base_memory computes from the default model."""
    import edgellm
    from edgellm.paths import root

    model, _ = edgellm.load_model(quiet=True)
    ours = Q.base_memory(model)
    here = (ours["fp32"] / 2) / (ours["linears_nf4"] + ours["rest"] / 2)
    share = (ours["rest"] / 2) / (ours["linears_nf4"] + ours["rest"] / 2)
    big = Q.base_memory_of_shape(vocab=32_000, hidden=4_096, layers=32, intermediate=11_008,
                                 tied=False)
    text = (root() / "notebooks" / "10_qlora.ipynb").read_text()
    assert f"{here:.1f}×" == "2.4×" and "2.4× for" in text and "saves only 2.4×" in text
    assert 0.45 < share < 0.55 and "half of its NF4 base" in text
    assert f"{big['ratio']:.1f}×" == "3.5×" and "3.5× at a 7 B shape" in text


def test_lesson_10_reads_its_record_right():
    import json

    from edgellm.lessons import lora as L
    from edgellm.paths import root
    from edgellm.results import load_sweep

    q, lo = load_sweep("10_qlora")["records"], load_sweep("09_task")["records"]
    if not q or not lo:
        pytest.skip("not recorded")
    cells = json.loads((root() / "notebooks" / "10_qlora.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells)
    d = q[0]["accuracy"] - lo[0]["accuracy"]
    se = L.se_bound(q[0]["accuracy_se"], lo[0]["accuracy_se"])
    assert L.reading(d, se) == "not resolved" and d - 2 * se < -0.03     # wider than ±3 points
    assert f"−{abs(100 * d):.1f} ± {100 * se:.1f} points, not resolved" in text
    assert f"about {100 * (d - 2 * se):.1f} to +{100 * (d + 2 * se):.1f} points".replace("-", "−") in text
    for r in (q[0], lo[0]):
        assert f"{100 * r['accuracy']:.1f} % ± {100 * r['accuracy_se']:.1f}" in text


def _lesson_10_text() -> str:
    import json

    from edgellm.paths import root

    cells = json.loads((root() / "notebooks" / "10_qlora.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells)


def test_lesson_10_reads_loftq_as_recorded():
    from edgellm.lessons import lora as L
    from edgellm.results import load_sweep

    lq, q, lo = (load_sweep(n)["records"] for n in ("10_loftq", "10_qlora", "09_task"))
    if not (lq and q and lo):
        pytest.skip("not recorded")
    text = _lesson_10_text()
    a, b = lq[0], q[0]
    d, se = a["accuracy"] - b["accuracy"], L.se_bound(a["accuracy_se"], b["accuracy_se"])
    assert L.reading(d, se) == "not resolved"
    assert f"+{100 * d:.1f} ± {100 * se:.1f} points, not resolved" in text
    for r in (a, b):
        assert f"{100 * r['accuracy']:.1f} % ± {100 * r['accuracy_se']:.1f}" in text
    assert f"first step's loss is {a['loss_first']:.2f} with LoftQ against {b['loss_first']:.2f}" in text
    assert f"(LoRA on\nthe fp32 base: {lo[0]['loss_first']:.2f})" in text
    won = (b["loss_first"] - a["loss_first"]) / (b["loss_first"] - lo[0]["loss_first"])
    assert 0.6 < won < 0.72 and "about two thirds" in text


def test_lesson_10_reads_the_merge_record_right():
    from edgellm.lessons import lora as L
    from edgellm.results import load_sweep

    recs = load_sweep("10_merge")["records"]
    if not recs:
        pytest.skip("not recorded")
    r, text = recs[0], _lesson_10_text()
    fp32, nf4 = r["merged"]["fp32"], r["merged"]["nf4"]
    v = fp32["vs_unmerged"]
    assert L.reading(v["delta"], v["delta_se"]) == "lower" and abs(v["delta"]) < 3 * v["delta_se"]
    assert "just past two standard errors" in text
    assert f"{100 * fp32['accuracy']:.1f} % against {100 * r['accuracy']:.1f} %, four items" in text
    assert v["n_changed"] == 4 and f"{100 * v['delta']:.1f} ± {100 * v['delta_se']:.1f}".replace("-", "−") in text
    assert nf4["accuracy"] == 0.0 and f"only {100 * nf4['format_valid']:.0f} % are even valid" in text
    assert f"answer perplexity {nf4['ppl']:.1f} against {r['ppl']:.2f}" in text
    assert f"{nf4['requant_rel_err_median']:.2f} times the update" in text


def test_lesson_10_reads_the_llamacpp_record_right():
    from edgellm.results import load_sweep

    recs, head = load_sweep("10_gguf")["records"], load_sweep("09_task")["records"]
    if not (recs and head):
        pytest.skip("not recorded")
    r, text = recs[0], _lesson_10_text()
    assert r["accuracy"] == head[0]["accuracy"]                     # the headline reproduces
    n = r["n_test"]
    for key, how in (("llamacpp", "as a GGUF LoRA"), ("llamacpp_merged", "merged")):
        v = r[key]
        assert v["token_agreement"] >= 0.9 and v["answer_changed"] == 0
        assert v["accuracy"] == v["accuracy_torch"] == r["accuracy"]
        assert f"**{n - v['n_diverged']} of {n}** prompts {how}" in text.replace("\n", " ") \
            or f"**{n - v['n_diverged']} of {n}** {how}" in text.replace("\n", " ")
        assert f"({100 * v['token_agreement']:.1f} %)" in text
    assert f"{r['llamacpp']['adapter_gguf_bytes'] / 2 ** 20:.1f} MiB" in text


def test_lesson_10_reads_the_qalora_record_right():
    from edgellm.lessons import lora as L
    from edgellm.results import load_sweep

    recs = {r["method"]: r for r in load_sweep("10_qalora")["records"]}
    if not recs:
        pytest.skip("not recorded")
    text, qa, plain = _lesson_10_text(), recs["qalora"], recs["int4-lora"]
    on_grid, exact = qa["merged"]["int4"], qa["merged"]["int4_offsets_fp32"]
    assert on_grid["changed_codes_median"] == 0 and exact["vs_unmerged"]["n_changed"] == 0
    assert f"by {exact['requant_rel_err_median']:.0e}".replace("e-0", "e−") in text
    assert f"({on_grid['requant_rel_err_median']:.2f})" in text
    v = on_grid["vs_unmerged"]
    assert L.reading(v["delta"], v["delta_se"]) == "not resolved"
    assert f"only {v['n_changed']} items change" in text
    assert f"({100 * v['delta']:.1f} ± {100 * v['delta_se']:.1f} points, not resolved)".replace("-", "−") in text
    p = plain["merged"]["int4"]
    assert f"{100 * plain['accuracy']:.1f} % → {100 * p['accuracy']:.1f} %" in text
    assert f"{100 * p['vs_unmerged']['delta']:.1f} ± {100 * p['vs_unmerged']['delta_se']:.1f}, {p['vs_unmerged']['n_changed']} items".replace("-", "−") in text
    assert f"**QA-LoRA reaches only {100 * qa['accuracy']:.1f} % ± {100 * qa['accuracy_se']:.1f}**" in text
    assert f"{qa['loss_last']:.2f} against {plain['loss_last']:.2f}" in text
