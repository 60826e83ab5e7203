"""The rendered course: executed notebooks as HTML pages that work offline, an index, a results page.

Every page loads its JavaScript from the course folder itself (``_static/``): MathJax 2.7, the
Jupyter widgets HTML manager (``embed-amd.js``) and require.js, copied from the npm packages pinned
in ``edgellm/course/web/package-lock.json`` (shipped with the package; ``npm ci`` installs them
once into ``cache_dir()/web``, or ``$EDGELLM_NODE_MODULES`` points at a ``node_modules`` folder
that has them), so the course can be served from a laptop in a lab room without internet.
Without npm, ``render_course(..., web_assets=False)`` (``edgellm course run --no-web-assets``)
renders every page without them and says so at the top of each page.

Layout of ``out/``::

    index.html                       lessons, labs, exercise sheets, results
    results.html  results.json       every recorded sweep (results/*.json): headline numbers + plots
    notebooks/NN_topic.{ipynb,html}  executed lessons
    solutions/NN_topic.{ipynb,html}  executed labs with their checks
    exercises/NN_topic.ipynb         the sheets to hand out (not executed)
    _static/                         mathjax/, html-manager/, require.js, course.css
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.paths import cache_dir

WEB_DIR = Path(__file__).resolve().parent / "web"    # package.json + lock of the offline web assets
STATIC = "_static"
MATHJAX_CONFIG = "TeX-AMS_CHTML-full,Safe"


# --------------------------------------------------------------------------------------------
# offline assets


class WebAssetsError(EdgeLLMError):
    """The offline web assets are missing and cannot be installed here."""


def web_install_dir() -> Path:
    """Where ``npm ci`` installs the web assets (``node_modules/`` inside): ``cache_dir()/web``."""
    return cache_dir() / "web"


def node_modules() -> Path:
    """Where the npm packages of the web assets live (``EDGELLM_NODE_MODULES`` overrides)."""
    env = os.environ.get("EDGELLM_NODE_MODULES")
    return Path(env) if env else web_install_dir() / "node_modules"


_ASSETS = {  # name in _static/ : path inside node_modules
    "mathjax": "mathjax",
    "html-manager": "@jupyter-widgets/html-manager/dist",
    "require.js": "requirejs/require.js",
}
LOCK_STAMP = ".edgellm-lock-sha256"     # in node_modules/: sha256 of the lock it was installed from

NO_NPM = ("install Node.js with npm (Debian/Ubuntu: `sudo apt-get install npm`; macOS: "
          "`brew install node`; elsewhere: https://nodejs.org) and run again")
NO_ASSETS_NOTE = ("rendered without the offline web assets (MathJax, widgets): formulas show as TeX "
                  "source, widgets as static output; install npm and run "
                  "scripts/ci_system_deps.sh, then `make course`")


def assets_available() -> bool:
    nm = node_modules()
    return all((nm / p).exists() for p in _ASSETS.values())


def _lock_sha256() -> str:
    return hashlib.sha256((WEB_DIR / "package-lock.json").read_bytes()).hexdigest()


def _installed_from_lock() -> bool:
    """The default install exists and was made from the lock shipped with this package."""
    stamp = node_modules() / LOCK_STAMP
    return assets_available() and stamp.is_file() and stamp.read_text().strip() == _lock_sha256()


def install_assets() -> Path:
    """``npm ci`` of ``web/package-lock.json`` into :func:`web_install_dir`; returns node_modules.

    Downloads the pinned packages once (needs the internet and npm); later renders are offline.
    """
    npm = shutil.which("npm")
    dest = web_install_dir()
    if npm is None:
        raise WebAssetsError(
            "the offline web assets of the course (MathJax, the Jupyter widgets manager, "
            f"require.js) are not installed, and npm, which installs them, is not on PATH: {NO_NPM} "
            f"(they go to {dest}). In a checkout, `bash scripts/ci_system_deps.sh` installs npm "
            "and the assets. Or render without them (formulas as TeX source, widgets as static "
            "output): `edgellm course run --no-web-assets`")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(WEB_DIR / name, dest / name)
    print(f"render: installing the offline web assets (npm ci in {dest})", flush=True)
    r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=dest,
                       check=False)
    if r.returncode != 0 or not (dest / "node_modules").is_dir():
        raise WebAssetsError(
            f"`npm ci` in {dest} failed (exit {r.returncode}): it downloads the pinned packages "
            "once, so it needs the internet; fix the error above and run again, or render "
            "without them: `edgellm course run --no-web-assets`")
    (dest / "node_modules" / LOCK_STAMP).write_text(_lock_sha256() + "\n")
    return dest / "node_modules"


def ensure_assets(*, install: bool = True) -> Path:
    """The node_modules folder with MathJax, the widget manager and require.js.

    With ``$EDGELLM_NODE_MODULES`` that folder is used as it is.  Otherwise the install in
    :func:`web_install_dir` is made with ``npm ci`` when absent (not with ``install=False``).
    Raises :class:`WebAssetsError`, naming npm and how to install it, when the assets are missing.
    """
    env = os.environ.get("EDGELLM_NODE_MODULES")
    if env:
        if not assets_available():
            raise WebAssetsError(
                f"EDGELLM_NODE_MODULES={env} lacks {', '.join(_ASSETS.values())}; run `npm ci` "
                f"with {WEB_DIR / 'package-lock.json'} in its parent folder, or unset it to "
                f"install them into {web_install_dir()}")
        return node_modules()
    if assets_available():
        if not _installed_from_lock():        # kept: `npm ci` would delete it before downloading
            print(f"render: the web assets in {node_modules()} were not installed from this "
                  "package's lock; `scripts/ci_system_deps.sh` (or install_assets()) updates them")
        return node_modules()
    if not install:
        raise WebAssetsError(
            "the offline web assets of the course (MathJax, the Jupyter widgets manager, "
            f"require.js) are not installed in {web_install_dir()}: {NO_NPM}, or run "
            "`bash scripts/ci_system_deps.sh` in a checkout; or render without them: "
            "`edgellm course run --no-web-assets`")
    return install_assets()


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


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# the lab template with no <script> of require.js, the widget manager or MathJax
_NO_ASSETS_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
"""


