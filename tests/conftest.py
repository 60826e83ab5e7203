"""Shared fixtures. The hub is switched off for the whole suite: nothing here may reach it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of smollm2-135m, loaded once per session. Do not modify it in place:
    tests that change weights work on ``copy.deepcopy(model)``."""
    from edgellm import load_model

    torch.manual_seed(0)
    return load_model(quiet=True)


def random_ids(batch: int = 2, seq: int = 24, seed: int = 0):
    """Seeded random token ids (batch, seq) for the tiny model (vocabulary 256)."""
    import torch

    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def tiny():
    """A tiny randomly initialised Llama (fresh for each test)."""
    from edgellm import tiny_llama

    return tiny_llama()


# --------------------------------------------------------------------------------------------
# executed notebooks, shared by every test of a session: each notebook runs at most once per kind

def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives Chromium through playwright-core")


NOTEBOOK_RUN_KINDS = {
    # kind: (stop at the first error, extra environment of the kernel)
    "all": (False, {}),                                   # every cell; errors collected
    "stop": (True, {}),                                   # stops at the first error (exercises)
    "perturbed": (False, {"EDGELLM_PERTURB": "1.01"}),    # every check fed its answer x 1.01
}


@pytest.fixture(scope="session")
def notebook_run():
    """``notebook_run(path, kind="all") -> edgellm.course.labs.NotebookRun`` in FAST mode.

    Cached for the session by (path, kind), so that no notebook is executed twice in one
    ``make test``: use it for every test that needs an executed notebook.  ``run.nb`` is the
    executed notebook, ``run.errors`` its errors in cell order, ``run.seconds`` the wall time.
    Executed copies are written to ``build/test-runs/<kind>/<folder>/<name>.ipynb``.
    """
    from pathlib import Path

    from edgellm.course.labs import run_notebook
    from edgellm.paths import root

    ROOT = root()

    cache = {}

    def run(path, kind="all"):
        path = Path(path).resolve()
        key = (path, kind)
        if key not in cache:
            stop, env = NOTEBOOK_RUN_KINDS[kind]
            out = ROOT / "build" / "test-runs" / kind / path.parent.name / path.name
            cache[key] = run_notebook(path, out, fast=True, stop_on_error=stop, env=env)
        return cache[key]

    return run


def _fail_or_skip(message):
    """Missing system parts (Chromium, npm packages): skip locally, fail in CI (CI=true)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: this must not be skipped)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def rendered_course(notebook_run):
    """``build/test-course``: every notebook of notebooks/ and solutions/ executed in FAST mode
    (through ``notebook_run``, so nothing runs twice) and rendered as the offline HTML course."""
    import shutil

    from edgellm.course.render import assets_available, render_course
    from edgellm.course.run import course_notebooks
    from edgellm.paths import root

    if not assets_available():
        _fail_or_skip("the offline web assets are not installed: run scripts/ci_system_deps.sh")
    ROOT = root()
    out = ROOT / "build" / "test-course"
    shutil.rmtree(out, ignore_errors=True)
    runs = []
    for path in course_notebooks():
        run = notebook_run(path)
        dest = out / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "build" / "test-runs" / "all" / path.parent.name / path.name, dest)
        e = run.errors[0] if run.errors else None
        runs.append({"folder": path.parent.name, "name": path.stem, "ipynb": str(dest),
                     "status": "ok" if e is None else f"{e['ename']}: {e['evalue']}",
                     "seconds": round(run.seconds, 1)})
    render_course(out, runs, fast=True)
    return out
