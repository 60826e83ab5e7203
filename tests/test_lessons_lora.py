"""Lesson 09's helpers: adapter sizes counted from shapes equal what apply_lora builds, the
training-memory formula, the rows of the recorded runs and the 2-standard-error reading."""

import pytest

from edgellm import tiny_llama
from edgellm.lessons import lora as L
from edgellm.lora.apply import adapter_param_bytes, apply_lora, trainable_params
from edgellm.lora.layers import TARGETS

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("rank", [1, 4])
def test_sizes_from_shapes_equal_the_built_adapter(targets, rank):
    model = tiny_llama()
    row = next(r for r in L.size_rows(model, ranks=(rank,), targets=(targets,)))
    n_base = L.base_params(model)
    apply_lora(model, rank=rank, targets=targets)
    assert row["params"] == trainable_params(model) == L.adapter_params(tiny_llama(), rank, targets)
    assert row["bytes_fp32"] == adapter_param_bytes(model) == 2 * row["bytes_fp16"]
    assert row["share"] == pytest.approx(row["params"] / n_base)


def test_size_table_has_a_line_per_rank():
    text = L.format_size_table(L.size_rows(tiny_llama(), ranks=(1, 2)))
    assert len(text.splitlines()) == 3 and "qv: params" in text and "all: params" in text


def test_training_memory_counts_gradients_and_two_adamw_moments():
    lora = L.training_memory(1000, 10)
    assert lora == {"weights": 4040, "gradients": 40, "adamw_states": 80, "total": 4160}
    full = L.training_memory(0, 1000)
    assert full["total"] == 16 * 1000                     # 4 + 4 + 2·4 bytes per parameter


def test_reading_needs_two_standard_errors():
    se = L.se_bound(0.03, 0.04)
    assert se == pytest.approx(0.05)
    assert L.reading(0.11, se) == "higher" and L.reading(-0.11, se) == "lower"
    assert L.reading(0.09, se) == "not resolved"


def test_run_rows_put_the_base_first_and_mark_the_control():
    rec = {"method": "lora", "rank": 8, "targets": "all", "steps": 60, "accuracy": 0.3,
           "accuracy_se": 0.04, "format_valid": 1.0, "ppl": 3.0, "trainable_params": 10,
           "adapter_bytes": 40, "accuracy_base": 0.1, "accuracy_base_se": 0.03,
           "format_valid_base": 0.8, "ppl_base": 30.0, "base_prompt_style": "fewshot"}
    rows = L.run_rows([rec, {**rec, "shuffle_labels": True, "accuracy": 0.05}])
    assert [r["run"] for r in rows] == ["base, fewshot prompt", "lora r=8 all, 60 steps",
                                        "lora r=8 all, 60 steps (shuffled labels)"]
    assert rows[0]["accuracy"] == 0.1 and rows[0]["record"] is None
    assert "30.0%" in L.format_runs(rows)
    assert L.run_rows([]) == []
    named = L.run_rows([{**rec, "rslora": True, "lr": 3e-4}], show_lr=True)
    assert named[1]["run"] == "rsLoRA r=8 all, 60 steps, lr 0.0003"


def test_side_by_side_lists_every_model_under_each_prompt():
    text = L.side_by_side({"base": ["x", "y"], "LoRA": ["os.path.join", "len"]},
                          ["Join paths.", "Length."], ["os.path.join", "len"], width=6)
    assert text.count("answer") == 2 and "LoRA   os.path.join" in text


