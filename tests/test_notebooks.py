"""Every lesson in notebooks/ runs top to bottom in FAST mode on the real default model.

(Labs in solutions/ and exercises/ are executed by test_course.py.)  Executed copies are kept in
build/test-notebooks/ for reading after a failure.
"""

import time

import pytest

from edgellm.course import ROOT, course_notebooks, execute_notebook

LESSONS = course_notebooks("notebooks")


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_in_fast_mode(path):
    t0 = time.perf_counter()
    nb = execute_notebook(path, ROOT / "build" / "test-notebooks" / path.name, fast=True)
    seconds = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    print(f"{path.name}: {seconds:.1f} s in FAST mode")


def test_there_are_lessons():
    assert [p.stem[:2] for p in LESSONS][:2] == ["00", "01"]
