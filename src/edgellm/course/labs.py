"""Labs from one source: ``solutions/`` -> ``exercises/``, the check helper and the check runner.

A lab notebook in ``solutions/NN_topic.ipynb`` is the single source of an exercise sheet:

* the solution code sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
  markers) inside a function body; a ``# HINT: ...`` comment line right before
  ``### BEGIN SOLUTION`` gives the hint the stub will raise with;
* every exercise has a tier, written in a markdown cell before it: ``(easy)``, ``(medium)`` or
  ``(research)``;
* every exercise is followed by one or more check cells that call :func:`check` to compare the
  student's answer with the ``edgellm`` reference (tolerances, PASS/FAIL with the difference, an
  ``AssertionError`` on FAIL).

:func:`generate` writes ``exercises/NN_topic.ipynb`` with each solution replaced by
``raise NotImplementedError("<hint>")`` at the same indentation; the checks are kept.
:func:`grade` executes a notebook and reports each check cell as PASS / FAIL / ERROR / NOT RUN.

``edgellm exercises generate | check-drift | grade NOTEBOOK... | nbgrader OUT``
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.paths import root

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
HINT = "# HINT:"
TIERS = ("easy", "medium", "research")
GENERIC_HINT = "write your solution here (replace this line)"
PERTURB_ENV = "EDGELLM_PERTURB"

_TIER_RE = re.compile(r"\((easy|medium|research)\)", re.IGNORECASE)
_CHECK_RE = re.compile(r"(?<![\w.])check\(|\.check\(")


class LabFormatError(EdgeLLMError):
    """A solution notebook does not follow the lab conventions (markers, hints, tiers, checks)."""


# --------------------------------------------------------------------------------------------
# the check every lab cell calls


def _perturb_factor() -> float | None:
    raw = os.environ.get(PERTURB_ENV, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise EdgeLLMError(f"{PERTURB_ENV}={raw!r} is not a number; use e.g. 1.01") from None


def _perturb(x, f: float):
    """``x`` times ``f``; exact zeros move by ``f - 1`` so that an all-zero answer changes too."""
    import torch

    if isinstance(x, dict):
        return {k: _perturb(v, f) for k, v in x.items()}
    if isinstance(x, str):
        return x + " (perturbed)"
    t = _as_double(x)
    return torch.where(t == 0, t + (f - 1.0), t * f)


def _as_double(x):
    """A float64 tensor of a tensor, array, number or nested list (Python floats stay exact)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _compare(name: str, got, want, atol: float, rtol: float) -> tuple[bool, str]:
    """One comparison -> (passed, message)."""
    import torch

    if got is None:
        return False, f"got None (did the function `return` its result?); want {_brief(want)}"
    if isinstance(want, str) or isinstance(got, str):
        ok = got == want
        return ok, "equal" if ok else f"got {got!r}, want {want!r}"
    try:
        a, b = _as_double(got), _as_double(want)
    except (TypeError, ValueError, RuntimeError) as e:
        return False, f"cannot compare {type(got).__name__} with {type(want).__name__}: {e}"
    if a.shape != b.shape:
        return False, f"shape {tuple(a.shape)}, want {tuple(b.shape)}"
    if a.numel() == 0:
        return True, "empty, equal shapes"
    err = (a - b).abs()                                   # same shape as the answer
    tol = atol + rtol * b.abs()                           # torch.isclose's rule, element-wise
    bad = ~(err <= tol)                                   # NaN counts as bad
    diff = err.nan_to_num(nan=math.inf).max().item()
    nz = b != 0                                           # relative difference where defined
    rel = (err[nz] / b.abs()[nz]).nan_to_num(nan=math.inf).max().item() if nz.any() else None
    rel_txt = f", max rel diff {rel:.3g}" if rel is not None else ""
    tol_txt = f"(atol {atol:g}, rtol {rtol:g})"
    if not bool(bad.any()):
        return True, f"max abs diff {diff:.3g}{rel_txt} {tol_txt}"
    i = int(torch.argmax(bad.double() * (err.nan_to_num(nan=math.inf) + 1)).item())
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
    where = f" at {idx}" if idx else ""
    n_bad = int(bad.sum().item())
    return False, (f"max abs diff {diff:.3g}{rel_txt} {tol_txt}; "
                   f"{n_bad}/{a.numel()} outside{where}: got {a.flatten()[i].item():.6g}, "
                   f"want {b.flatten()[i].item():.6g}")


