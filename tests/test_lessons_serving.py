"""Lesson 12's helpers, and the lesson's statements against its records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgellm.lessons import serving as S
from edgellm.results import load_sweep

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "notebooks" / "12_serving_and_kernels.ipynb"


def _markdown() -> str:
    nb = json.loads(LESSON.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_serving_rows_from_the_record():
    rows = S.serving_rows(load_sweep("12_serving")["records"])
    assert len(rows) == 12 and all(r["errors"] == 0 for r in rows)
    names = {r["server"] for r in rows}
    assert names == {"llama-server, 1 slot", "llama-server, 8 slots", "llama-cpp-python"}
    assert all(r["in_process"] == pytest.approx(86.08, abs=0.01) for r in rows)
    table = S.format_serving_table(rows)
    assert table.count("\n") == 13 and "| llama-server, 8 slots | 8 | 255.3 |" in table
    assert "| 31 of 32 | 0 |" in table
    assert S.plot_serving(rows) is not None


def test_serving_statements_match_the_record():
    rows = {(r["server"], r["clients"]): r for r in S.serving_rows(load_sweep("12_serving")["records"])}
    text = _markdown()
    one, eight = rows[("llama-server, 1 slot", 8)], rows[("llama-server, 8 slots", 8)]
    assert f"**255 at 8 ({eight['tokens_per_s'] / one['tokens_per_s']:.1f}× one slot)**" in text
    assert f"TTFT p95 {eight['ttft_p95_s']:.2f} s instead of {one['ttft_p95_s']:.1f} s" in text
    assert f"to {one['ttft_p50_s']:.1f} s (p95 {one['ttft_p95_s']:.1f} s) at 8" in text


def _spec(draft, gamma, alpha, steps, c=0.0, speedup=1.0):
    return {"draft": draft, "gamma": gamma, "acceptance_rate": alpha, "tokens_per_step": steps,
            "tokens_per_step_expected": 1.5, "cost_ratio": c, "speedup": speedup,
            "speedup_expected": 1.2, "identical": True, "threads": 1, "n_prompts": 2,
            "new_tokens": 8, "seconds_plain": 16.0, "target_steps": 10,
            "seconds_speculative": 16.0 / speedup}             # 16 tokens in 10 steps


def test_speculative_rows_table_and_plot():
    rows = S.speculative_rows([_spec("prompt-lookup", 4, 0.3, 1.7), {"command": "other"},
                               _spec("smollm2-135m-draft", 2, 0.4, 1.6, c=0.55, speedup=0.7)])
    assert [r["draft"] for r in rows] == ["prompt-lookup", "smollm2-135m-draft"]
    table = S.format_speculative_table(rows)
    assert rows[1]["step_cost"] == pytest.approx(1.6 / 0.7)      # speedup = tokens/step ÷ cost
    assert "| smollm2-135m-draft | 2 | 0.400 | 1.60 (1.50) | 0.55 | 2.29 | 0.70× (1.20×) | yes |" in table
    assert S.plot_speculative(rows) is not None


def test_kernel_and_fusion_tables():
    rec = {"cpu": "cpu", "cpu_capability": "AVX2", "threads": 1, "bound_gbytes_per_s": 10.0,
           "llc_bytes": 32 * 2 ** 20, "skipped": {"llamacpp_q4_0": "not built"},
           "variants": [{"name": "cpp_simd", "path": "avx2", "layout": "interleaved",
                         "shape": [1536, 576], "seconds": 1e-4, "gbytes_per_s": 5.0,
                         "fraction_of_bound": 0.5, "max_abs_err": 1e-7}]}
    table = S.format_kernel_table(rec)
    assert "| 1536×576 | cpp_simd (avx2) | interleaved | 100 | 5.00 | 50% | 1.0e-07 |" in table
    assert "skipped llamacpp_q4_0: not built" in table
    assert S.plot_kernels([rec]) is not None
    fus = {"rows": [{"name": "silu_mul_separate", "tokens": 1, "seconds": 2e-6,
                     "max_abs_err": 0.0}], "skipped": {}}
    assert "| silu_mul_separate | 1 | 2.0 | 0.0e+00 |" in S.format_fusion_table(fus)


def test_sparsity_plot():
    layer = {"top_mass_per_token": 0.3, "top_mass_ranked": 0.2, "near_zero_fraction": 0.01,
             "gate_negative_fraction": 0.6, "hot_jaccard": 0.5, "zero_fraction": 0.0}
    rec = {"layers": [{"layer": i, **layer} for i in range(3)], "top": 0.1,
           "random_jaccard": 0.05, "hidden_act": "silu", "tokens": 100}
    assert S.plot_sparsity(rec) is not None


def test_lesson_has_no_unfilled_placeholders():
    text = _markdown()
    assert not re.search(r"\b(READING_[A-Z]+|SUMMARY)\b", text)


def _kernel_records():
    recs = load_sweep("12_kernels")["records"]
    return ({r["threads"]: r for r in recs if r["protocol"] == "kernels-bench"},
            next(r for r in recs if r["protocol"] == "kernels-fusion"),
            next(r for r in recs if r["protocol"] == "kernels-sparsity"))


def test_kernel_statements_match_the_record():
    bench, fusion, sparsity = _kernel_records()
    text = " ".join(_markdown().split())

    def gbs(threads, name):
        return [r["gbytes_per_s"] for r in bench[threads]["variants"] if r["name"] == name]

    def span(xs, fmt="{:.1f}"):
        return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"

    assert (f"read bound {bench[1]['bound_gbytes_per_s']:.1f} GB/s at 1 thread, "
            f"{bench[2]['bound_gbytes_per_s']:.1f} GB/s at 2") in text
    assert f"**{span(gbs(1, 'cpp_simd'))} GB/s, " in text
    assert f"**llama.cpp's Q4_0 is faster, {span(gbs(1, 'llamacpp_q4_0'))} GB/s" in text
    ratios = {t: [ll / ours for ll, ours in zip(gbs(t, "llamacpp_q4_0"), gbs(t, "cpp_simd"),
                                                strict=True)] for t in (1, 2)}
    assert "({:.2f}× and {:.2f}×)".format(*ratios[2]) in text
    assert "({:.2f}× and {:.2f}×)".format(*ratios[1]) in text
    assert max(ratios[1]) > 1.5 >= max(ratios[2])                  # what the text concludes
    rows = {(r["name"], r["tokens"]): r["seconds"] * 1e6 for r in fusion["rows"]}
    assert f"cost {rows[('silu_mul_separate', 1)]:.1f} µs at one token" in text
    assert f"it takes {rows[('silu_mul_fused_avx2', 1)]:.1f} µs at one token" in text
    assert f"whole MLP ({rows[('mlp_separate', 1)]:.0f} µs" in text
    m = sparsity["mean"]
    zeros = sum(r["zero_fraction"] for r in sparsity["layers"]) * sparsity["tokens"] * 1536
    assert round(zeros) == 1 and "one of the 189 million" in text
    assert f"the top 10 % of neurons carry {100 * m['top_mass_per_token']:.0f} %" in text
    assert f"a Jaccard overlap of {m['hot_jaccard']:.2f}" in text
    assert f"(two random sets: {sparsity['random_jaccard']:.3f})" in text
    assert f"{100 * m['gate_negative_fraction']:.0f} % of the gates are negative" in text


def test_speculative_statements_match_the_record():
    recs = load_sweep("12_speculative")["records"]
    rows = {(r["draft"], r["gamma"]): r for r in S.speculative_rows(recs)}
    text = " ".join(_markdown().split())
    assert all(r["identical"] for r in rows.values()) and len(rows) == 8
    pl = {g: rows[("prompt-lookup", g)] for g in (1, 2, 4, 8)}
    assert (f"**Prompt lookup pays on documentation text: {pl[4]['speedup']:.2f}× at γ = 4 and "
            f"{pl[8]['speedup']:.2f}× at γ = 8** ({pl[1]['speedup']:.2f}× and "
            f"{pl[2]['speedup']:.2f}× at γ = 1, 2: not resolved)") in text
    assert f"while α falls from {pl[1]['alpha']:.2f} to {pl[8]['alpha']:.2f}" in text
    d = {g: rows[("smollm2-135m-draft", g)] for g in (1, 2, 4)}
    assert f"**The distilled draft does not pay here: {d[1]['speedup']:.2f}× at γ = 1**" in text
    costs = [r["cost_ratio"] for r in d.values()] + [rows[("drop-layers", 2)]["cost_ratio"]]
    assert f"c = {min(costs):.2f}–{max(costs):.2f}" in text
    steps = [r["step_cost"] for r in pl.values()]
    assert f"costs {min(steps):.1f}–{max(steps):.1f} plain steps even with prompt lookup" in text
    base = [r["decode_tokens_per_s_base"] for r in recs]
    assert f"plain decoding itself ran at {min(base):.1f}–{max(base):.1f} tokens/s" in text
    hist = next(r for r in recs if r["draft"] == "prompt-lookup" and r["gamma"] == 8)["accept_hist"]
    assert f"{hist[8]} of {sum(hist)} steps kept all 8 drafts, {hist[0]} kept none" in text
