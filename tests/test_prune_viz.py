"""The lesson's views over recorded ``edgellm prune`` records: the sparsity curve, the
structured table (before / after recovery) and the contextual 2×2 table."""

import matplotlib
import pytest

from edgellm.lessons.pruning import contextual_table, plot_sweep, structured_rows, sweep_points
from edgellm.prune import PruneError

matplotlib.use("Agg")


def _rec(method, sparsity, ppl, nm=None, **kw):
    return {"method": method, "sparsity": sparsity, "ppl": ppl, "ppl_base": 9.5, "nm": nm,
            "structured": None, **kw}


CURVE = [_rec("magnitude", 0.5, 240.0), _rec("magnitude", 0.1, 9.8),
         _rec("wanda", 0.5, 19.5, calib="pydoc", data="pydoc"),
         _rec("wanda", 0.3, 11.0, calib="pydoc", data="pydoc"),
         _rec("wanda", 0.5, 55.8, nm="2:4", calib="pydoc", data="pydoc"),
         _rec("wanda", 0.5, 30.0, nm="4:8", calib="pydoc", data="pydoc"),
         _rec("wanda", 0.5, 99.0, calib="stdlib", data="pydoc"),  # contextual: not on the curve
         _rec("wanda", 0.5, 77.0, calib="pydoc", data="pydoc")]  # a repeat: the first one counts


def test_sweep_points_skip_cross_domain_and_repeats():
    pts = sweep_points(CURVE)
    assert pts["wanda"] == [(0.3, 11.0), (0.5, 19.5)]
    assert pts["magnitude"] == [(0.1, 9.8), (0.5, 240.0)]
    assert pts["wanda 2:4"] == [(0.5, 55.8)] and pts["wanda 4:8"] == [(0.5, 30.0)]
    assert pts["dense"] == [(0.0, 9.5)]


def test_plot_sweep_log_scale_lines_and_nm_markers():
    ax = plot_sweep(CURVE, live={"sparsity": 0.5, "ppl": 20.0, "label": "live"})
    assert ax.get_yscale() == "log"
    by_label = {line.get_label(): line for line in ax.get_lines()}
    assert {"magnitude", "wanda", "wanda 2:4", "wanda 4:8", "live"} <= set(by_label)
    assert by_label["wanda"].get_linestyle() == "-"
    assert by_label["wanda 2:4"].get_linestyle() == "None"  # N:M: a marker, not a line
    assert by_label["wanda 2:4"].get_color() == by_label["wanda"].get_color()
    assert by_label["wanda 2:4"].get_marker() != by_label["wanda 4:8"].get_marker()
    assert list(by_label["wanda"].get_ydata()) == [11.0, 19.5]
    matplotlib.pyplot.close("all")


def test_structured_rows_before_and_after_recovery():
    base = {"n_params_base": 100, "ppl_base": 9.5, "prefill_tokens_per_s_base": 50.0}
    recs = [{**base, "structured": "layers", "ratio": 0.2, "n_params": 80, "size_bytes": 320,
             "prefill_tokens_per_s": 60.0, "speedup": 1.25, "ppl": 21.0,
             "ppl_before_recovery": 25.0, "recover_steps": 10, "ppl_control": 8.9},
            {**base, "structured": "channels", "ratio": 0.1, "n_params": 90, "size_bytes": 360,
             "prefill_tokens_per_s": 55.0, "ppl": 12.0},
            _rec("wanda", 0.5, 19.5)]  # unstructured: not a row
    rows = structured_rows(recs)
    assert [r["removed"] for r in rows] == ["channels 10%", "layers 20%"]
    layers = rows[1]
    assert layers["ppl_pruned"] == 25.0 and layers["ppl_recovered"] == 21.0
    assert layers["ppl_control"] == 8.9 and layers["params_%"] == 80.0
    assert layers["speedup"] == 1.25  # the paired protocol's median of per-pair ratios
    assert rows[0]["speedup"] == pytest.approx(1.1)  # older records: ratio of the two tokens/s
    assert rows[0]["ppl_pruned"] == 12.0 and rows[0]["ppl_recovered"] is None


def test_contextual_table_two_by_two():
    recs = [_rec("wanda", 0.5, p, calib=c, data=d, ppl_base=b) for c, d, p, b in
            [("pydoc", "pydoc", 19.5, 9.5), ("pydoc", "stdlib", 8.0, 3.0),
             ("stdlib", "pydoc", 30.0, 9.5), ("stdlib", "stdlib", 5.0, 3.0)]]
    t = contextual_table(recs)
    assert t == {"dense": {"pydoc": 9.5, "stdlib": 3.0}, "pydoc": {"pydoc": 19.5, "stdlib": 8.0},
                 "stdlib": {"pydoc": 30.0, "stdlib": 5.0}}
    with pytest.raises(PruneError, match="--eval"):
        contextual_table([{**recs[0], "ppl": None}])


def test_allocation_rows_pair_each_allocated_run_with_its_uniform_run():
    from edgellm.lessons.pruning import allocation_rows

    uniform = [{"method": "wanda", "nm": None, "structured": None, "sparsity_target": s,
                "n_tokens": 8176, "data": "pydoc", "ppl": p, "delta_nll": d,
                "delta_nll_stderr": 0.01} for s, p, d in ((0.5, 12.0, 0.20), (0.7, 60.0, 1.80))]
    sens = {str(i): 0.01 * ((7 * i) % 30) for i in range(30)}
    allocated = [{"sparsity_target": 0.5, "spread": 0.1, "ppl": 11.0, "delta_nll": 0.15,
                  "delta_nll_stderr": 0.01, "sensitivity": sens, "sparsity": 0.5,
                  "n_tokens": 8176, "data": "pydoc"},
                 {"sparsity_target": 0.7, "spread": 0.1, "ppl": 59.0, "delta_nll": 1.79,
                  "delta_nll_stderr": 0.01, "sensitivity": sens, "sparsity": 0.7,
                  "n_tokens": 8176, "data": "pydoc"}]
    a, b = allocation_rows(allocated, uniform)
    assert a["ppl_uniform"] == 12.0 and a["diff"] == pytest.approx(-0.05)
    assert a["verdict"] == "allocation better"          # 0.05 > 2 · √2 · 0.01
    assert b["verdict"] == "not resolved"               # 0.01 < 0.028
    assert a["least_sensitive"][0] == 0 and len(a["most_sensitive"]) == 3
    assert "diff" not in allocation_rows(allocated, uniform[:0])[0]
