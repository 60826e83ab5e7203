"""Lesson 13's QAT helpers (the toy, PyTorch's fake-quant op, the tables), and the lesson's
statements against its records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from edgellm.lessons import qat as Q
from edgellm.results import load_sweep

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "notebooks" / "13_capstone.ipynb"


def _markdown() -> str:
    nb = json.loads(LESSON.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_the_toy_needs_the_estimator_and_snaps():
    frozen = Q.toy_snap(ste_on=False, steps=50)
    assert sum(frozen["changed"]) == 0 and frozen["final_loss"] == frozen["ptq_loss"]
    ste = Q.toy_snap(steps=400)
    assert ste["best_loss"] < 0.99 * ste["ptq_loss"]      # some codes move, and it helps
    assert sum(ste["changed"]) > 0
    fast = Q.toy_snap(lr=1e-3, steps=400)
    assert fast["final_loss"] > ste["ptq_loss"]          # a large rate oscillates past PTQ
    assert sum(fast["changed"]) > 10 * sum(ste["changed"])


def test_pytorchs_fake_quant_op_gives_q4_0_codes():
    from edgellm.quant.gguf_formats import quantize_gguf

    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(3)) * 0.05
    w[0, :32] = 0.0                                      # a constant group: scale 0
    assert torch.equal(Q.torch_q4_0_codes(w), quantize_gguf(w, "Q4_0").codes)


def _rec(**kw):
    r = {"bits": 2, "grid": "minmax", "group_size": 64, "steps": 30, "batch_size": 4,
         "seq_len": 128, "ppl_base": 9.5, "ppl_ptq": 200.0, "ppl": 60.0, "ppl_control": 150.0,
         "delta_nll_vs_ptq": -1.2, "delta_nll_vs_ptq_stderr": 0.02,
         "delta_nll_vs_control": -0.9, "delta_nll_vs_control_stderr": 0.5,
         "ptq_loss_recovered": 0.4, "size_bytes": 90 * 2**20, "curve": [
             {"step": 0, "tokens": 0, "lam": 0.5, "nll": 5.0},
             {"step": 10, "tokens": 5120, "lam": 1.0, "nll": 4.0}]}
    r.update(kw)
    return r


def test_qat_table_and_verdicts():
    rows = Q.qat_rows([_rec(bits=3), _rec(), {"ppl": None}])
    assert [r["bits"] for r in rows] == [2, 3]
    assert rows[0]["vs_ptq_verdict"] == "lower" and rows[0]["vs_control_verdict"] == "not resolved"
    t = Q.format_qat_table(rows)
    assert "| 2, min-max | 9.50 | 200.0 | 150.0 | 60.0 | -1.200 ± 0.020 (lower) | -0.900 ± 0.500 " \
           "(not resolved) | 40% | 90.0 MiB |" in t
    assert Q.plot_curve(rows[0] | {"ppl_base": 9.5}) is not None


def test_qat_statements_match_the_record():
    rows = {(r["bits"], r["grid"]): r for r in Q.qat_rows(load_sweep("13_qat")["records"])}
    assert set(rows) == {(2, "minmax"), (3, "minmax"), (3, "lsq")}
    two, three, lsq = rows[2, "minmax"], rows[3, "minmax"], rows[3, "lsq"]
    text = _markdown()
    assert f"PPL {two['ppl_ptq']:.0f}\nagainst {two['ppl_base']:.2f} in fp32 (ΔNLL " \
           f"+{two['delta_nll_ptq']:.2f})" in text
    assert f"QAT ends at **{two['ppl']:.1f}**: {-two['vs_ptq']:.3f} ± {two['vs_ptq_se']:.3f}" in text
    assert f"{two['recovered'] * 100:.0f} % of\nPTQ's ΔNLL recovered" in text
    assert f"The control ends at **{two['ppl_control']:.1f}**" in text
    assert f"QAT is\n{-two['vs_control']:.3f} ± {two['vs_control_se']:.3f} nats below the control: " \
           f"resolved" in text
    assert two["vs_ptq_verdict"] == "lower" and two["vs_control_verdict"] == "lower"
    assert abs(two["vs_control"]) / two["vs_control_se"] == pytest.approx(2.3, abs=0.05)
    assert f"PTQ costs less (PPL {three['ppl_ptq']:.2f}, ΔNLL +{three['delta_nll_ptq']:.3f})" in text
    assert f"QAT reaches {three['ppl']:.2f} ({-three['vs_ptq']:.3f} ± {three['vs_ptq_se']:.3f} " \
           f"below\nPTQ, {three['recovered'] * 100:.0f} % recovered)" in text
    assert f"+{three['vs_control']:.3f} ± {three['vs_control_se']:.3f}: **not\nresolved**" in text
    assert three["vs_control_verdict"] == "not resolved"
    recs = {r["bits"]: r for r in load_sweep("13_qat")["records"] if r["grid"] == "minmax"}
    assert f"KL to the fp32 model, {recs[3]['kl_mean']:.3f}, is *higher* than PTQ's\n" \
           f"{recs[3]['kl_mean_ptq']:.3f}" in text
    assert f"(KL {recs[2]['kl_mean_ptq']:.2f} → {recs[2]['kl_mean']:.2f})" in text
    assert f"LSQ ends at PPL\n{lsq['ppl']:.1f}: {lsq['vs_ptq']:+.3f} ± {lsq['vs_ptq_se']:.3f} against " \
           f"PTQ" in text and lsq["vs_ptq_verdict"] == "higher"
    raw = next(r for r in load_sweep("13_qat")["records"] if r["grid"] == "lsq")
    assert f"loss was {raw['loss_first']:.1f}" in text and f"(loss {raw['loss_last']:.2f})" in text
    assert f"{raw['bpw']:.2f} bits per weight against {recs[3]['bpw']:.1f}" in text


def test_bitnet_statements_match_the_record():
    (r,) = load_sweep("13_bitnet")["records"]
    text = _markdown()
    curve = r["curve"]
    assert [p["step"] for p in curve] == [0, 10, 20, 30, 40] and curve[2]["lam"] == 1.0
    assert f"(validation NLL {curve[0]['nll']:.2f})" in text
    assert f"climbs to {curve[2]['nll']:.1f}, then training pulls it down, to " \
           f"{curve[3]['nll']:.1f} and {curve[4]['nll']:.1f}" in text
    assert curve[4]["nll"] < curve[3]["nll"] < curve[2]["nll"]      # "still falling"
    assert f"BitNet is at PPL {r['ppl']:,.0f}" in text
    assert f"(ΔNLL +{r['delta_nll']:.2f} ± {r['delta_nll_stderr']:.2f}, top-1 agreement\n" \
           f"{r['top1_agreement'] * 100:.0f} %)" in text
    assert f"PPL {r['ppl_ptq'] / 1e7:.1f} × 10⁷\n(ΔNLL +{r['delta_nll_ptq']:.1f}" in text
    assert r["delta_nll_ptq"] + math.log(r["ppl_base"]) > math.log(49152)   # worse than uniform
    assert f"{r['ptq_loss_recovered']:.2f} of the PTQ collapse recovered" in text
    assert f"**{r['size_bytes_linears'] / 2**20:.1f} MiB**" in text
    assert f"the file would be {r['size_bytes'] / 2**20:.1f} MiB" in text
    assert f"({r['size_bytes_embedding'] / 2**20:.1f} MiB, " \
           f"{r['size_bytes_embedding'] / r['size_bytes'] * 100:.0f} %)" in text
    assert "1.60 bits per weight" in text and r["bpw"] == pytest.approx(1.6, abs=1e-3)


def test_pipeline_statements_match_the_record():
    recs = load_sweep("13_pipeline")["records"]
    run = next(r for r in recs if "verdicts" not in r)
    g = next(r for r in recs if "verdicts" in r)
    text = _markdown()
    steps = run["seconds_per_step"]
    assert f"end to end in **{run['seconds']:.0f} s**" in text
    assert sum(steps.values()) <= run["seconds"] <= 15 * 60     # the goal, as recorded
    parts = [f"{k} {v:.0f} s" for k, v in zip(("KD", "LoRA"), list(steps.values())[:2], strict=True)]
    assert all(p in text for p in parts)
    assert f"**{g['size_bytes']:,} bytes** ({g['size_bytes'] / 2**20:.1f}\nMiB)" in text
    assert f"Perplexity {g['ppl']:.2f} against {g['ppl_base']:.2f}, **{g['ppl_ratio']:.3f}×**" in text
    v = g["verdicts"]
    assert f"ΔNLL +{g['delta_nll']:.3f} ± {g['delta_nll_stderr']:.3f}" in text
    assert v["delta_nll"]["verdict"] == "not resolved" and v["delta_nll"]["ok"]
    assert f"accuracy {g['accuracy']:.3f} ± {g['accuracy_se']:.3f}" in text
    assert f"paired +{g['accuracy_delta']:.3f} ± {g['accuracy_delta_se']:.3f}: not resolved" in text
    assert f"{g['decode_tokens_per_s']:.1f} tokens/s against {v['decode_tokens_per_s']['limit']:.0f}" \
           in text
    assert g["within_budget"] and f"(score {g['score']:.1f})" in text
    assert f"KL to fp32 is {g['kl_mean']:.2f} and top-1 agreement {g['top1_agreement'] * 100:.0f} %" \
           in text


def test_pareto_statements_match_the_records():
    from edgellm.lessons import capstone as C

    rows = C.pareto_rows()
    text = _markdown()
    assert f"{len(rows)} recorded results have a size and a quality" in text
    small = [r for r in rows if r["size_bytes"] <= 64 * 2**20]
    assert len(small) == 1 and small[0]["sweep"] == "13_pipeline"
    ok = sorted((r for r in rows if r["ppl_ratio"] <= 1.6), key=lambda r: r["size_bytes"])
    assert ok[0]["sweep"] == "13_pipeline" and "IQ2_XXS" in ok[1]["label"]
    assert f"IQ2_XXS file at {ok[1]['size_bytes'] / 2**20:.1f} MiB ({ok[1]['ppl_ratio']:.2f}×)" in text
    assert Q.within(rows, max_mib=63, max_ppl_ratio=1.6) == []
