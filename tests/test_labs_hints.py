"""Labs 01–06 teach rather than tell: every exercise has a first hint that points (the stub raises
it) and a second, collapsed one that narrows; neither carries a line of the solution; every lab has
an open research task graded by a measured target (edgellm.course.labchecks), not a fixed answer."""

import re

import nbformat
import pytest

from edgellm.course import exercises as ex
from edgellm.paths import root

LABS = sorted((root() / "solutions").glob("[0-9][0-9]_*.ipynb"))   # every lab, new ones too
HINT2 = re.compile(r"<details><summary>Hint 2</summary>(.*?)</details>", re.S)


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _solution_lines(src: str) -> list[str]:
    """The code lines between the solution markers, without comments and short lines."""
    out, inside = [], False
    for line in src.split("\n"):
        s = line.strip()
        if s == ex.BEGIN:
            inside = True
        elif s == ex.END:
            inside = False
        elif inside and s and not s.startswith("#"):
            code = s.split("  #")[0].strip()
            if len(_norm(code)) >= 16 and not code.startswith(("return ", "def ", "for ", "if ")):
                out.append(code)
    return out


def _exercises(path):
    nb = nbformat.read(path, as_version=4)
    found = ex.exercises_of(nb, where=path.name)
    prev = 0
    for e in found:
        text = "\n".join(c.source for c in nb.cells[prev:e.cell] if c.cell_type == "markdown")
        yield nb, e, text
        prev = e.cell + 1


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_every_exercise_has_a_pointing_hint_and_a_collapsed_second_hint(path):
    for nb, e, text in _exercises(path):
        where = f"{path.name} cell {e.cell}"
        assert e.hints and ex.GENERIC_HINT not in e.hints, f"{where}: no # HINT: line"
        hint2 = HINT2.findall(text)
        assert len(hint2) == 1 and hint2[0].strip(), f"{where}: no <details> Hint 2 in its text"
        for h in e.hints:
            assert not h.lower().startswith("hint 2"), f"{where}: the stub must raise hint 1 only"
        given = _norm(" ".join(e.hints) + hint2[0])
        for line in _solution_lines(nb.cells[e.cell].source):
            assert _norm(line) not in given, f"{where}: a hint repeats the solution line {line!r}"


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_every_lab_has_an_open_research_task_graded_on_a_target(path):
    research = [(nb, e) for nb, e, _ in _exercises(path) if e.tier == "research"]
    assert research, f"{path.name} has no research-tier exercise"
    for nb, e in research:
        checks = "\n".join(nb.cells[i].source for i in e.checks)
        assert re.search(r"\b\w+_task\(", checks), (
            f"{path.name} cell {e.cell}: a research task is graded by an edgellm.course.labchecks "
            "grader (a measured target), not against a fixed answer")
        assert "constraints_ok" in checks and "target_met" in checks


def test_the_solution_line_filter_sees_a_given_away_hint():
    src = "def f(x):\n    # HINT: use y = x.abs().amax(0) * 2\n    ### BEGIN SOLUTION\n" \
          "    y = x.abs().amax(0) * 2\n    return y\n    ### END SOLUTION"
    _, hints = ex.stub_source(src)
    assert any(_norm(line) in _norm(hints[0]) for line in _solution_lines(src))
