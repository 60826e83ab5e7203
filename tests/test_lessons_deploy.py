"""Lesson 11's helpers, and the lesson's statements against its records."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from edgellm.lessons import deploy as D


@pytest.mark.parametrize("scale", [0.02, 1.0, 300.0])
def test_q4_0_block_by_hand_is_llama_cpps_byte_for_byte(scale):
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = (rng.standard_normal(32) * scale).astype(np.float32)
        d, q = D.q4_0_block(x)
        assert D.pack_q4_0(d, q) == quants.quantize(x.reshape(1, 32), T.Q4_0).tobytes()


def test_q4_0_block_of_zeros_and_of_one_sign():
    z = np.zeros(32, np.float32)
    assert D.pack_q4_0(*D.q4_0_block(z)) == quants.quantize(z.reshape(1, 32), T.Q4_0).tobytes()
    x = np.linspace(0.01, 1.0, 32, dtype=np.float32)
    d, q = D.q4_0_block(x)
    assert d < 0 and q[-1] == 0  # the largest (positive) weight takes the extra level −8
    assert D.pack_q4_0(d, q) == quants.quantize(x.reshape(1, 32), T.Q4_0).tobytes()


def test_verdict_needs_two_standard_errors():
    assert D.verdict(0.03, 0.01) == "higher" and D.verdict(-0.03, 0.01) == "lower"
    assert D.verdict(0.019, 0.01) == "not resolved" and D.verdict(0.5, 0.0) == "not resolved"


def _type_rec(qtype, bpw, dnll, se=0.003, imatrix=None, emb="Q8_0", model="smollm2-135m"):
    return {"type": qtype, "bpw": bpw, "size_bytes": int(bpw * 1e7), "model": model,
            "imatrix": imatrix, "token_embedding_type": emb, "type_counts": {qtype: 210},
            "ppl": 8 * np.exp(dnll), "ppl_base": 8.0, "delta_nll": dnll, "delta_nll_stderr": se,
            "kl_mean": dnll, "top1_agreement": 0.9, "n_tokens": 8190}


def test_type_rows_label_and_filter_and_table():
    recs = [_type_rec("Q4_0", 4.5, 0.1), _type_rec("Q4_0", 4.5, 0.08, imatrix="m.gguf"),
            _type_rec("Q4_K_M", 5.5, 0.05, emb=None), _type_rec("F32", 32, 0.0, emb=None),
            _type_rec("Q4_0", 4.5, 0.2, model="smollm2-135m-degrid")]
    rows = D.type_rows(recs, "smollm2-135m")
    assert [r["label"] for r in rows] == ["Q4_0", "Q4_0+imatrix",
                                          "Q4_K_M (llama.cpp's embedding)", "F32"]
    assert rows[2]["default_embedding"] and not rows[3]["default_embedding"]
    table = D.format_type_table(rows)
    assert table.splitlines()[2].startswith("F32") and "Q4_0×210" in table


def test_compare_adds_the_errors_in_quadrature():
    a = {**D.type_rows([_type_rec("Q4_0", 4.5, 0.10, se=0.003)])[0], "label": "a"}
    b = {**D.type_rows([_type_rec("Q4_0", 4.5, 0.11, se=0.004)])[0], "label": "b"}
    assert "-0.0100 ± 0.0050" in D.compare(a, b) and "not resolved" in D.compare(a, b)


def test_runtime_rows_and_first_divergence():
    rec = {"protocol": "runtime", "runtime": "llamacpp", "model": "build/11/rt-Q4_K_M.gguf",
           "threads": 1, "size_bytes": 2**20, "bytes_per_token": 2**20,
           "decode_bound_tokens_per_s": 100.0, "prefill_bound_tokens_per_s": 500.0,
           "peak_rss_bytes": 2**30, "load_s": 0.1, "ttft_s": 0.2, "generated_ids": [1, 2, 3],
           "prefill_tokens_per_s": 300.0, "decode_tokens_per_s": 70.0, "fraction_of_bound": 0.7,
           "llama_bench": {"prefill_tokens_per_s": 320.0, "decode_tokens_per_s": 75.0,
                           "fraction_of_bound": 0.75}}
    rows = D.runtime_rows([rec, {"protocol": "roofline"}])
    assert [r["name"] for r in rows] == ["llama.cpp Q4_K_M", "llama-bench Q4_K_M"]
    assert "70%" in D.format_runtime_table(rows)
    assert D.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert D.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert D.first_divergence([1, 2], [1, 2, 3]) == 2


def test_runtime_names_and_quality_join():
    assert D.runtime_name({"runtime": "onnxruntime", "model": "build/11/rt-int8-keep-down.onnx"}) \
        == "ONNX Runtime int8-keep-down"
    assert D.runtime_name({"runtime": "executorch", "model": "rt-8da4w.pte"}) == "ExecuTorch 8da4w"
    assert D.runtime_name({"runtime": "llamacpp", "model": "b/rt-gptq-Q4_0.gguf"}) \
        == "llama.cpp gptq-Q4_0"
    assert D.runtime_name({"runtime": "bnb", "model": "smollm2-135m"}) == "bitsandbytes NF4"
    export = {"format": "onnx", "runtime": "onnxruntime", "out": "build/11/rt-int8.onnx",
              "ppl": 16.5, "delta_nll": 0.53, "delta_nll_stderr": 0.013, "kl_mean": 0.54,
              "top1_agreement": 0.655}
    types = D.type_rows([_type_rec("Q4_0", 4.5, 0.19), _type_rec("Q4_0", 4.5, 0.07, imatrix="m"),
                         _type_rec("Q4_K_M", 5.5, 0.05, emb=None)])
    q = D.runtime_quality([export, {"protocol": "runtime"}], types)
    assert q["ONNX Runtime int8"]["delta_nll"] == 0.53 and q["ONNX Runtime int8"]["se"] == 0.013
    assert q["llama.cpp Q4_0"]["delta_nll"] == 0.19          # not the imatrix file
    assert "llama.cpp Q4_K_M" not in q                       # llama.cpp's own embedding type
    table = D.format_quality_table(q, ["torch eager fp32", "ONNX Runtime int8", "llama-bench Q4_0",
                                       "ExecuTorch fp32"])
    lines = table.splitlines()
    assert "reference" in lines[2] and "+0.5300 ± 0.0130" in lines[3] and "higher" in lines[3]
    assert "+0.1900" in lines[4] and "not measured" in lines[5]


# ---------------------------------------------------------------------------------------------
# the lesson's statements against its records

def _markdown(path="notebooks/11_deployment.ipynb") -> str:
    import json
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / path).read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    return " ".join(text.split())        # a number may be wrapped across lines


def _type(model, qtype, *, imatrix=False, emb="Q8_0"):
    from edgellm.results import load_records

    hits = [r for r in load_records("11_types") if r["model"] == model and r["type"] == qtype
            and bool(r.get("imatrix")) == imatrix
            and (r.get("token_embedding_type") == emb or qtype in ("Q8_0", "F32"))]
    assert len(hits) == 1, (model, qtype, imatrix)
    return hits[0]


def _pm(r, nd):
    return f"{r['delta_nll']:+.{nd}f} ± {r['delta_nll_stderr']:.{nd}f}"


DEFAULT, CONTROL = "smollm2-135m", "smollm2-135m-degrid"


def test_section5_numbers_are_the_records():
    import math

    md = _markdown()
    claims = [(DEFAULT, "Q4_1", False, 4), (DEFAULT, "Q8_0", False, 4), (DEFAULT, "Q5_0", False, 3),
              (DEFAULT, "Q5_K_M", False, 3), (DEFAULT, "Q3_K_M", False, 3),
              (DEFAULT, "Q4_0", False, 3), (DEFAULT, "Q2_K", False, 3),
              (DEFAULT, "IQ4_NL", False, 3), (DEFAULT, "Q4_0", True, 3),
              (DEFAULT, "Q4_K_M", True, 3), (DEFAULT, "Q3_K_M", True, 3), (DEFAULT, "Q2_K", True, 3),
              (CONTROL, "Q8_0", False, 4), (CONTROL, "Q6_K", False, 3), (CONTROL, "Q5_K_M", False, 3),
              (CONTROL, "Q4_K_M", False, 3), (CONTROL, "Q5_0", False, 3), (CONTROL, "Q4_1", False, 3),
              (CONTROL, "Q4_0", False, 3), (CONTROL, "Q2_K", False, 3), (CONTROL, "Q4_0", True, 3),
              (CONTROL, "Q3_K_M", True, 3), (CONTROL, "Q2_K", True, 3), (CONTROL, "IQ2_XS", True, 3)]
    for model, qtype, imatrix, nd in claims:
        text = _pm(_type(model, qtype, imatrix=imatrix), nd)
        assert text in md, (model, qtype, imatrix, text)
    assert f"{_type(DEFAULT, 'Q3_K_M')['bpw']:.2f} bpw" in md
    assert f"{_type(DEFAULT, 'Q2_K')['bpw']:.2f} bpw" in md
    assert f"{_type(CONTROL, 'IQ2_XS', imatrix=True)['bpw']:.2f} bpw" in md
    # the claims of order the reading makes
    assert _type(DEFAULT, "Q4_1")["delta_nll"] < 0.01 < _type(DEFAULT, "Q5_0")["delta_nll"]
    assert _type(DEFAULT, "Q3_K_M")["delta_nll"] + 2 * 0.011 < _type(DEFAULT, "Q4_0")["delta_nll"]
    assert _type(CONTROL, "Q4_1")["delta_nll"] > 0.1
    q4, q2 = _type(CONTROL, "Q4_0"), _type(CONTROL, "Q2_K")
    a, b = {**q4, "se": q4["delta_nll_stderr"]}, {**q2, "se": q2["delta_nll_stderr"]}
    assert D.verdict(b["delta_nll"] - a["delta_nll"], math.hypot(a["se"], b["se"])) == \
        "not resolved"
    assert f"{b['delta_nll'] - a['delta_nll']:+.3f} ± {math.hypot(a['se'], b['se']):.3f}" in md
    both = _type(DEFAULT, "Q4_K_M"), _type(DEFAULT, "Q4_K_M", emb=None)
    assert both[0]["size_bytes"] == both[1]["size_bytes"] and both[0]["ppl"] == both[1]["ppl"]


def test_section6_numbers_are_the_records():
    import math

    from edgellm.results import load_records

    md = _markdown()
    ours = {(r["model"], r["method"], r["sym"]): r["gguf"] for r in load_records("11_ours")}
    for model in (DEFAULT, CONTROL):
        q4_0 = _type(model, "Q4_0")
        for method in ("rtn", "gptq", "awq"):
            g = ours[(model, method, True)]
            diff = g["delta_nll"] - q4_0["delta_nll"]
            se = math.hypot(g["delta_nll_stderr"], q4_0["delta_nll_stderr"])
            verdict = D.verdict(diff, se)
            if (model, method) in ((DEFAULT, "awq"), (DEFAULT, "gptq"), (DEFAULT, "rtn"),
                                   (CONTROL, "rtn")):
                text = f"{diff:+.3f} ± {se:.3f}".replace("-", "−")
                assert text in md, (model, method, text)
            assert verdict == {"awq": "lower", "gptq": "higher" if model == DEFAULT else "lower",
                               "rtn": "higher"}[method], (model, method, verdict)
    rel = sorted((g["ppl"] / g["ppl_simulated"] - 1, k) for k, g in ours.items())
    assert sum(r <= 0.005 for r, _ in rel) == 6
    # within 0.5 % beyond two standard errors of the paired ΔNLL, and not resolved either way
    limit = math.log(1.005)
    d = [(g["delta_nll_vs_simulated"], g["delta_nll_stderr_vs_simulated"]) for g in ours.values()]
    assert sum(m + 2 * se < limit for m, se in d) == 5
    assert not any(m - 2 * se > limit for m, se in d)
    gptq, rtn = ours[(DEFAULT, "gptq", True)], ours[(DEFAULT, "rtn", True)]
    gain, gain_se = rtn["delta_nll"] - gptq["delta_nll"], math.hypot(
        rtn["delta_nll_stderr"], gptq["delta_nll_stderr"])
    assert D.verdict(gain, gain_se) == "not resolved"
    assert f"{gain:.3f} ± {gain_se:.3f} of it (not resolved)" in md
    assert f"+{100 * rel[-1][0]:.2f} %" in md and f"+{100 * rel[-2][0]:.3f} %" in md
    g = ours[(CONTROL, "rtn", False)]
    assert f"{g['delta_nll_vs_simulated']:+.4f} ± {g['delta_nll_stderr_vs_simulated']:.4f}" in md


def test_section7_numbers_are_the_records():
    from edgellm.results import load_records

    md = _markdown()
    rt = load_records("11_runtimes")
    rows = D.runtime_rows(rt)
    row = {(r["name"], r["threads"]): r for r in rows}
    for name, pct in (("llama-bench F32", "110 %"), ("llama-bench F16", "94 %"),
                      ("llama-bench Q8_0", "58 %"), ("llama-bench Q4_K_M", "40 %"),
                      ("llama-bench Q4_0", "50 %"), ("llama-bench IQ4_XS", "36 %"),
                      ("llama-bench gptq-Q4_0", "68 %"), ("ONNX Runtime fp32", "96 %"),
                      ("ExecuTorch fp32", "48 %"), ("ExecuTorch 8da4w", "11 %"),
                      ("torch eager fp32", "68 %"), ("bitsandbytes NF4", "30 %"),
                      ("torchao int8 (w)", "20 %"), ("ONNX Runtime int8", "30 %"),
                      ("ONNX Runtime int8-keep-down", "46 %")):
        r = row[(name, 1)]
        assert f"{r['decode']:.1f}" in md and f"{100 * r['fraction']:.0f} %" == pct, name
        assert pct in md, name
    for name in ("llama-bench Q8_0", "llama-bench Q4_0", "llama-bench F32"):
        assert f"{100 * row[(name, 2)]['fraction']:.0f} %" in md, name
    assert row[("llama-bench Q4_0", 1)]["fraction"] < 0.7  # the goal the lesson says is not met
    assert row[("ExecuTorch 8da4w", 2)]["decode"] < 1.05 * row[("ExecuTorch 8da4w", 1)]["decode"]
    for t, text, resid in ((1, "15.6 GB/s + 13.6 ms", 0.09), (2, "32.1 GB/s + 8.4 ms", 0.08)):
        lb = [r for r in rows if r["threads"] == t and r["name"].startswith("llama-bench")]
        f = D.fit_time_per_token(lb)
        assert len(lb) == 7
        assert f"{f['bandwidth_eff_bytes_per_s'] / 1e9:.1f} GB/s + {f['t0_s'] * 1e3:.1f} ms" == text
        assert text in md and f["max_rel_residual"] < resid
    roof = {r["threads"]: r for r in rt if r.get("protocol") == "roofline"}
    assert f"{roof[1]['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s" in md
    assert f"{row[('ONNX Runtime int8', 1)]['prefill']:.0f} tokens/s" in md
    torch_ids = row[("torch eager fp32", 1)]["generated_ids"]
    div = {n: D.first_divergence(row[(n, 1)]["generated_ids"], torch_ids)
           for n in ("llama.cpp F32", "llama.cpp F16", "llama.cpp Q8_0", "llama.cpp Q4_K_M",
                     "llama.cpp Q4_0", "llama.cpp IQ4_XS", "llama.cpp gptq-Q4_0",
                     "ONNX Runtime fp32", "ONNX Runtime int8", "ONNX Runtime int8-keep-down",
                     "ExecuTorch fp32", "ExecuTorch 8da4w", "torchao int8 (w)",
                     "bitsandbytes NF4")}
    assert div == {"llama.cpp F32": None, "llama.cpp F16": None, "llama.cpp Q8_0": 29,
                   "llama.cpp Q4_K_M": 10, "llama.cpp Q4_0": 10, "llama.cpp IQ4_XS": 3,
                   "llama.cpp gptq-Q4_0": 4, "ONNX Runtime fp32": None, "ONNX Runtime int8": 0,
                   "ONNX Runtime int8-keep-down": 7, "ExecuTorch fp32": None,
                   "ExecuTorch 8da4w": 10, "torchao int8 (w)": 3, "bitsandbytes NF4": 0}


def test_section7_quality_of_the_exported_runtimes_is_the_records():
    """The ONNX / ExecuTorch exports against PyTorch fp32 on the lesson's 8,192 tokens."""
    from edgellm.results import load_records

    md = _markdown()
    ex = {(r["format"], r["type"]): r for r in load_records("11_runtimes")
          if r.get("format") in ("onnx", "executorch")}
    for key in (("onnx", "fp32"), ("executorch", "fp32")):
        r = ex[key]
        assert abs(r["delta_nll"]) < 1e-5 and r["top1_agreement"] == 1.0 and r["n_tokens"] >= 8000
    for key, text in ((("onnx", "int8"), "+0.530 ± 0.013"),
                      (("onnx", "int8-keep-down"), "+0.060 ± 0.004"),
                      (("executorch", "8da4w"), "+0.455 ± 0.012")):
        assert _pm(ex[key], 3) == text and text in md, key
        assert D.verdict(ex[key]["delta_nll"], ex[key]["delta_nll_stderr"]) == "higher"
    assert f"top-1 {100 * ex[('onnx', 'int8')]['top1_agreement']:.0f} %" in md
