"""Lesson 03's results helpers (table, ordering with standard errors, widget text, plot) on
synthetic records, and the recorded sweeps' shape when they have been run."""

import math

import pytest

from edgellm.lessons import weight_quant as compare


def _rec(method, bits, g, dn, se, lossless=False):
    return {"method": method, "bits": bits, "group_size": g, "bpw": bits + (32 / g if g else 0.06),
            "size_bytes_linears": 1e6, "ppl": 10 * math.exp(dn), "ppl_stderr": 0.5, "ppl_base": 10.0,
            "delta_ppl": 10 * math.exp(dn) - 10, "delta_nll": dn, "delta_nll_stderr": se,
            "kl_mean": 0.0 if lossless else dn / 2, "top1_agreement": 0.9, "lossless": lossless}


RECORDS = [_rec("rtn", 3, 64, 0.40, 0.02), _rec("gptq", 3, 64, 0.20, 0.02),
           _rec("awq", 3, 64, 0.39, 0.02), _rec("imatrix", 3, 64, 0.50, 0.02),
           _rec("rtn", 4, 32, 0.0, 0.0, lossless=True)]


def test_ordering_verdicts_use_the_stderr_bound():
    o = {r["method"]: r for r in compare.ordering(RECORDS, 3, 64)}
    assert o["gptq"]["verdict"] == "below" and o["gptq"]["diff_nll"] == pytest.approx(-0.2)
    assert o["gptq"]["stderr_bound"] == pytest.approx(math.hypot(0.02, 0.02))
    assert o["awq"]["verdict"] == "tie" and o["imatrix"]["verdict"] == "above"
    assert compare.ordering(RECORDS, 8, 64) == []


def test_table_and_describe():
    rows = compare.table(RECORDS)
    assert rows[0]["lossless"] and rows[0]["group"] == "g32"  # more bits first
    assert [r["method"] for r in rows][1:] == ["rtn", "gptq", "awq", "imatrix"]
    text = compare.format_table(rows)
    assert "lossless" in text and "gptq" in text
    d = compare.describe(RECORDS, "gptq", 3, 64)
    assert "vs RTN" in d and "below" in d
    assert "not recorded" in compare.describe(RECORDS, "awq", 2, None)
    assert "lossless" in compare.describe(RECORDS, "rtn", 4, 32)
    assert compare.select(RECORDS, "rtn", 4, None) is None


def test_plot_marks_lossless_points():
    import matplotlib

    matplotlib.use("Agg")
    fig = compare.plot_tradeoff(RECORDS, kl_floor=1e-6)
    ax_kl = fig.axes[1]
    assert ax_kl.get_yscale() == "log"
    assert any(t.get_text() == "lossless" for t in ax_kl.texts)
    assert min(ax_kl.get_ylim()) <= 1e-6


def test_recorded_sweeps_are_well_formed():
    records = compare.load_results()
    for r in records:
        assert {"method", "bits", "group_size", "bpw", "ppl", "ppl_base", "kl_mean",
                "delta_nll", "delta_nll_stderr", "command"} <= set(r)
        assert r["command"].startswith("edgellm quantize")
    lossless = compare.select(records, "rtn", 4, 32)
    if lossless is not None:  # the Q4_1 provenance: asymmetric 4-bit g32 RTN reproduces the model
        assert lossless.get("max_abs_weight_change", 0.0) == 0.0
        assert abs(lossless["delta_nll"]) < 1e-4 and lossless["kl_mean"] < 1e-6


def test_mixed_and_gguf_records_get_their_own_labels():
    mixed = {**_rec("rtn", 4, 64, 0.3, 0.02), "bpw_budget": 3.5, "bpw": 3.49}
    q4 = {**_rec("gguf", 4, 32, 0.1, 0.01), "type": "Q4_0"}
    records = [*RECORDS, mixed, q4]
    assert compare.select(records, "rtn", 4, 64) is None      # mixed is not uniform RTN
    assert compare.select(records, "rtn-mixed", 4, 64) is mixed
    assert compare.select(records, "Q4_0", 4, 32) is q4
    assert (3, 64) in compare.settings(records) and (4, 32) in compare.settings(records)
    labels = [r["method"] for r in compare.table(records)]
    assert "rtn-mixed" in labels and "Q4_0" in labels
    import matplotlib

    matplotlib.use("Agg")
    fig = compare.plot_tradeoff(records)
    assert fig.axes[0].get_yscale() == "symlog"
    assert any(t.get_text() == "Q4_0" for t in fig.axes[1].texts)
