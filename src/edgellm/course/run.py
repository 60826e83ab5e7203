"""Executing notebooks in a fresh kernel, and ``make course``: every notebook, then the HTML course.

Tests run notebooks in FAST mode; ``edgellm course run`` runs them in full mode.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm.paths import root

# --------------------------------------------------------------------------------------------
# executing notebooks (tests run them in FAST mode; `make course` in full mode)

def course_notebooks(*folders: str) -> list:
    """Lesson and lab notebooks in course order (by their NN_ prefix)."""
    folders = folders or ("notebooks", "solutions")
    return [p for f in folders for p in sorted((root() / f).glob("[0-9][0-9]_*.ipynb"))]


RESET_TAG = "edgellm-reset"


def section_starts(nb) -> list[int]:
    """Indices of the cells that open a section: markdown cells whose first line is a ``## `` heading."""
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "markdown" and c.source.lstrip().startswith("## ")]


def insert_section_resets(nb) -> int:
    """Put a ``%reset -f`` cell before every section (in place); return how many.

    Running the notebook so tests, in one kernel, that each section works from its own first
    cell, as it must after a kernel restart: names from earlier sections are gone (modules stay
    imported, so a section pays only for what it loads itself).  The cells carry the
    ``edgellm-reset`` tag and :func:`remove_section_resets` takes them out again.
    """
    import nbformat

    starts = section_starts(nb)
    for i in reversed(starts):
        cell = nbformat.v4.new_code_cell("%reset -f", metadata={"tags": [RESET_TAG]})
        nb.cells.insert(i, cell)
    return len(starts)


def remove_section_resets(nb) -> None:
    """Undo :func:`insert_section_resets` (in place)."""
    nb.cells = [c for c in nb.cells if RESET_TAG not in c.get("metadata", {}).get("tags", [])]


# appended to every executed notebook and taken out again: the kernel's peak resident memory
PEAK_RSS_TAG = "edgellm-peak-rss"
_PEAK_RSS_SOURCE = ("from edgellm.measure import peak_rss_bytes as _edgellm_peak_rss\n"
                    "print(_edgellm_peak_rss())")


def _measure_peak_rss(nb) -> None:
    """Take the peak-RSS cell out of ``nb``; store its reading in ``nb.metadata.edgellm``."""
    peak = None
    for cell in [c for c in nb.cells if PEAK_RSS_TAG in c.get("metadata", {}).get("tags", [])]:
        text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream").strip()
        peak = int(text) if text.isdigit() else None
        nb.cells.remove(cell)
    nb.metadata.setdefault("edgellm", {})["peak_rss_bytes"] = peak


def execute_notebook(path, out=None, *, fast: bool = True, timeout: int = 900,
                     allow_errors: bool = False, reset_sections: bool = False):
    """Execute a notebook top to bottom in a fresh kernel; write the executed copy to ``out``.

    Returns the executed ``nbformat`` notebook.  FAST mode is passed to the kernel through
    ``EDGELLM_FAST``; the kernel starts in the notebook's own folder.  ``reset_sections=True``
    runs ``%reset -f`` before every ``## `` section (:func:`insert_section_resets`); the
    executed copy and the returned notebook have those cells taken out again.  The kernel's
    peak resident memory (child processes not included) lands in
    ``nb.metadata["edgellm"]["peak_rss_bytes"]`` (``None`` when a stopping error came first).
    """
    import nbformat
    from nbclient import NotebookClient

    from edgellm.records import write_text

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if reset_sections:
        insert_section_resets(nb)
    nb.cells.append(nbformat.v4.new_code_cell(_PEAK_RSS_SOURCE,
                                              metadata={"tags": [PEAK_RSS_TAG]}))
    saved = os.environ.get("EDGELLM_FAST")
    os.environ["EDGELLM_FAST"] = "1" if fast else "0"
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                allow_errors=allow_errors,
                                resources={"metadata": {"path": str(path.parent)}})
        # No front-end emulation of Output widgets (which `interact` uses): it answers on the
        # shell socket from the task reading outputs while another task waits on that socket
        # for the cell's reply, and now and then the reply is only seen when the cell times
        # out (nbclient issue 312).  Without it the outputs stay plain cell outputs.
        client.widget_registry = {}
        try:
            client.execute()
        finally:
            remove_section_resets(nb)
            _measure_peak_rss(nb)
            if out is not None:
                write_text(nbformat.writes(nb), out)
    finally:
        if saved is None:
            os.environ.pop("EDGELLM_FAST", None)
        else:
            os.environ["EDGELLM_FAST"] = saved
    return nb


