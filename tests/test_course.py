"""The course machinery: exercises generated from solutions, checks that pass and fail when they
should, stripped notebooks, lint, the rendered offline course and its results page."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from edgellm.course import exercises as ex
from edgellm.course import labs
from edgellm.course.exercises import LabFormatError
from edgellm.course.labs import check
from edgellm.course.run import course_notebooks
from edgellm.paths import root

ROOT = root()

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_LAB = FIXTURES / "solutions" / "90_fixture_lab.ipynb"
FIXTURE_LESSON = FIXTURES / "notebooks" / "00_fixture_widgets.ipynb"
SOLUTIONS = course_notebooks("solutions")
LESSONS = course_notebooks("notebooks")
EXERCISES = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))


def _ids(paths):
    return [p.stem for p in paths]


# --------------------------------------------------------------------------------------------
# check(): the comparison every lab cell makes


def test_check_passes_within_tolerance_and_prints_the_difference(capsys):
    r = check("w", [1.0, 2.0], [1.0, 2.0 + 1e-7], atol=1e-6, rtol=0)
    assert r["passed"]
    line = capsys.readouterr().out
    assert line.startswith("PASS  w:") and "max abs diff 1e-07" in line


def test_check_fails_with_location_and_values(capsys):
    with pytest.raises(AssertionError, match="max abs diff 0.5"):
        check("w", torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.5]]))
    out = capsys.readouterr().out
    assert out.startswith("FAIL  w:") and "at (1, 1)" in out and "got 4, want 4.5" in out


@pytest.mark.parametrize("got, want, why", [
    (None, 1.0, "got None"),
    (torch.zeros(3), torch.zeros(4), "shape (3,), want (4,)"),
    ("abc", "abd", "got 'abc', want 'abd'"),
    ({"a": 1.0}, {"a": 1.0, "b": 2.0}, "want keys"),
    (float("nan"), 1.0, "outside"),
])
def test_check_rejects(got, want, why):
    with pytest.raises(AssertionError, match=re.escape(why)):
        check("x", got, want)


def test_check_compares_each_key_of_a_dict(capsys):
    check("pair", {"q": torch.ones(2), "n": 3}, {"q": torch.ones(2), "n": 3})
    assert capsys.readouterr().out.count("PASS  pair[") == 2
    with pytest.raises(AssertionError, match=r"pair\[n\]"):
        check("pair", {"q": torch.ones(2), "n": 4}, {"q": torch.ones(2), "n": 3})


def test_perturbation_makes_an_exact_answer_fail(monkeypatch):
    want = {"w": torch.tensor([0.0, 1.5, -2.0]), "count": 7, "zeros": torch.zeros(3)}
    check("exact", want, want)                                    # passes unperturbed
    monkeypatch.setenv(labs.PERTURB_ENV, "1.01")
    for key in want:                          # every value type moves; FAIL is printed, not raised
        assert not check(key, want[key], want[key], atol=1e-3, rtol=1e-3)["passed"]
    monkeypatch.setenv(labs.PERTURB_ENV, "abc")
    with pytest.raises(ex.EdgeLLMError, match="not a number"):
        check("x", 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# the generator


def test_stub_keeps_indentation_and_hint():
    src = ("def f(x):\n    y = 1\n    # HINT: add one\n    # HINT: then double\n"
           "    ### BEGIN SOLUTION\n    z = x + y\n    return 2 * z\n    ### END SOLUTION\n"
           "\n\ndef g():\n    ### BEGIN SOLUTION\n    return 0\n    ### END SOLUTION")
    out, hints = ex.stub_source(src)
    assert hints == ["add one then double", ex.GENERIC_HINT]
    assert '    raise NotImplementedError("add one then double")' in out.split("\n")
    assert f'    raise NotImplementedError("{ex.GENERIC_HINT}")' in out.split("\n")
    assert "z = x + y" not in out and "return 0" not in out and "SOLUTION" not in out
    assert out.startswith("def f(x):\n    y = 1\n    # HINT: add one")
    compile(out, "stub", "exec")                                  # still valid Python


@pytest.mark.parametrize("src, msg", [
    ("### BEGIN SOLUTION\nx = 1\n", "has no '### END SOLUTION'"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "followed by another"),
    ("x = 1\n### END SOLUTION", "has no '### BEGIN SOLUTION' before it"),
])
def test_stub_rejects_unbalanced_markers(src, msg):
    with pytest.raises(LabFormatError, match=re.escape(msg)):
        ex.stub_source(src)


def test_fixture_lab_parses_with_tiers_hints_and_checks():
    nb = nbformat.read(FIXTURE_LAB, as_version=4)
    found = ex.exercises_of(nb)
    assert [e.tier for e in found] == ["easy", "medium", "research"]
    assert found[0].hints[0].startswith("square, average")
    assert all(e.checks for e in found)


def test_lab_without_tier_or_check_is_rejected():
    nb = nbformat.read(FIXTURE_LAB, as_version=4)
    no_tier = nbformat.from_dict(json.loads(json.dumps(nb)))
    no_tier.cells[2].source = "## Exercise 1: root mean square"
    with pytest.raises(LabFormatError, match="cell 3 has no tier"):
        ex.exercises_of(no_tier)
    no_check = nbformat.from_dict(json.loads(json.dumps(nb)))
    del no_check.cells[4]
    with pytest.raises(LabFormatError, match="cell 3 has no check cell"):
        ex.exercises_of(no_check)


def test_generate_writes_stubs_keeps_checks_and_detects_drift(tmp_path):
    src, dst = tmp_path / "solutions", tmp_path / "exercises"
    src.mkdir()
    shutil.copy(FIXTURE_LAB, src)
    assert ex.drift(src, dst) == ["exercises/90_fixture_lab.ipynb is missing"]
    ex.generate(src, dst, quiet=True)
    assert ex.drift(src, dst) == []
    sol = nbformat.read(FIXTURE_LAB, as_version=4)
    gen = nbformat.read(dst / FIXTURE_LAB.name, as_version=4)
    assert len(gen.cells) == len(sol.cells)
    for a, b in zip(sol.cells, gen.cells, strict=True):
        if ex.is_solution_cell(a):
            assert "raise NotImplementedError(" in b.source and "SOLUTION" not in b.source
            assert "z = (x - x.amax" not in b.source and "x - x.mean(-1" not in b.source
        else:
            assert a.source == b.source                          # checks and text kept
        if b.cell_type == "code":
            assert b.outputs == [] and b.execution_count is None
    assert gen.metadata["edgellm"]["generated_from"] == "solutions/90_fixture_lab.ipynb"
    # an edit of the solution is drift until regenerated; a stray exercise is drift too
    sol.cells[3].source = sol.cells[3].source.replace("square root", "sqrt")
    nbformat.write(sol, src / FIXTURE_LAB.name)
    (dst / "91_orphan.ipynb").write_text((dst / FIXTURE_LAB.name).read_text())
    assert ex.drift(src, dst) == ["exercises/90_fixture_lab.ipynb differs from its solution notebook",
                                  "exercises/91_orphan.ipynb has no solution notebook"]
    ex.generate(src, dst, quiet=True)
    assert ex.drift(src, dst) == [] and not (dst / "91_orphan.ipynb").exists()


def test_nbgrader_metadata_marks_solutions_and_graded_checks(tmp_path):
    nb = nbformat.read(FIXTURE_LAB, as_version=4)
    out = ex.to_nbgrader(nb)
    meta = [c.metadata.get("nbgrader") for c in out.cells]
    assert [m["solution"] for m in meta if m] == [True, False] * 3
    assert all(m["points"] == 1 for m in meta if m and m["grade"])
    assert len({m["grade_id"] for m in meta if m}) == 6


def test_fixture_lab_solutions_pass_exercises_stop_and_perturbed_checks_fail(tmp_path, notebook_run):
    """The whole cycle on a small lab: 3 short executions."""
    sol = notebook_run(FIXTURE_LAB)
    assert sol.errors == []
    assert [r["status"] for r in labs.check_results(sol.nb)] == ["PASS"] * 3
    ex.generate(FIXTURE_LAB.parent, tmp_path, quiet=True)
    stub = notebook_run(tmp_path / FIXTURE_LAB.name, "stop")
    assert stub.stopped and [e["ename"] for e in stub.errors] == ["NotImplementedError"]
    assert stub.errors[0]["evalue"].startswith("square, average")
    bad = notebook_run(FIXTURE_LAB, "perturbed")
    rows = labs.check_results(bad.nb)
    assert bad.errors == []                   # a perturbed FAIL prints and goes on to the next check
    assert [(r["status"], r["failed"], r["passed"]) for r in rows] == [("FAIL", 1, 0), ("FAIL", 2, 0),
                                                                        ("FAIL", 1, 0)], rows
    assert "max abs diff" in rows[0]["detail"]


# --------------------------------------------------------------------------------------------
# the course's own labs


def test_exercises_are_up_to_date_with_solutions():
    problems = ex.drift()
    assert problems == [], "; ".join(problems) + " -- run `make exercises`"


@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_solution_notebook_follows_the_lab_conventions(path):
    nb = nbformat.read(path, as_version=4)
    found = ex.exercises_of(nb, where=path.name)
    assert found, f"{path.name} has no exercise (### BEGIN SOLUTION ... ### END SOLUTION)"
    assert not ex.defines_own_check(nb), (
        f"{path.name} defines its own check(); use `from edgellm.course.labs import check` (same "
        "signature: check(name, got, want, atol=, rtol=)) so that the perturbation test works")


def test_check_calls_are_found_by_syntax_not_by_text():
    assert ex.calls_check("check('a', f(x), y, atol=1e-6)")
    assert ex.calls_check("from edgellm import exercises\nexercises.check('a', 1, 1)")
    assert not ex.calls_check("def check(name, got, want):\n    return got == want")
    assert not ex.calls_check("# we check(ed) this by hand\nx = 1")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("def check(a, b):\n    pass")])
    assert ex.defines_own_check(nb)
    assert not ex.defines_own_check(nbformat.read(FIXTURE_LAB, as_version=4))


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_solution_passes_all_its_checks(path, notebook_run):
    run = notebook_run(path)
    rows = labs.check_results(run.nb)
    assert run.errors == [], f"{path.name}: {run.errors}"
    assert rows and all(r["status"] == "PASS" for r in rows), rows


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("path", EXERCISES, ids=_ids(EXERCISES))
def test_exercise_stops_only_at_a_stub(path, notebook_run):
    run = notebook_run(path, "stop")
    assert run.errors, f"{path.name} ran to the end: its stubs never raised"
    first = run.errors[0]
    assert first["ename"] == "NotImplementedError", (
        f"{path.name}: cell {first['cell']} raised {first['ename']}: {first['evalue']} "
        "before any stub was reached")
    hints = {h for e in ex.exercises_of(nbformat.read(ROOT / "solutions" / path.name, as_version=4))
             for h in e.hints}
    assert first["evalue"] in hints


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_every_check_fails_on_a_perturbed_answer(path, notebook_run):
    """Every check is fed the answer x 1.01 (EDGELLM_PERTURB=1.01) and must print FAIL.

    In that mode check() prints FAIL without raising, so every check() call of every cell runs.
    """
    run = notebook_run(path, "perturbed")
    rows = labs.check_results(run.nb)
    assert run.errors == [], f"{path.name}: errors in the perturbed run: {run.errors}"
    lax = [r for r in rows if r["status"] != "FAIL" or r["passed"]]
    assert rows and not lax, (f"{path.name}: these check cells passed an answer off by 1% "
                              f"(tolerance too loose, or not using edgellm.course.labs.check): {lax}")


# --------------------------------------------------------------------------------------------
# hygiene


def _tracked_notebooks():
    out = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True, text=True)
    listed = {ROOT / p for p in out.stdout.split()} if out.returncode == 0 else set()
    for folder in ("notebooks", "solutions", "exercises", "tests/fixtures"):
        listed |= set((ROOT / folder).rglob("*.ipynb"))
    return sorted(p for p in listed if p.is_file() and ".ipynb_checkpoints" not in p.parts)


def test_notebooks_are_committed_with_outputs_stripped():
    dirty = []
    for path in _tracked_notebooks():
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{path.relative_to(ROOT)} cell {i}")
                break
        if "widgets" in nb.metadata:
            dirty.append(f"{path.relative_to(ROOT)} (widget state in metadata)")
        raw = json.loads(path.read_text(encoding="utf-8"))  # nbformat.read adds missing ids
        if any("id" not in cell for cell in raw["cells"]):
            dirty.append(f"{path.relative_to(ROOT)} (cells without an id: nbformat.validator."
                         "normalize adds them)")
    assert not dirty, "not committed clean (strip outputs with nbstripout or write them empty): " + \
        ", ".join(dirty)


def test_lint_is_clean():
    """`make lint`: ruff on the package, tests, scripts and the notebooks."""
    ruff = Path(sys.executable).parent / "ruff"
    targets = [t for t in ("src", "tests", "scripts", "notebooks", "solutions") if (ROOT / t).exists()]
    r = subprocess.run([str(ruff), "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_tqdm_auto_is_plain_text_outside_jupyter():
    code = "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='steps'): pass\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "steps: 100%|" in r.stderr and "| 3/3 [" in r.stderr
    assert "<div" not in r.stderr and "Widget" not in r.stderr


@pytest.mark.notebook
def test_tqdm_auto_is_a_widget_in_jupyter_with_a_text_fallback(notebook_run):
    run = notebook_run(FIXTURE_LESSON)
    assert run.errors == []
    outs = run.nb.cells[1].outputs
    bars = [o for o in outs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert bars, outs
    assert bars[0]["data"]["text/plain"].startswith("steps:")      # the text a plain viewer shows
    # the widget state saved with the notebook holds the finished bar (what the HTML page draws)
    state = run.nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    done = [m["state"] for m in state.values() if m["model_name"] in ("FloatProgressModel",
                                                                       "IntProgressModel")]
    assert done and done[0]["value"] == done[0]["max"] == 5


@pytest.mark.notebook
def test_output_widget_text_stays_in_the_cell_outputs(notebook_run):
    """execute_notebook turns off nbclient's Output-widget emulation (it can stall a cell until
    the timeout): what `with out: print(...)` writes is then a plain output of the cell."""
    run = notebook_run(FIXTURE_LESSON)
    texts = [o.get("text", "") for o in run.nb.cells[2].outputs if o["output_type"] == "stream"]
    assert "weights: 269.0 MB\n" in texts, run.nb.cells[2].outputs


# --------------------------------------------------------------------------------------------
# the rendered course


def test_results_page_has_each_sweep_table_and_plot(tmp_path):
    from edgellm.course.results_page import render_results

    sweep = {"name": "bits_sweep", "description": "ppl against bits",
             "commands": [f"edgellm ppl --bits {b}" for b in (3, 4, 8)],
             "records": [{"bits": b, "ppl": p, "ppl_base": 10.0, "protocol": "gptq", "ctx": 512,
                          "model": "smollm2-135m", "command": f"edgellm ppl --bits {b}"}
                         for b, p in ((3, 19.5), (4, 12.25), (8, 10.01))]}
    empty = {"name": "not_run", "commands": ["edgellm ppl --ctx 64"], "records": []}
    summary = render_results(tmp_path, [sweep, empty])
    page = (tmp_path / "results.html").read_text()
    assert "12.25" in page and "edgellm ppl --bits 4" in page and "Not run yet" in page
    assert summary["sweeps"][0]["plot"] == "results/bits_sweep.png"
    assert (tmp_path / "results" / "bits_sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["sweeps"][0]["records"][1]["ppl"] == 12.25


def _script_and_css_urls(page: str) -> list[str]:
    return re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', page) + \
        re.findall(r"var widgetRendererSrc = '([^']+)'", page)


def test_course_renders_offline_pages_for_executed_notebooks(tmp_path, notebook_run):
    from edgellm.course.build import render_course
    from edgellm.course.render import assets_available

    if not assets_available():
        from conftest import skip_missing_system_part
        skip_missing_system_part("the offline web assets are not installed: run "
                                 "scripts/ci_system_deps.sh", "the npm web assets")
    runs = []
    for folder, path in (("notebooks", FIXTURE_LESSON), ("solutions", FIXTURE_LAB)):
        run = notebook_run(path)
        dest = tmp_path / folder / path.name
        dest.parent.mkdir(parents=True)
        nbformat.write(run.nb, dest)
        runs.append({"folder": folder, "name": path.stem, "ipynb": str(dest), "status": "ok",
                     "seconds": run.seconds})
    render_course(tmp_path, runs, fast=True)
    index = (tmp_path / "index.html").read_text()
    assert "notebooks/00_fixture_widgets.html" in index and "Fixture lab" in index
    lesson = (tmp_path / "notebooks" / "00_fixture_widgets.html").read_text()
    assert "application/vnd.jupyter.widget-state+json" in lesson        # widget state embedded
    for url in _script_and_css_urls(lesson) + _script_and_css_urls(index):
        assert not url.startswith(("http:", "https:", "//")), url
        target = (tmp_path / "notebooks" if "notebooks/" in url or url.startswith("..") else
                  tmp_path) / url.split("?")[0]
        assert target.resolve().is_file(), url
    for asset in ("_static/mathjax/MathJax.js", "_static/mathjax/config/TeX-AMS_CHTML-full.js",
                  "_static/html-manager/embed-amd.js", "_static/require.js"):
        assert (tmp_path / asset).is_file(), asset


@pytest.mark.notebook
def test_course_main_executes_and_renders(tmp_path, monkeypatch):
    """`edgellm course run --out DIR --fast` (here on the small fixture lesson only)."""
    from edgellm.cli import main
    from edgellm.course import run as course_run
    from edgellm.course.render import assets_available

    if not assets_available():
        from conftest import skip_missing_system_part
        skip_missing_system_part("the offline web assets are not installed: run "
                                 "scripts/ci_system_deps.sh", "the npm web assets")
    monkeypatch.setattr(course_run, "course_notebooks", lambda *a: [FIXTURE_LESSON, FIXTURE_LAB])
    code = main(["course", "run", "--out", str(tmp_path), "--fast", "--only", "00_fixture"])
    assert code == 0
    assert (tmp_path / "notebooks" / "00_fixture_widgets.html").is_file()
    assert not (tmp_path / "solutions").exists()                 # --only filtered the lab out
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["notebooks"][0]["status"] == "ok"
    assert "00_fixture_widgets.html" in (tmp_path / "index.html").read_text()


def test_rendered_course_has_a_page_per_notebook(rendered_course):
    index = (rendered_course / "index.html").read_text()
    summary = json.loads((rendered_course / "results.json").read_text())
    rendered = {(n["folder"], n["name"]) for n in summary["notebooks"]}
    assert {(p.parent.name, p.stem) for p in SOLUTIONS + LESSONS} <= rendered
    for folder, name in rendered:
        page = rendered_course / folder / f"{name}.html"
        assert page.is_file(), page
        assert f"{folder}/{name}.html" in index
        for url in _script_and_css_urls(page.read_text()):
            assert not url.startswith(("http:", "https:", "//")), f"{page.name}: {url}"
    assert {s["name"] for s in summary["sweeps"]} == {
        p.stem for p in (ROOT / "results").glob("*.json")}
    assert os.path.isfile(rendered_course / "results.html")
