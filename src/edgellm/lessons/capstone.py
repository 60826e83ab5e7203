"""The capstone's table and figure: every recorded result of ``results/`` on one Pareto plot
(bytes vs perplexity vs decode speed) with the device budgets drawn, and the best recorded recipe
per budget.  Pure: reads the records, loads no model.

A point is a record with a size (``size_bytes``) and a quality (``ppl`` with ``ppl_base``, or a
``delta_nll``); its quality is the perplexity ratio to the record's own reference
(``ppl / ppl_base``, or ``exp(ΔNLL)``), so that records scored on different tokens still share an
axis (the budgets' floor is such a ratio).  A record's decode speed is its own
``decode_tokens_per_s``, or that of a benchmark record of the same sweep that ran the same file.
"""

from __future__ import annotations

import math


def _quality(r: dict) -> float | None:
    if r.get("ppl") and r.get("ppl_base"):
        return r["ppl"] / r["ppl_base"]
    if r.get("delta_nll") is not None:
        return math.exp(r["delta_nll"])
    return None


# flags every evaluation repeats: left out of a point's label, with their values
_QUIET_FLAGS = {"--json": 0, "--eval": 0, "--data": 1, "--protocol": 1, "--ctx": 1,
                "--max-tokens": 1, "--threads": 1, "--split": 1, "--eval-batch-size": 1,
                "--out": 1}


def _label(r: dict, sweep: str) -> str:
    words, kept, i = r.get("command", "").split()[1:], [], 0
    while i < len(words):
        skip = _QUIET_FLAGS.get(words[i])
        if skip is None:
            kept.append(words[i])
        i += 1 + (skip or 0)
    return f"{sweep}: " + " ".join(kept[:10])


