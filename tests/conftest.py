"""Shared fixtures. The hub is switched off for the whole suite: nothing here may reach it, and
every model runs on the CPU (``EDGELLM_DEVICE=cpu``; tests/test_devices.py checks the plumbing)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["EDGELLM_DEVICE"] = "cpu"  # the suite runs on the CPU, also on a GPU machine

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

NOTEBOOK_RUN_KINDS = {
    # kind: (stop at the first error, extra environment of the kernel)
    "all": (False, {}),                                   # every cell; errors collected
    "stop": (True, {}),                                   # stops at the first error (exercises)
    "perturbed": (False, {"EDGELLM_PERTURB": "1.01"}),    # every check fed its answer x 1.01
}


# Every lesson of notebooks/ runs with a ``%reset -f`` before each ``## `` section in the "all"
# run, so a section that leans on an earlier one fails its test (each section must run after a
# kernel restart).


def resets_sections(path, kind: str) -> bool:
    return (kind == "all" and path.parent.parent.name != "fixtures"
            and path.parent.name == "notebooks")


@pytest.fixture(scope="session")
def notebook_run():
    """``notebook_run(path, kind="all") -> edgellm.course.run.NotebookRun`` in FAST mode.

    Cached for the session by (path, kind), so that no notebook is executed twice in one
    ``make test``: use it for every test that needs an executed notebook.  ``run.nb`` is the
    executed notebook, ``run.errors`` its errors in cell order, ``run.seconds`` the wall time.
    Executed copies are written to ``build/test-runs/<kind>/<folder>/<name>.ipynb``.
    """
    from pathlib import Path

    from edgellm.course.run import run_notebook
    from edgellm.paths import root

    ROOT = root()

    cache = {}

    def run(path, kind="all"):
        path = Path(path).resolve()
        key = (path, kind)
        if key not in cache:
            stop, env = NOTEBOOK_RUN_KINDS[kind]
            out = ROOT / "build" / "test-runs" / kind / path.parent.name / path.name
            cache[key] = run_notebook(path, out, fast=True, stop_on_error=stop, env=env,
                                      reset_sections=resets_sections(path, kind))
        return cache[key]

    return run


SYSTEM_PARTS = ("Chromium", "the npm web assets", "npm", "llama.cpp tools")
INSTALL_SYSTEM_PARTS = "sudo bash scripts/ci_system_deps.sh   (or, as root: bash scripts/ci_system_deps.sh)"
_MISSING = "missing system part"


def skip_missing_system_part(message: str, *parts: str):
    """Skip a test for missing system parts (from ``SYSTEM_PARTS``) locally; fail it in CI
    (``CI=true``).  The end-of-run summary lists these skips with the command that installs
    the parts, so use this helper for every such skip."""
    unknown = [p for p in parts if p not in SYSTEM_PARTS]
    if not parts or unknown:
        raise ValueError(f"system parts {unknown or parts!r}: name one or more of {SYSTEM_PARTS}")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: this must not be skipped)")
    pytest.skip(f"{_MISSING}: {', '.join(parts)}: {message}")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Which tests were skipped for a missing system part, and how to install it."""
    by_part: dict[str, list[str]] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if _MISSING not in message:
            continue
        for part in message.split(f"{_MISSING}: ", 1)[1].split(":", 1)[0].split(", "):
            by_part.setdefault(part, []).append(rep.nodeid)
    if not by_part:
        return
    terminalreporter.section("skipped: missing system parts")
    for part, ids in sorted(by_part.items()):
        terminalreporter.write_line(f"{part}: {len(ids)} test(s) skipped")
        for nodeid in ids:
            terminalreporter.write_line(f"    {nodeid}")
    terminalreporter.write_line(f"install them with: {INSTALL_SYSTEM_PARTS}")


# --------------------------------------------------------------------------------------------
# the fast tier (make test-fast): tiny models only, and a guard so that the split cannot leak

SLOW_FIXTURES = {"default_model", "notebook_run", "rendered_course"}
SLOW_MARKERS = {"integration", "notebook", "browser", "llamacpp", "runtimes", "kernels"}
FAST_TIER = os.environ.get("EDGELLM_TEST_TIER", "") == "fast"
if FAST_TIER:
    # `edgellm` subprocesses cannot be patched: point their model cache below a plain file, so
    # that reaching for the default model fails at once with this sentence in the error
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    # the offline web assets stay where they are (they hold no model)
    _web = Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm") / "web"
    if (_web / "node_modules").is_dir():
        os.environ.setdefault("EDGELLM_NODE_MODULES", str(_web / "node_modules"))
    _tmp = tempfile.mkdtemp(prefix="edgellm-fast-tier-")
    atexit.register(shutil.rmtree, _tmp, True)
    _blocker = Path(_tmp) / "no-models-in-the-fast-tier"
    _blocker.touch()
    os.environ["EDGELLM_CACHE"] = str(
        _blocker / "this test needs the default model: mark it integration")


def pytest_collection_modifyitems(config, items):
    """Every test that needs neither the default model nor a kernel gets the ``fast`` marker."""
    for item in items:
        slow = SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        slow = slow or SLOW_MARKERS & {m.name for m in item.iter_markers()}
        if not slow:
            item.add_marker(pytest.mark.fast)


def _leak(what: str, mark: str = "integration/notebook"):
    def refuse(*args, **kwargs):
        pytest.fail(f"this test needs {what}: mark it {mark} "
                    "(EDGELLM_TEST_TIER=fast runs tiny models only)", pytrace=False)
    return refuse


@pytest.fixture(autouse=True)
def _fast_tier_guard(monkeypatch):
    """Under ``EDGELLM_TEST_TIER=fast``: loading or fetching the default model, starting a
    Jupyter kernel or building llama.cpp's tools fails the test (so a wrongly unmarked test
    shows up in ``make test-fast``)."""
    if not FAST_TIER:
        yield
        return
    import jupyter_client

    from edgellm import models
    from edgellm.deploy import llamacpp

    for name in ("ensure_cached", "default_gguf"):
        monkeypatch.setattr(models, name, _leak("the default model"))
    for name in ("build_tools", "source_dir"):
        monkeypatch.setattr(llamacpp, name, _leak("llama.cpp's tools", "llamacpp"))
    for cls in (jupyter_client.KernelManager, jupyter_client.AsyncKernelManager):
        monkeypatch.setattr(cls, "start_kernel", _leak("a kernel"))
    yield


@pytest.fixture(scope="session")
def rendered_course(notebook_run):
    """``build/test-course``: every notebook of notebooks/ and solutions/ executed in FAST mode
    (through ``notebook_run``, so nothing runs twice) and rendered as the offline HTML course."""
    import shutil

    from edgellm.course.build import render_course
    from edgellm.course.render import assets_available
    from edgellm.course.run import course_notebooks
    from edgellm.paths import root

    if not assets_available():
        skip_missing_system_part("the offline web assets are not installed: run "
                                 "scripts/ci_system_deps.sh", "the npm web assets")
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
