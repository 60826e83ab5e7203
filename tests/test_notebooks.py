"""Every lesson in notebooks/ runs top to bottom in FAST mode on the real default model.

Notebooks run through the session-wide ``notebook_run`` fixture (tests/conftest.py), so the
rendered-course and browser tests reuse these runs instead of executing again.  Labs in solutions/
and exercises/ are checked in test_course.py.  Executed copies land in build/test-runs/.
"""

import pytest

from edgellm.course.run import course_notebooks

LESSONS = course_notebooks("notebooks")


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_in_fast_mode(path, notebook_run):
    run = notebook_run(path)
    assert not run.errors, run.errors[0]
    print(f"{path.name}: {run.seconds:.1f} s in FAST mode")


def test_there_are_lessons():
    assert [p.stem[:2] for p in LESSONS][:2] == ["00", "01"]