@dataclass
class NotebookRun:
    """An executed notebook: the notebook, its errors in cell order, the wall time."""
    path: Path
    nb: object
    errors: list[dict]           # [{"cell", "ename", "evalue"}]
    seconds: float
    stopped: bool                # True when execution stopped at the first error

    @property
    def peak_rss_bytes(self) -> int | None:
        """The kernel's peak resident memory (``None`` if execution stopped first)."""
        return self.nb.metadata.get("edgellm", {}).get("peak_rss_bytes")


def run_notebook(path, out=None, *, fast: bool = True, stop_on_error: bool = False,
                 env: dict | None = None, timeout: int = 900,
                 reset_sections: bool = False) -> NotebookRun:
    """Execute a notebook in a fresh kernel (via :func:`edgellm.course.run.execute_notebook`).

    ``stop_on_error=False`` runs every cell and collects the errors; ``True`` stops at the first.
    ``env`` sets extra environment variables for the kernel (e.g. ``{"EDGELLM_PERTURB": "1.01"}``).
    ``reset_sections`` runs ``%reset -f`` before every section (see :func:`execute_notebook`).
    """
    import tempfile

    import nbformat
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    t0 = time.perf_counter()
    stopped = False
    with tempfile.TemporaryDirectory(prefix="edgellm-run-") as tmp:
        # a run that stops at an error raises; the executed copy written to `dest` keeps its cells
        dest = Path(out) if out is not None else Path(tmp) / path.name
        try:
            nb = execute_notebook(path, dest, fast=fast, timeout=timeout,
                                  allow_errors=not stop_on_error, reset_sections=reset_sections)
        except CellExecutionError:
            stopped = True
            nb = nbformat.read(dest, as_version=4)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return NotebookRun(path=path, nb=nb, errors=errors_of(nb), seconds=time.perf_counter() - t0,
                       stopped=stopped)


def errors_of(nb) -> list[dict]:
    """Every error output of an executed notebook, in cell order."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append({"cell": i, "ename": o.get("ename"), "evalue": o.get("evalue")})
    return out


# --------------------------------------------------------------------------------------------
# `make course`: execute every notebook, render the browsable HTML course with a results page

BUDGET_SECONDS = {"fast": {"notebooks": 45, "solutions": 30}, "full": 300}


def run_course(out, *, fast: bool = False, only: str | None = None, render: bool = True,
               web_assets: bool = True) -> int:
    """Execute notebooks/ then solutions/ into ``out`` and render the HTML course; return an exit code.

    A notebook that fails is still rendered (its page shows the error) and makes the exit code 1.
    ``only`` keeps the notebooks whose name contains it (e.g. ``"01_"``).
    """
    out = Path(out)
    if render and web_assets:             # fail (or install with npm) before the long execution
        from edgellm.course.render import ensure_assets

        ensure_assets()
    runs, failed = [], 0
    nbs = [p for p in course_notebooks() if only is None or only in p.name]
    for i, path in enumerate(nbs, 1):
        folder = path.parent.name
        dest = out / folder / path.name
        print(f"[{i}/{len(nbs)}] {folder}/{path.name} ({'FAST' if fast else 'full'} mode) ...",
              flush=True)
        run = run_notebook(path, dest, fast=fast, stop_on_error=True)
        budget = BUDGET_SECONDS["fast"][folder] if fast else BUDGET_SECONDS["full"]
        if run.errors:
            e = run.errors[0]
            status = f"error in cell {e['cell']}: {e['ename']}: {e['evalue']}"[:300]
            failed += 1
        else:
            status = "ok"
        over = "" if run.seconds <= budget else f"  (over the {budget} s budget)"
        peak = run.peak_rss_bytes
        mem = "" if peak is None else f", kernel peak RSS {peak / 2**30:.2f} GiB"
        print(f"      {status}  {run.seconds:.1f} s{mem}{over}", flush=True)
        runs.append({"folder": folder, "name": path.stem, "ipynb": str(dest), "status": status,
                     "seconds": round(run.seconds, 1), "budget_seconds": budget,
                     "peak_rss_bytes": peak})
    if render:
        from edgellm.course.build import render_course

        render_course(out, runs, fast=fast, web_assets=web_assets)
        print(f"course: {out / 'index.html'}  results: {out / 'results.html'}")
    if failed:
        print(f"course: {failed} notebook(s) failed", flush=True)
    return 1 if failed else 0