def exporter(static_url: str, *, web_assets: bool = True):
    """nbconvert's lab-template HTML exporter pointed at the local assets under ``static_url``.

    ``web_assets=False``: the same page without require.js, MathJax and the widget manager.
    """
    from nbconvert import HTMLExporter

    if not web_assets:
        from jinja2 import DictLoader

        return HTMLExporter(template_name="lab", embed_images=True,
                            extra_loaders=[DictLoader({"no_assets.html.j2": _NO_ASSETS_TEMPLATE})],
                            template_file="no_assets.html.j2")
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


def static_widgets(nb):
    """A copy of ``nb`` whose widgets are static output: no widget state, and each widget view
    replaced by the fallback the kernel sent with it (``text/plain``: a tqdm bar's last text)."""
    import copy

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                data.setdefault("text/plain", "")
    return nb


def no_assets_note() -> str:
    """The notice at the top of every page rendered with ``web_assets=False``."""
    return (f'<p class="edgellm-note" style="background:#fff8c5;border:1px solid #d4a72c;'
            f'padding:0.5em 0.8em;">Note: {html.escape(NO_ASSETS_NOTE)}.</p>')


def _add_note(page: str) -> str:
    return page.replace("<main>", f"<main>\n{no_assets_note()}", 1)


def render_notebook(nb, dest, out, *, web_assets: bool = True) -> Path:
    """Write ``nb`` (an executed nbformat notebook) as an HTML page ``dest`` of the course ``out``.

    ``web_assets=False``: no MathJax or widget manager (formulas stay TeX source, widgets show
    their static fallback) and a note at the top of the page says so.
    """
    from edgellm.records import write_text

    dest = Path(dest)
    ex = exporter(_rel_static(dest, Path(out)), web_assets=web_assets)
    if not web_assets:
        nb = static_widgets(nb)
    body, _ = ex.from_notebook_node(nb, resources={"metadata": {"name": dest.stem}})
    nav = (f'<nav class="edgellm-nav"><a href="{os.path.relpath(Path(out) / "index.html", dest.parent)}">'
           "&larr; course index</a></nav>")
    if not web_assets:
        nav += "\n" + no_assets_note()
    body = body.replace("<main>", f"<main>\n{nav}", 1)
    return write_text(body, dest)


def _page(title: str, body: str, static: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n"
            f'<link rel="stylesheet" href="{static}/course.css">\n'
            f"</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def render_index(out, entries: list[dict], *, fast: bool = False, web_assets: bool = True) -> Path:
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
    if not web_assets:
        parts.insert(0, no_assets_note())
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
