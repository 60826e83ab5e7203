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
