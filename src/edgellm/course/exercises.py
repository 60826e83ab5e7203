"""Exercise sheets from one source: ``solutions/NN_topic.ipynb`` -> ``exercises/NN_topic.ipynb``.

A lab notebook in ``solutions/`` is the single source of its exercise sheet:

* the solution code sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
  markers) inside a function body; ``# HINT: ...`` comment lines right before
  ``### BEGIN SOLUTION`` give the hint the stub raises with;
* every exercise has a tier, written in a markdown cell before it: ``(easy)``, ``(medium)`` or
  ``(research)``;
* every exercise is followed by check cells that call :func:`edgellm.course.labs.check`.

:func:`generate` writes ``exercises/NN_topic.ipynb`` with each solution replaced by
``raise NotImplementedError("<hint>")`` at the same indentation, the checks kept; :func:`drift`
says whether ``exercises/`` is up to date; :func:`write_nbgrader_source` exports for nbgrader.
``edgellm exercises generate | check-drift | nbgrader OUT``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.paths import root

BEGIN = "### BEGIN SOLUTION"


END = "### END SOLUTION"


HINT = "# HINT:"


TIERS = ("easy", "medium", "research")


GENERIC_HINT = "write your solution here (replace this line)"


_TIER_RE = re.compile(r"\((easy|medium|research)\)", re.IGNORECASE)


_CHECK_RE = re.compile(r"(?<![\w.])check\(|\.check\(")


class LabFormatError(EdgeLLMError):
    """A solution notebook does not follow the lab conventions (markers, hints, tiers, checks)."""


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
    if not expected:  # never empty dst_dir because src_dir was mistyped
        raise LabFormatError(f"no solution notebooks (NN_topic.ipynb) in {src_dir}; nothing "
                             "written or removed")
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