def _brief(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else repr(x)[:60]


def check(name: str, got, want, *, atol: float = 1e-6, rtol: float = 1e-5) -> dict:
    """Compare a student's answer with the reference; print PASS/FAIL with the difference.

    ``got`` and ``want`` are numbers, tensors, arrays or nested lists of the same shape (compared
    element-wise as float64 with ``|got - want| <= atol + rtol * |want|``), strings (compared
    exactly), or dicts of those with the same keys (each key compared).  Raises ``AssertionError``
    on FAIL, so a notebook run stops at the first failing check.

    With the environment variable ``EDGELLM_PERTURB=f`` set (e.g. ``1.01``), ``got`` is first
    multiplied by ``f`` (exact zeros are shifted by ``f - 1``) and a FAIL does not raise, so that
    every check of a cell is exercised: a test runs every lab that way and expects every check to
    print FAIL, which proves the tolerances are tight enough to catch a 1% error.

    Returns ``{"name", "passed", "details"}``.
    """
    f = _perturb_factor()
    if f is not None:
        got = _perturb(got, f)
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            results = [(name, False, f"keys {keys}, want keys {sorted(want)}")]
        else:
            results = [(f"{name}[{k}]", *_compare(k, got[k], want[k], atol, rtol)) for k in want]
    else:
        results = [(name, *_compare(name, got, want, atol, rtol))]
    for label, ok, msg in results:
        print(f"{'PASS' if ok else 'FAIL'}  {label + ':':<28} {msg}")
    passed = all(ok for _, ok, _ in results)
    if not passed and f is None:
        failed = "; ".join(f"{label}: {msg}" for label, ok, msg in results if not ok)
        raise AssertionError(f"check {name!r} failed: {failed}")
    return {"name": name, "passed": passed, "details": [m for _, _, m in results]}


# --------------------------------------------------------------------------------------------
# parsing a lab notebook


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def is_solution_cell(cell) -> bool:
    return cell.get("cell_type") == "code" and BEGIN in _src(cell)


def calls_check(source: str) -> bool:
    """Does this code call ``check(...)`` (or ``something.check(...)``)? Definitions don't count."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:                       # IPython magics: fall back to a regular expression
        return bool(_CHECK_RE.search(source)) and "def check(" not in source
    return any(isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Name) and n.func.id == "check")
        or (isinstance(n.func, ast.Attribute) and n.func.attr == "check")) for n in ast.walk(tree))


def is_check_cell(cell) -> bool:
    return (cell.get("cell_type") == "code" and not is_solution_cell(cell)
            and calls_check(_src(cell)))


def defines_own_check(nb) -> bool:
    """True when a notebook defines its own ``check`` (which ignores EDGELLM_PERTURB)."""
    import ast

    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_src(cell))
        except SyntaxError:
            continue
        if any(isinstance(n, ast.FunctionDef | ast.Lambda) and getattr(n, "name", "") == "check"
               or isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "check"
                                                    for t in n.targets)
               for n in ast.walk(tree)):
            return True
    return False


def stub_source(source: str, *, where: str = "cell") -> tuple[str, list[str]]:
    """Replace each BEGIN/END SOLUTION block of ``source`` by a stub; return (source, hints).

    The stub is ``raise NotImplementedError("<hint>")`` indented like the ``### BEGIN SOLUTION``
    line; the hint comes from the ``# HINT: ...`` comment lines right before that marker (they are
    kept in the exercise), else a generic one.
    """
    lines = source.split("\n")
    out: list[str] = []
    hints: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == BEGIN:
            indent = line[: len(line) - len(line.lstrip())]
            hint_lines = []
            j = len(out) - 1
            while j >= 0 and out[j].strip().startswith(HINT):
                hint_lines.insert(0, out[j].strip()[len(HINT):].strip())
                j -= 1
            hint = " ".join(h for h in hint_lines if h) or GENERIC_HINT
            try:
                k = next(k for k in range(i + 1, len(lines)) if lines[k].strip() in (END, BEGIN))
            except StopIteration:
                raise LabFormatError(f"{where}: '{BEGIN}' at line {i + 1} has no '{END}' after "
                                     "it; close every solution block") from None
            if lines[k].strip() == BEGIN:
                raise LabFormatError(f"{where}: '{BEGIN}' at line {i + 1} is followed by another "
                                     f"'{BEGIN}' at line {k + 1}; close the first with '{END}'")
            out.append(f"{indent}raise NotImplementedError({json.dumps(hint, ensure_ascii=False)})")
            hints.append(hint)
            i = k + 1
            continue
        if line.strip() == END:
            raise LabFormatError(f"{where}: '{END}' at line {i + 1} has no '{BEGIN}' before it")
        out.append(line)
        i += 1
    return "\n".join(out), hints


@dataclass
class Exercise:
    cell: int            # index of the solution cell
    tier: str
    hints: list[str]
    checks: list[int] = field(default_factory=list)   # indices of its check cells


def exercises_of(nb, *, where: str = "notebook") -> list[Exercise]:
    """The exercises of a lab notebook, validated: tier, closed markers, at least one check cell.

    The tier is the last ``(easy)`` / ``(medium)`` / ``(research)`` mark in the markdown cells
    between the previous exercise and this one.  Raises :class:`LabFormatError` on a violation.
    """
    found: list[Exercise] = []
    tier = None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            marks = _TIER_RE.findall(_src(cell))
            if marks:
                tier = marks[-1].lower()
        elif is_solution_cell(cell):
            if tier is None:
                raise LabFormatError(
                    f"{where}: the exercise in cell {i} has no tier; put (easy), (medium) or "
                    "(research) in its heading or in a markdown cell before it")
            _, hints = stub_source(_src(cell), where=f"{where} cell {i}")
            found.append(Exercise(cell=i, tier=tier, hints=hints))
            tier = None
        elif is_check_cell(cell) and found:
            found[-1].checks.append(i)
        elif cell.cell_type == "code" and END in _src(cell):
            raise LabFormatError(f"{where}: cell {i} has '{END}' without '{BEGIN}'")
    for ex in found:
        if not ex.checks:
            raise LabFormatError(
                f"{where}: the exercise in cell {ex.cell} has no check cell after it; add a cell "
                "calling edgellm.course.labs.check(name, got, want, atol=..., rtol=...)")
    return found


# --------------------------------------------------------------------------------------------
# the generator


def make_exercise(nb, *, source_name: str = "solution.ipynb"):
    """The exercise notebook of a solution notebook: stubs instead of solutions, outputs stripped."""
    import copy

    exercises_of(nb, where=source_name)                  # validate first
    ex = copy.deepcopy(nb)
    for i, cell in enumerate(ex.cells):
        if cell.cell_type == "code":
            if is_solution_cell(cell):
                cell.source, _ = stub_source(_src(cell), where=f"{source_name} cell {i}")
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.metadata.pop("collapsed", None)
    ex.metadata.pop("widgets", None)
    ex.metadata["edgellm"] = {"generated_from": source_name,
                              "note": "generated by `make exercises`; edit the solution instead"}
    return ex


def _dumps(nb) -> str:
    import nbformat

    return nbformat.writes(nb) + "\n"


def expected_exercises(src_dir=None) -> dict[Path, str]:
    """{relative exercise path: notebook text} generated from every ``NN_*.ipynb`` in ``src_dir``."""
    import nbformat

    src_dir = Path(src_dir) if src_dir is not None else root() / "solutions"
    out = {}
    for path in sorted(src_dir.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        out[Path(path.name)] = _dumps(make_exercise(nb, source_name=f"{src_dir.name}/{path.name}"))
    return out


def generate(src_dir=None, dst_dir=None, *, quiet: bool = False) -> list[Path]:
    """Write ``dst_dir/NN_topic.ipynb`` for every ``src_dir/NN_topic.ipynb``; remove stale ones."""
    from edgellm.records import write_text

    src_dir = Path(src_dir) if src_dir is not None else root() / "solutions"
    dst_dir = Path(dst_dir) if dst_dir is not None else root() / "exercises"
    written = []
    expected = expected_exercises(src_dir)
    for rel, text in expected.items():
        path = dst_dir / rel
        if not path.is_file() or path.read_text() != text:
            write_text(text, path)
            if not quiet:
                print(f"wrote {path.relative_to(dst_dir.parent)}")
        written.append(path)
    for stale in sorted(dst_dir.glob("[0-9][0-9]_*.ipynb")):
        if Path(stale.name) not in expected:
            stale.unlink()
            if not quiet:
                print(f"removed {stale.relative_to(dst_dir.parent)} (no solution notebook)")
    return written


def drift(src_dir=None, dst_dir=None) -> list[str]:
    """What is out of date in ``dst_dir`` (empty when the exercises match the solutions)."""
    src_dir = Path(src_dir) if src_dir is not None else root() / "solutions"
    dst_dir = Path(dst_dir) if dst_dir is not None else root() / "exercises"
    expected = expected_exercises(src_dir)
    problems = []
    for rel, text in expected.items():
        path = dst_dir / rel
        if not path.is_file():
            problems.append(f"{dst_dir.name}/{rel} is missing")
        elif path.read_text() != text:
            problems.append(f"{dst_dir.name}/{rel} differs from its solution notebook")
    for extra in sorted(dst_dir.glob("[0-9][0-9]_*.ipynb")):
        if Path(extra.name) not in expected:
            problems.append(f"{dst_dir.name}/{extra.name} has no solution notebook")
    return problems


# --------------------------------------------------------------------------------------------
# executing labs and reading their checks


@dataclass
class NotebookRun:
    """An executed notebook: the notebook, its errors in cell order, the wall time."""
    path: Path
    nb: object
    errors: list[dict]           # [{"cell", "ename", "evalue"}]
    seconds: float
    stopped: bool                # True when execution stopped at the first error


def run_notebook(path, out=None, *, fast: bool = True, stop_on_error: bool = False,
                 env: dict | None = None, timeout: int = 900) -> NotebookRun:
    """Execute a notebook in a fresh kernel (via :func:`edgellm.course.run.execute_notebook`).

    ``stop_on_error=False`` runs every cell and collects the errors; ``True`` stops at the first.
    ``env`` sets extra environment variables for the kernel (e.g. ``{"EDGELLM_PERTURB": "1.01"}``).
    """
    import tempfile

    import nbformat
    from nbclient.exceptions import CellExecutionError

    from edgellm.course.run import execute_notebook

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
                                  allow_errors=not stop_on_error)
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


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream")


def check_results(nb) -> list[dict]:
    """Status of every check cell of an executed lab: PASS, FAIL, ERROR or NOT RUN."""
    rows = []
    for i, cell in enumerate(nb.cells):
        if not is_check_cell(cell):
            continue
        text = _stdout(cell)
        errs = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        lines = re.findall(r"^(PASS|FAIL)  (.+?):(?: +(.*)|$)", text, flags=re.M)
        n_pass = sum(r[0] == "PASS" for r in lines)
        fails = [f"{name}: {msg}" for kind, name, msg in lines if kind == "FAIL"]
        if cell.get("execution_count") is None and not cell.get("outputs"):
            status, detail = "NOT RUN", "an earlier cell stopped the run"
        elif fails:
            status, detail = "FAIL", "; ".join(fails)
        elif errs:
            status, detail = "ERROR", f"{errs[0].get('ename')}: {errs[0].get('evalue', '')}"
        elif n_pass:
            status, detail = "PASS", ""
        else:
            status, detail = "ERROR", "the check cell printed no PASS line"
        rows.append({"cell": i, "checks": [name for _, name, _ in lines], "passed": n_pass,
                     "failed": len(fails), "status": status, "detail": detail[:300]})
    return rows


def grade(path, *, fast: bool = True, out=None, timeout: int = 900) -> dict:
    """Execute a (student's) lab notebook and score its check cells: one point per passing cell."""
    path = Path(path)
    run = run_notebook(path, out, fast=fast, stop_on_error=False, timeout=timeout)
    rows = check_results(run.nb)
    stubs = sum(1 for e in run.errors if e["ename"] == "NotImplementedError")
    return {"notebook": str(path), "score": sum(r["status"] == "PASS" for r in rows),
            "max_score": len(rows), "unanswered_stubs": stubs,
            "seconds": round(run.seconds, 1), "checks": rows}


# --------------------------------------------------------------------------------------------
# nbgrader source notebooks (for instructors who grade with nbgrader)


def to_nbgrader(nb, *, points: int = 1):
    """A copy of a solution notebook with nbgrader cell metadata: solution cells and graded checks.

    nbgrader's ``generate_assignment`` then strips the solutions itself (same markers) and its
    ``autograde`` runs the check cells as tests, ``points`` each.
    """
    import copy

    out = copy.deepcopy(nb)
    n = 0
    for i, cell in enumerate(out.cells):
        meta = None
        if is_solution_cell(cell):
            meta = {"solution": True, "grade": False, "locked": False}
        elif is_check_cell(cell):
            meta = {"solution": False, "grade": True, "locked": True, "points": points}
        if meta is None:
            continue
        n += 1
        cell.metadata["nbgrader"] = {"schema_version": 3, "grade_id": f"cell-{i:03d}-{n}",
                                     "task": False, **meta}
    return out


def write_nbgrader_source(out_dir, src_dir=None, *, assignment_prefix: str = "") -> list[Path]:
    """``out_dir/source/<NN_topic>/<NN_topic>.ipynb`` for every solution notebook (nbgrader layout)."""
    import nbformat

    from edgellm.records import write_text

    src_dir = Path(src_dir) if src_dir is not None else root() / "solutions"
    written = []
    for path in sorted(src_dir.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        exercises_of(nb, where=path.name)
        name = assignment_prefix + path.stem
        dest = Path(out_dir) / "source" / name / path.name
        write_text(_dumps(to_nbgrader(nb)), dest)
        written.append(dest)
    return written