def test_lesson_09_states_what_its_records_say():
    """The reading of section 7 (accuracies, differences, verdicts) is what the records give."""
    import json

    from edgellm.paths import root
    from edgellm.results import load_sweep

    recs = load_sweep("09_task")["records"]
    if not recs:
        pytest.skip("09_task not recorded")
    cells = json.loads((root() / "notebooks" / "09_lora.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells)
    lora, shuffled, full = recs
    rows = L.run_rows(recs)
    lines = L.compare(rows, (("lora", "base"), ("full", "lora")))
    assert "-> higher" in lines[0] and "-> not resolved" in lines[1]
    def pm(p, se):
        return f"{100 * p:.1f} % ± {100 * se:.1f}"

    assert pm(lora["accuracy"], lora["accuracy_se"]) in text
    assert pm(lora["accuracy_base"], lora["accuracy_base_se"]) in text
    assert shuffled["accuracy"] == 0 and shuffled["format_valid"] == 1 and "answers **0 %**" in text
    assert pm(full["accuracy"], full["accuracy_se"]) in text
    d = lora["accuracy"] - lora["accuracy_base"]
    assert f"+{100 * d:.1f} ± {100 * L.se_bound(lora['accuracy_se'], lora['accuracy_base_se']):.1f} points" in text
    fn = load_sweep("09_funcname")["records"][0]
    assert f"from {fn['accuracy_base']:.1%} to {fn['accuracy']:.1%}".replace("%", " %") in text


def test_lesson_09_reads_targets_and_rank_as_recorded():
    import json

    from edgellm.paths import root
    from edgellm.results import load_sweep

    t, r = load_sweep("09_targets")["records"], load_sweep("09_rank")["records"]
    task = load_sweep("09_task")["records"]
    if not (t and r and task):
        pytest.skip("not recorded")
    cells = json.loads((root() / "notebooks" / "09_lora.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells)
    acc = {x["targets"]: x["accuracy"] for x in t}
    assert max(acc.values()) - min(acc.values()) < 2 * L.se_bound(t[0]["accuracy_se"], t[1]["accuracy_se"])
    for k, v in acc.items():
        assert f"`{k}` {100 * v:.1f} %" in text
    by_rank = {x["rank"]: x for x in r} | {8: task[0]}
    d14 = by_rank[4]["accuracy"] - by_rank[1]["accuracy"]
    se14 = L.se_bound(by_rank[4]["accuracy_se"], by_rank[1]["accuracy_se"])
    assert L.reading(d14, se14) == "higher" and f"+{100 * d14:.1f} ± {100 * se14:.1f} points" in text
    d = by_rank[32]["accuracy"] - by_rank[8]["accuracy"]
    se = L.se_bound(by_rank[32]["accuracy_se"], by_rank[8]["accuracy_se"])
    assert L.reading(d, se) == "not resolved" and f"+{100 * d:.1f} ± {100 * se:.1f} over rank 8" in text


def test_lesson_09_reads_variants_and_learning_rate_as_recorded():
    import json

    from edgellm.paths import root
    from edgellm.results import load_sweep

    v, lr, task = (load_sweep(n)["records"] for n in ("09_variants", "09_lr", "09_task"))
    if not (v and lr and task):
        pytest.skip("not recorded")
    cells = json.loads((root() / "notebooks" / "09_lora.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells)
    head = task[0]

    def diff(r):
        return r["accuracy"] - head["accuracy"], L.se_bound(r["accuracy_se"], head["accuracy_se"])

    by_lr = {r["lr"]: r for r in lr}
    d, se = diff(by_lr[3e-3])
    assert L.reading(d, se) == "higher" and f"+{100 * d:.1f} ± {100 * se:.1f}" in text
    assert f"**{100 * by_lr[3e-3]['accuracy']:.1f} % ± {100 * by_lr[3e-3]['accuracy_se']:.1f}**" in text
    for low in (1e-4, 3e-4):
        assert L.reading(*diff(by_lr[low])) == "lower"
        assert f"{100 * by_lr[low]['accuracy']:.1f} %" in text
    named = {("rslora" if r.get("rslora") else r["method"]): r for r in v}
    for key in ("rslora", "dora", "pissa"):
        d, se = diff(named[key])
        assert L.reading(d, se) == "not resolved"
        assert f"+{100 * d:.1f} ± {100 * se:.1f}" in text and f"{100 * named[key]['accuracy']:.1f} %" in text
    extra = named["dora"]["trainable_params"] - head["trainable_params"]
    assert f"{extra:,} parameters" in text
