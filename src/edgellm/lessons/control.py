"""Lessons 03–04: the de-gridded control model beside the default, record by record.

The default model's weights came on a Q4_1 grid (:mod:`edgellm.controls`); ``results/03_control``
re-runs the headline commands with ``--model smollm2-135m-degrid``.  Here each control record is
matched with the default's record of the same command, and every ordering of two methods at one
setting is judged on both models with the same conservative rule: a difference beyond two bounds
``√(se_a² + se_b²)`` is an ordering, inside them it is not resolved.  An ordering that differs
between the two models is a provenance artefact of the Q4_1 source; one that agrees holds.
"""

from __future__ import annotations

import math

from edgellm.lessons.weight_quant import group_label, method_label

CONTROL_SWEEP = "03_control"


def load(default_sweeps=None) -> tuple[list[dict], dict]:
    """(the default model's records of lessons 03/04, the control sweep)."""
    from edgellm.lessons.weight_quant import load_results
    from edgellm.results import load_records, load_sweep

    default = load_results(default_sweeps)
    try:
        default += load_records("04_rotate")
    except FileNotFoundError:
        pass
    return default, load_sweep(CONTROL_SWEEP)


def without_model(command: str) -> str:
    """A recorded command with its ``--model NAME`` removed (the default model's command)."""
    words = command.split()
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "--model":
            skip = True
        elif not w.startswith("--model="):
            out.append(w)
    return " ".join(out)


def control_rows(default_records: list[dict], control_sweep: dict) -> list[dict]:
    """One row per command of the control sweep: the setting, the default model's record of the
    same command (or None) and the control's (None while the sweep is pending)."""
    by_cmd = {r["command"]: r for r in default_records}
    got = {r["command"]: r for r in control_sweep.get("records", [])}
    rows = []
    for cmd in control_sweep["commands"]:
        d, c = by_cmd.get(without_model(cmd)), got.get(cmd)
        r = c or d
        label = method_label(r) if r else cmd.split("--method ")[1].split()[0]
        rows.append({"command": cmd, "label": label, "bits": r and r.get("bits"),
                     "group": group_label(r.get("group_size")) if r else "",
                     "default": d, "control": c})
    return rows


def _cell(r):
    if r is None:
        return "-"
    return f"{r['delta_nll']:+.4f} ± {r['delta_nll_stderr']:.4f}"


def format_control_rows(rows: list[dict]) -> str:
    head = f"{'method':<10} {'bits':>4} {'group':>7} {'ΔNLL default':>19} {'ΔNLL control':>19}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<10} {str(r['bits'] or ''):>4} {r['group']:>7} "
                     f"{_cell(r['default']):>19} {_cell(r['control']):>19}")
    return "\n".join(lines)


def pair_verdict(a: dict, b: dict) -> str:
    """``a`` vs ``b`` by ΔNLL with the conservative bound √(se_a² + se_b²): ``<``, ``>`` or ``≈``
    (inside 2 bounds: not resolved)."""
    d = a["delta_nll"] - b["delta_nll"]
    se = math.hypot(a["delta_nll_stderr"], b["delta_nll_stderr"])
    return "<" if d < -2 * se else ">" if d > 2 * se else "≈"


def control_orderings(rows: list[dict]) -> list[dict]:
    """Every pair of rows at the same (bits, group), and every pair of llama.cpp block formats
    (across bit widths: does more bits mean less loss?), that both models recorded: the verdict on the
    default model and on the control, and whether it changed (a provenance artefact) or held."""
    out = []
    done = [r for r in rows if r["default"] and r["control"]]
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            both_gguf = a["label"].startswith("Q") and b["label"].startswith("Q")
            if (a["bits"], a["group"]) != (b["bits"], b["group"]) and not both_gguf:
                continue
            vd = pair_verdict(a["default"], b["default"])
            vc = pair_verdict(a["control"], b["control"])
            out.append({"pair": f"{a['label']} vs {b['label']}", "bits": a["bits"],
                        "group": a["group"], "default": vd, "control": vc,
                        "status": "holds" if vd == vc else "changes"})
    return out
