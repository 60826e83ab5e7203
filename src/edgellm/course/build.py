"""Building the offline course folder: rendered lessons and labs, exercise sheets, the results
page and the index (see :mod:`edgellm.course.render` for the layout of ``out/``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgellm.course.render import (
    COURSE_CSS,
    STATIC,
    _add_note,
    copy_assets,
    notebook_title,
    render_index,
    render_notebook,
)
from edgellm.course.results_page import render_results
from edgellm.paths import root


def render_course(out, runs: list[dict], *, fast: bool = False, exercises_dir=None,
                  web_assets: bool = True) -> dict:
    """Render executed notebooks, copy the exercise sheets, write results and index pages.

    ``runs``: dicts ``{"folder", "name", "ipynb" (executed notebook path), "status", "seconds",
    "peak_rss_bytes"}`` (the last is optional).
    Returns the course summary (also in ``out/results.json``).  ``web_assets=False``: pages
    without MathJax and the widget manager, each saying so (no npm needed); otherwise missing
    assets are installed with npm, or the call fails before rendering anything.
    """
    import nbformat

    from edgellm.records import write_text

    out = Path(out)
    if web_assets:
        copy_assets(out)
    else:
        write_text(COURSE_CSS, out / STATIC / "course.css")
    entries = []
    for r in runs:
        ipynb = Path(r["ipynb"])
        entry = {**r, "ipynb": ipynb.relative_to(out).as_posix() if ipynb.is_relative_to(out)
                 else str(ipynb), "html": None, "title": r["name"]}
        if ipynb.is_file():
            nb = nbformat.read(ipynb, as_version=4)
            entry["title"] = notebook_title(nb, r["name"])
            dest = out / r["folder"] / f"{r['name']}.html"
            render_notebook(nb, dest, out, web_assets=web_assets)
            entry["html"] = dest.relative_to(out).as_posix()
        entries.append(entry)
    ex_dir = Path(exercises_dir) if exercises_dir is not None else root() / "exercises"
    for sheet in sorted(ex_dir.glob("[0-9][0-9]_*.ipynb")):
        (out / "exercises").mkdir(parents=True, exist_ok=True)
        shutil.copy2(sheet, out / "exercises" / sheet.name)
    summary = render_results(out, notebooks=entries)
    if not web_assets:                          # the results page names no asset, but says so too
        results_page = out / "results.html"
        write_text(_add_note(results_page.read_text()), results_page)
    render_index(out, entries, fast=fast, web_assets=web_assets)
    return summary
