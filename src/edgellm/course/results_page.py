"""The results page of the rendered course: every recorded sweep (results/*.json) as a table and a
plot, each sweep drawn with its lesson's own plot where one exists, speed figures grouped by the
protocol that measured them (never two protocols in one column).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from edgellm.course.render import STATIC, _page
from edgellm.paths import root

# canonical JSON keys shown on the results page, in this order; the speed figures
# (edgellm.measure.speed_keys) follow, grouped under the protocol each record names for them
HEADLINE_KEYS = ("ppl", "ppl_base", "nll", "kl_mean", "top1_agreement", "bpw", "size_bytes",
                 "memory_bytes", "peak_rss_bytes", "seconds", "n_tokens", "protocol", "ctx",
                 "model", "data")


# keys a sweep may vary along (x axis of its plot), most telling first
SWEEP_AXES = ("bits", "bpw", "group_size", "ctx", "size_bytes", "n_samples", "seq_len", "a_bits",
              "kv_bits", "rank", "sparsity", "stride")


def _fmt(v) -> str:
    if v is None:
        return "&mdash;"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return html.escape(str(v))


def sweep_axis(records: list[dict]) -> str | None:
    """The key a sweep varies along (for its plot), or None."""
    for key in SWEEP_AXES:
        vals = [r.get(key) for r in records]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals) \
                and len(set(vals)) > 1:
            return key
    return None


def lesson_plot(name: str):
    """The lesson's own figure for a sweep (``records -> Figure``), or None: lesson 01's PPL
    against context, lesson 03's trade-off (labelled points per method), lesson 04's α sweep,
    lesson 06's PPL against sparsity."""
    from edgellm.lessons import act_quant, perplexity, pruning, weight_quant

    def on_axes(draw):
        def figure(records):
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
            draw(records, ax=ax)
            fig.tight_layout()
            return fig
        return figure

    plots = {"01_ppl_vs_ctx": perplexity.plot_ppl_vs_ctx, "03_": weight_quant.plot_tradeoff,
             "04_w8a8": on_axes(act_quant.plot_alpha), "06_sparsity": on_axes(pruning.plot_sweep)}
    if name in plots:
        return plots[name]
    return next((f for k, f in plots.items() if k.endswith("_") and name.startswith(k)), None)


def _protocol_name(record: dict, key: str) -> str | None:
    return ((record.get("speed_protocol") or {}).get(key) or {}).get("name")


def _plot_metric(records: list[dict]) -> tuple[str, str | None] | None:
    """``(key, protocol)`` the generic plot draws: a quality or time figure, else a speed figure
    that every record measured under one protocol (never two protocols on one axis)."""
    from edgellm.measure import speed_keys

    def numeric(k):
        return all(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)
                   for r in records)

    for k in ("ppl", "kl_mean", "seconds"):
        if numeric(k):
            return k, None
    for k in speed_keys(records[0]):
        names = {_protocol_name(r, k) for r in records}
        if numeric(k) and len(names) == 1 and None not in names:
            return k, names.pop()
    return None