def pareto_rows(sweeps: dict[str, list[dict]] | None = None) -> list[dict]:
    """One row per recorded result with a size and a quality (module docstring), from
    ``sweeps`` (``{name: records}``; default: every sweep of ``results/``): ``sweep``, ``label``,
    ``size_bytes``, ``ppl``, ``ppl_ratio``, ``decode_tokens_per_s`` (None where not measured),
    ``accuracy``, ``budget`` / ``within_budget`` / ``score`` for graded records, ``command``."""
    if sweeps is None:
        from edgellm.results import load_records, sweep_names

        sweeps = {name: load_records(name) for name in sweep_names()}
    rows = []
    for sweep, records in sorted(sweeps.items()):
        speed_of = {str(r["model"]): r["decode_tokens_per_s"] for r in records
                    if r.get("decode_tokens_per_s") and r.get("model")}
        for r in records:
            q = _quality(r)
            if not r.get("size_bytes") or q is None:
                continue
            decode = r.get("decode_tokens_per_s") or speed_of.get(str(r.get("out")))
            rows.append({"sweep": sweep, "label": _label(r, sweep), "size_bytes": r["size_bytes"],
                         "ppl": r.get("ppl"), "ppl_ratio": q, "decode_tokens_per_s": decode,
                         "accuracy": r.get("accuracy"), "budget": r.get("budget"),
                         "within_budget": r.get("within_budget"), "score": r.get("score"),
                         "command": r.get("command")})
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats in both size and perplexity ratio, smallest first."""
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r["size_bytes"], r["ppl_ratio"])):
        if r["ppl_ratio"] < best:
            front.append(r)
            best = r["ppl_ratio"]
    return front


def meets(row: dict, budget) -> bool:
    """Whether a row meets every criterion of ``budget`` that it measured (size and perplexity
    always; decode speed and accuracy where recorded; a graded record: its own verdict)."""
    if row.get("budget") == budget.name and row.get("within_budget") is not None:
        return bool(row["within_budget"])
    if row["size_bytes"] > budget.max_bytes or row["ppl_ratio"] > budget.max_ppl_ratio:
        return False
    d = row.get("decode_tokens_per_s")
    return d is None or d >= budget.min_decode_tokens_per_s


def best_per_budget(rows: list[dict] | None = None) -> dict[str, dict | None]:
    """``{budget name: row}``: the best graded recipe within each budget (highest score), or
    None where no recorded recipe was graded within it."""
    from edgellm.pipeline.budgets import BUDGETS

    rows = pareto_rows() if rows is None else rows
    out = {}
    for name in BUDGETS:
        graded = [r for r in rows if r.get("budget") == name and r.get("within_budget")]
        out[name] = max(graded, key=lambda r: r.get("score") or 0.0, default=None)
    return out


def plot_pareto(rows: list[dict] | None = None, *, ax=None, title: str = ""):
    """Bytes (log) against the perplexity ratio to fp32 (log), coloured by decode tokens/s at
    the record's threads (grey: not measured), the Pareto front drawn, each budget's size and
    perplexity limits as dashed lines and the graded recipes starred; ratios above 4 are left
    out of the frame (the title counts them).  Returns the figure."""
    import matplotlib.pyplot as plt

    from edgellm.lessons.common import new_figure
    from edgellm.pipeline.budgets import BUDGETS

    rows = pareto_rows() if rows is None else rows
    fig, ax = new_figure((8, 4.5)) if ax is None else (ax.figure, ax)
    timed = [r for r in rows if r["decode_tokens_per_s"]]
    untimed = [r for r in rows if not r["decode_tokens_per_s"]]
    ax.scatter([r["size_bytes"] for r in untimed], [r["ppl_ratio"] for r in untimed], s=14,
               color="0.7", label="decode speed not recorded")
    if timed:
        sc = ax.scatter([r["size_bytes"] for r in timed], [r["ppl_ratio"] for r in timed],
                        c=[r["decode_tokens_per_s"] for r in timed], cmap="viridis", s=40,
                        marker="o", edgecolors="k", linewidths=0.3)
        fig.colorbar(sc, ax=ax, label="decode tokens/s")
    graded = [r for r in rows if r.get("budget")]
    ax.scatter([r["size_bytes"] for r in graded], [r["ppl_ratio"] for r in graded], s=160,
               marker="*", facecolors="none", edgecolors="C3", label="graded recipe")
    front = pareto_front(rows)
    ax.plot([r["size_bytes"] for r in front], [r["ppl_ratio"] for r in front], "-", color="C1",
            alpha=0.6, label="Pareto front (size, PPL)")
    for i, b in enumerate(BUDGETS.values()):
        ax.axvline(b.max_bytes, ls="--", color=f"C{i + 2}", lw=1)
        ax.axhline(b.max_ppl_ratio, ls="--", color=f"C{i + 2}", lw=1,
                   label=f"{b.name}: ≤ {b.max_bytes / 2**20:.0f} MiB, PPL ≤ {b.max_ppl_ratio}× "
                         f"fp32, ≥ {b.min_decode_tokens_per_s:.0f} tok/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    top = 4.0   # the broken points (2-bit, 50 % pruned: up to 10^6×) would flatten the rest
    above = sum(r["ppl_ratio"] > top for r in rows)
    ax.set_ylim(0.9, top)
    ax.set_xlabel("bytes (file or packed size)")
    ax.set_ylabel("PPL / PPL of its fp32 reference")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or f"every recorded result (results/*.json; {above} above "
                          f"{top:.0f}× not shown)")
    plt.close(fig)
    return fig


def format_rows(rows: list[dict], limit: int = 20) -> str:
    """A text table of ``rows`` (smallest file first, at most ``limit``)."""
    lines = [f"{'MiB':>8} {'PPL×':>6} {'tok/s':>6}  label"]
    for r in sorted(rows, key=lambda r: r["size_bytes"])[:limit]:
        d = r["decode_tokens_per_s"]
        lines.append(f"{r['size_bytes'] / 2**20:8.1f} {r['ppl_ratio']:6.2f} "
                     f"{'' if d is None else f'{d:.0f}':>6}  {r['label']}")
    return "\n".join(lines)
