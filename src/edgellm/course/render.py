"""The rendered course: executed notebooks as HTML pages that work offline, an index, a results page.

Every page loads its JavaScript from the course folder itself (``_static/``): MathJax 2.7, the
Jupyter widgets HTML manager (``embed-amd.js``) and require.js, copied from the npm packages listed
in ``tests/browser/package.json`` (installed by ``scripts/ci_system_deps.sh`` or ``npm ci``), so
the course can be served from a laptop in a lab room without internet.

Layout of ``out/``::

    index.html                       lessons, labs, exercise sheets, results
    results.html  results.json       every recorded sweep (results/*.json): headline numbers + plots
    notebooks/NN_topic.{ipynb,html}  executed lessons
    solutions/NN_topic.{ipynb,html}  executed labs with their checks
    exercises/NN_topic.ipynb         the sheets to hand out (not executed)
    _static/                         mathjax/, html-manager/, require.js, course.css
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.paths import root

WEB_DIR = root() / "tests" / "browser"          # package.json of the offline web assets
STATIC = "_static"
MATHJAX_CONFIG = "TeX-AMS_CHTML-full,Safe"

# canonical JSON keys shown on the results page, in this order
HEADLINE_KEYS = ("ppl", "ppl_base", "nll", "kl_mean", "top1_agreement", "bpw", "size_bytes",
                 "peak_rss_bytes", "tokens_per_s", "seconds", "n_tokens", "protocol", "ctx",
                 "model", "data")
# keys a sweep may vary along (x axis of its plot), most telling first
SWEEP_AXES = ("bits", "bpw", "group_size", "ctx", "size_bytes", "n_samples", "seq_len", "a_bits",
              "kv_bits", "rank", "sparsity", "stride")


# --------------------------------------------------------------------------------------------
# offline assets


def node_modules() -> Path:
    """Where the npm packages of the web assets live (``EDGELLM_NODE_MODULES`` overrides)."""
    env = os.environ.get("EDGELLM_NODE_MODULES")
    return Path(env) if env else WEB_DIR / "node_modules"


_ASSETS = {  # name in _static/ : path inside node_modules
    "mathjax": "mathjax",
    "html-manager": "@jupyter-widgets/html-manager/dist",
    "require.js": "requirejs/require.js",
}


def assets_available() -> bool:
    nm = node_modules()
    return all((nm / p).exists() for p in _ASSETS.values())


def ensure_assets(*, install: bool = True) -> Path:
    """The node_modules folder with MathJax, the widget manager and require.js; ``npm ci`` if absent."""
    if assets_available():
        return node_modules()
    if install and shutil.which("npm") and (WEB_DIR / "package-lock.json").is_file():
        print(f"render: installing the offline web assets (npm ci in {WEB_DIR})")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB_DIR, check=False)
    if not assets_available():
        raise EdgeLLMError(
            "the offline web assets (MathJax, Jupyter widgets) are not installed; run "
            "`bash scripts/ci_system_deps.sh` (or `npm ci` in tests/browser/) and try again")
    return node_modules()


def _skip_mathjax(dirpath: str, names: list[str]) -> set[str]:
    """Leave out what the CommonHTML output never loads (unpacked sources, image fonts, SVG...)."""
    rel = Path(dirpath).as_posix()
    skip = {"unpacked", "test", "docs"}
    if rel.endswith("fonts/HTML-CSS"):
        skip |= {n for n in names if n != "TeX"}
    if rel.endswith("fonts/HTML-CSS/TeX"):
        skip |= {n for n in names if n != "woff"}
    if rel.endswith("jax/output"):
        skip |= {n for n in names if n not in ("CommonHTML", "PreviewHTML", "NativeMML")}
    return skip & set(names)


def copy_assets(out) -> Path:
    """Copy the offline assets into ``out/_static`` (once; a stamp records the source)."""
    nm = ensure_assets()
    static = Path(out) / STATIC
    stamp = static / ".assets"
    key = json.dumps({k: (nm / v).resolve().as_posix() for k, v in _ASSETS.items()}
                     | {"mathjax-version": json.loads((nm / "mathjax/package.json").read_text())
                        ["version"]}, sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(static, ignore_errors=True)
        static.mkdir(parents=True)
        shutil.copytree(nm / _ASSETS["mathjax"], static / "mathjax", ignore=_skip_mathjax)
        shutil.copytree(nm / _ASSETS["html-manager"], static / "html-manager",
                        ignore=shutil.ignore_patterns("*.map", "embed.js", "libembed-amd.js"))
        shutil.copy2(nm / _ASSETS["require.js"], static / "require.js")
        stamp.write_text(key)
    (static / "course.css").write_text(COURSE_CSS)
    return static


# --------------------------------------------------------------------------------------------
# pages


def _rel_static(page: Path, out: Path) -> str:
    return Path(os.path.relpath(out / STATIC, page.parent)).as_posix()


def exporter(static_url: str):
    """nbconvert's lab-template HTML exporter pointed at the local assets under ``static_url``."""
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name="lab",
        embed_images=True,
        mathjax_url=f"{static_url}/mathjax/MathJax.js?config={MATHJAX_CONFIG}",
        require_js_url=f"{static_url}/require.js",
        widget_renderer_url=f"{static_url}/html-manager/embed-amd.js",
        jupyter_widgets_base_url=f"{static_url}/",
    )