def _generic_figure(sweep: dict):
    """Headline metric against the key the sweep varies: a line when the records differ only
    along that key, labelled points when they also differ otherwise (methods, formats), bars
    when no numeric key varies.  None when there is nothing to plot."""
    records = sweep.get("records", [])
    picked = _plot_metric(records) if len(records) >= 2 else None
    if picked is None:
        return None
    metric, proto = picked
    import matplotlib.pyplot as plt

    axis = sweep_axis(records)
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    if axis is not None:
        related = not _varying_strings(records)
        pts = sorted((r[axis], r[metric], _label(r, i, records)) for i, r in enumerate(records))
        if related:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        else:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts])
            for x, y, text in pts:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(axis)
        lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
        if lo > 0 and hi / lo >= 8:                       # doublings (ctx, group size) read best
            ax.set_xscale("log", base=2)
    else:
        labels = [_label(r, i, records) for i, r in enumerate(records)]
        ax.bar(range(len(records)), [r[metric] for r in records])
        ax.set_xticks(range(len(records)), labels, rotation=30, ha="right", fontsize=7)
    if "ppl_base" in records[0] and metric == "ppl" and isinstance(records[0]["ppl_base"], float):
        ax.axhline(records[0]["ppl_base"], color="gray", ls="--", lw=1, label="baseline")
        ax.legend()
    ax.set_ylabel(metric if proto is None else f"{metric}\n({proto})")
    ax.set_title(sweep.get("name", ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sweep(sweep: dict, dest) -> Path | None:
    """A PNG of a sweep: its lesson's own figure (:func:`lesson_plot`) where one exists, else
    the headline metric against the key it varies (None when nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sweep.get("records", [])
    draw = lesson_plot(sweep.get("name", "")) if records else None
    fig = draw(records) if draw is not None else _generic_figure(sweep)
    if fig is None:
        return None
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest)
    plt.close(fig)
    return dest


def _varying_strings(records: list[dict]) -> list[str]:
    """Short string-valued keys (method, type, mode...) that differ across the records (not
    commands, notes or hashes)."""
    keys = dict.fromkeys(k for r in records for k, v in r.items()
                         if isinstance(v, str) and len(v) <= 32 and k != "command"
                         and not k.endswith(("_sha256", "_note")))
    return [k for k in keys if len({str(x.get(k)) for x in records}) > 1]


def _label(r: dict, i: int, records: list[dict]) -> str:
    """What tells this record apart: the string-valued keys that vary across the sweep."""
    keys = [k for k in _varying_strings(records) if isinstance(r.get(k), str)]
    if keys:
        return ", ".join(str(r[k]) for k in keys[:2])
    cmd = r.get("command", "")
    return " ".join(cmd.split()[-2:]) if cmd else f"#{i}"


def load_sweeps(results_dir=None) -> list[dict]:
    results_dir = Path(results_dir) if results_dir is not None else root() / "results"
    out = []
    for p in sorted(results_dir.glob("*.json")):
        try:
            sweep = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            sweep = {"name": p.stem, "description": f"unreadable: {e}", "records": []}
        sweep.setdefault("name", p.stem)
        out.append(sweep)
    return out


def headline(record: dict) -> dict:
    """The canonical keys of a record, its speed figures as ``{"speed": {protocol: {key:
    value}}}`` (one group per protocol the record names) and the command that produced it."""
    from edgellm.measure import speed_keys

    keep = {k: record[k] for k in HEADLINE_KEYS if k in record}
    axis_vals = {k: record[k] for k in SWEEP_AXES if k in record and k not in keep}
    speed: dict[str, dict] = {}
    for k in speed_keys(record):
        if record[k] is not None:
            speed.setdefault(_protocol_name(record, k) or "unnamed", {})[k] = record[k]
    return {**axis_vals, **keep, **({"speed": speed} if speed else {}),
            **({"command": record["command"]} if "command" in record else {})}


def results_table(rows: list[dict]) -> str:
    """An HTML table of :func:`headline` rows: one column per canonical key, then the speed
    figures grouped under a header cell per protocol (never two protocols in one column)."""
    from edgellm.measure import SPEED_PROTOCOLS

    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in ("command", "speed") and any(r.get(k) is not None for r in rows)]
    groups: dict[str, list[str]] = {}
    for r in rows:
        for proto, figures in r.get("speed", {}).items():
            groups.setdefault(proto, [])
            groups[proto] += [k for k in figures if k not in groups[proto]]
    top = "".join(f'<th rowspan="2">{html.escape(k)}</th>' for k in keys)
    top += "".join(f'<th colspan="{len(ks)}" title="{html.escape(SPEED_PROTOCOLS.get(p, ""))}">'
                   f"speed: {html.escape(p)}</th>" for p, ks in groups.items())
    top += '<th rowspan="2">command</th>'
    sub = "".join(f"<th>{html.escape(k)}</th>" for ks in groups.values() for k in ks)
    body = []
    for r in rows:
        cells = [_fmt(r.get(k)) for k in keys]
        cells += [_fmt(r.get("speed", {}).get(p, {}).get(k)) for p, ks in groups.items()
                  for k in ks]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + f"<td><code>{html.escape(r.get('command', ''))}</code></td></tr>")
    legend = "".join(f"<li><code>{html.escape(p)}</code>: "
                     f"{html.escape(SPEED_PROTOCOLS.get(p, 'not defined in edgellm.measure'))}</li>"
                     for p in groups)
    return (f'<div class="scroll"><table class="results"><thead><tr>{top}</tr>'
            f"<tr>{sub}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            + (f'<ul class="protocols">{legend}</ul>' if legend else ""))


def render_results(out, sweeps: list[dict] | None = None, notebooks: list[dict] | None = None) -> dict:
    """Write ``out/results.json`` and ``out/results.html`` from the recorded sweeps."""
    from edgellm.records import write_json, write_text

    out = Path(out)
    sweeps = load_sweeps() if sweeps is None else sweeps
    summary = {"sweeps": [], "notebooks": notebooks or []}
    parts = ["<h1>Results</h1>",
             "<p>Every recorded sweep of the course (<code>results/*.json</code>), each number "
             "reproducible from the shell with the command shown (<code>make results</code> "
             "re-runs them all).</p>"]
    if not sweeps:
        parts.append("<p><em>No sweep recorded yet.</em></p>")
    for sweep in sweeps:
        rows = [headline(r) for r in sweep.get("records", [])]
        png = plot_sweep(sweep, out / "results" / f"{sweep['name']}.png")
        summary["sweeps"].append({"name": sweep["name"], "description": sweep.get("description", ""),
                                  "records": rows,
                                  "plot": png.relative_to(out).as_posix() if png else None})
        parts.append(f'<h2 id="{html.escape(sweep["name"])}">{html.escape(sweep["name"])}</h2>')
        if sweep.get("description"):
            parts.append(f"<p>{html.escape(sweep['description'])}</p>")
        if not rows:
            cmds = "".join(f"<li><code>{html.escape(c)}</code></li>"
                           for c in sweep.get("commands", []))
            parts.append(f"<p><em>Not run yet</em> (<code>make results</code>).</p><ul>{cmds}</ul>")
            continue
        if png is not None:
            parts.append(f'<img src="{png.relative_to(out).as_posix()}" alt="plot of '
                         f'{html.escape(sweep["name"])}">')
        parts.append(results_table(rows))
    write_json(summary, out / "results.json")
    write_text(_page("Results", "\n".join(parts), STATIC), out / "results.html")
    return summary