def notebook_title(nb, default: str) -> str:
    """The first markdown heading of a notebook (without the #), else ``default``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in "".join(cell.source).splitlines():
                m = re.match(r"^#{1,3}\s+(.+)", line.strip())
                if m:
                    return re.sub(r"[*_`]", "", m.group(1)).strip()
    return default


def render_notebook(nb, dest, out) -> Path:
    """Write ``nb`` (an executed nbformat notebook) as an HTML page ``dest`` of the course ``out``."""
    from edgellm.records import write_text

    dest = Path(dest)
    ex = exporter(_rel_static(dest, Path(out)))
    body, _ = ex.from_notebook_node(nb, resources={"metadata": {"name": dest.stem}})
    nav = (f'<nav class="edgellm-nav"><a href="{os.path.relpath(Path(out) / "index.html", dest.parent)}">'
           "&larr; course index</a></nav>")
    body = body.replace("<main>", f"<main>\n{nav}", 1)
    return write_text(body, dest)


def _page(title: str, body: str, static: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n"
            f'<link rel="stylesheet" href="{static}/course.css">\n'
            f"</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


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


def plot_sweep(sweep: dict, dest) -> Path | None:
    """A PNG of a sweep's headline metric against the key it varies (None when nothing to plot)."""
    records = sweep.get("records", [])
    metric = next((k for k in ("ppl", "kl_mean", "tokens_per_s", "seconds")
                   if records and all(isinstance(r.get(k), int | float) for r in records)), None)
    if metric is None or len(records) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = sweep_axis(records)
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    if axis is not None:
        pts = sorted((r[axis], r[metric]) for r in records)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
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
    ax.set_ylabel(metric)
    ax.set_title(sweep.get("name", ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest)
    plt.close(fig)
    return dest


def _label(r: dict, i: int, records: list[dict]) -> str:
    """What tells this record apart: the string-valued keys that vary across the sweep."""
    keys = [k for k, v in r.items() if isinstance(v, str) and k not in ("command",)
            and len({str(x.get(k)) for x in records}) > 1]
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
    """The canonical keys of a record (plus the command that produced it)."""
    keep = {k: record[k] for k in HEADLINE_KEYS if k in record}
    axis_vals = {k: record[k] for k in SWEEP_AXES if k in record and k not in keep}
    return {**axis_vals, **keep, **({"command": record["command"]} if "command" in record else {})}


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
        keys = [k for k in dict.fromkeys(k for r in rows for k in r)
                if k != "command" and any(r.get(k) is not None for r in rows)]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k, ''))}</td>" for k in keys)
                       + f"<td><code>{html.escape(r.get('command', ''))}</code></td></tr>"
                       for r in rows)
        parts.append(f'<div class="scroll"><table class="results"><thead><tr>{head}'
                     f"<th>command</th></tr></thead><tbody>{body}</tbody></table></div>")
    write_json(summary, out / "results.json")
    write_text(_page("Results", "\n".join(parts), STATIC), out / "results.html")
    return summary


def render_index(out, entries: list[dict], *, fast: bool = False) -> Path:
    """``out/index.html``: lessons, labs and exercise sheets with their status and run time.

    ``entries``: dicts with ``folder``, ``name``, ``title``, ``html`` (relative link or None),
    ``status`` ("ok" / "error: ..."), ``seconds``.
    """
    from edgellm.records import write_text

    out = Path(out)
    sections = {"notebooks": "Lessons", "solutions": "Labs (with solutions and checks)"}
    parts = ["<h1>edgellm: compressing and deploying LLMs on the edge</h1>",
             f"<p>Executed {'in FAST mode' if fast else 'in full mode'} on the real default model; "
             "every page works offline. <a href=\"results.html\">All recorded results</a>.</p>"]
    for folder, heading in sections.items():
        rows = [e for e in entries if e["folder"] == folder]
        if not rows:
            continue
        parts.append(f"<h2>{heading}</h2><table class=\"index\"><tbody>")
        for e in rows:
            link = (f'<a href="{e["html"]}">{html.escape(e["title"])}</a>' if e.get("html")
                    else html.escape(e["title"]))
            ok = e["status"] == "ok"
            status = (f'<span class="{"ok" if ok else "bad"}">{html.escape(e["status"])}</span>')
            extra = f' &middot; <a href="{folder}/{e["name"]}.ipynb">notebook</a>'
            if folder == "solutions" and (out / "exercises" / f"{e['name']}.ipynb").is_file():
                extra += f' &middot; <a href="exercises/{e["name"]}.ipynb">exercise sheet</a>'
            parts.append(f"<tr><td><code>{html.escape(e['name'])}</code></td><td>{link}{extra}</td>"
                         f"<td>{status}</td><td>{e.get('seconds', 0):.0f} s</td></tr>")
        parts.append("</tbody></table>")
    parts.append('<h2>Results</h2><p><a href="results.html">Recorded sweeps: headline numbers '
                 "and plots</a></p>")
    return write_text(_page("edgellm course", "\n".join(parts), STATIC), out / "index.html")


def render_course(out, runs: list[dict], *, fast: bool = False, exercises_dir=None,
                  web_assets: bool = True) -> dict:
    """Render executed notebooks, copy the exercise sheets, write results and index pages.

    ``runs``: dicts ``{"folder", "name", "ipynb" (executed notebook path), "status", "seconds"}``.
    Returns the course summary (also in ``out/results.json``).
    """
    import nbformat

    out = Path(out)
    copy_assets(out)
    entries = []
    for r in runs:
        ipynb = Path(r["ipynb"])
        entry = {**r, "ipynb": ipynb.relative_to(out).as_posix() if ipynb.is_relative_to(out)
                 else str(ipynb), "html": None, "title": r["name"]}
        if ipynb.is_file():
            nb = nbformat.read(ipynb, as_version=4)
            entry["title"] = notebook_title(nb, r["name"])
            dest = out / r["folder"] / f"{r['name']}.html"
            render_notebook(nb, dest, out)
            entry["html"] = dest.relative_to(out).as_posix()
        entries.append(entry)
    ex_dir = Path(exercises_dir) if exercises_dir is not None else root() / "exercises"
    for sheet in sorted(ex_dir.glob("[0-9][0-9]_*.ipynb")):
        (out / "exercises").mkdir(parents=True, exist_ok=True)
        shutil.copy2(sheet, out / "exercises" / sheet.name)
    summary = render_results(out, notebooks=entries)
    render_index(out, entries, fast=fast)
    return summary


COURSE_CSS = """\
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 0;
       color: #222; background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em; background: #fff; }
h1 { font-size: 1.7em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
table.results td code { font-size: 0.85em; white-space: nowrap; }
.scroll { overflow-x: auto; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; }
img { max-width: 100%; }
"""
