"""The package outside its checkout, and the rendered course with or without the npm web assets.

* where the library finds its files: ``$EDGELLM_ROOT``, the source checkout, else the package data
  of an installed wheel (``edgellm/_data/{datasets,results}``, ``edgellm/course/web/``);
* a wheel built from the checkout, installed into a throwaway venv, used from a folder outside
  the checkout: a corpus, a recorded sweep and a rendered page (integration: it builds);
* ``web_assets=False`` (``edgellm course run --no-web-assets``): pages without MathJax and the
  widget manager, each saying so; with the assets required but missing and no npm: a clear
  error before any notebook runs.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from edgellm import paths
from edgellm.course import build, render, results_page

CHECKOUT = Path(__file__).resolve().parents[1]
FIXTURE_LESSON = Path(__file__).parent / "fixtures" / "notebooks" / "00_fixture_widgets.ipynb"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


# --------------------------------------------------------------------------------------------
# where the files are


def test_checkout_files_are_found_in_the_checkout(monkeypatch):
    monkeypatch.delenv("EDGELLM_ROOT", raising=False)
    assert paths.root() == CHECKOUT
    assert paths.results_dir() == CHECKOUT / "results"
    assert paths.datasets_registry() == CHECKOUT / "datasets" / "registry.json"


def test_outside_a_checkout_data_come_from_the_package_and_root_is_the_current_folder(
        monkeypatch, tmp_path):
    monkeypatch.delenv("EDGELLM_ROOT", raising=False)
    monkeypatch.setattr(paths, "_checkout", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert paths.root() == tmp_path
    assert paths.results_dir() == paths.PACKAGE_DIR / "_data" / "results"
    assert paths.datasets_registry() == paths.PACKAGE_DIR / "_data" / "datasets" / "registry.json"


def test_edgellm_root_overrides_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGELLM_ROOT", str(tmp_path))
    assert paths.root() == tmp_path.resolve()
    assert paths.results_dir() == tmp_path.resolve() / "results"
    assert paths.datasets_dir() == tmp_path.resolve() / "datasets"


def test_web_asset_manifest_ships_in_the_package_and_installs_into_the_cache(monkeypatch, tmp_path):
    pkg = json.loads((render.WEB_DIR / "package.json").read_text())
    lock = json.loads((render.WEB_DIR / "package-lock.json").read_text())
    assert set(pkg["dependencies"]) == {"mathjax", "@jupyter-widgets/html-manager", "requirejs"}
    assert lock["packages"][""]["dependencies"] == pkg["dependencies"]   # npm ci accepts the pair
    assert render.WEB_DIR.is_relative_to(paths.PACKAGE_DIR)
    monkeypatch.delenv("EDGELLM_NODE_MODULES", raising=False)
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    assert render.node_modules() == tmp_path / "web" / "node_modules"
    monkeypatch.setenv("EDGELLM_NODE_MODULES", str(tmp_path / "mine"))
    assert render.node_modules() == tmp_path / "mine"


def test_pyproject_ships_the_data_the_library_reads():
    import tomllib

    package_data = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    setup_py = (CHECKOUT / "setup.py").read_text()
    for pkg, folder in (("edgellm._data.datasets", "datasets"), ("edgellm._data.results", "results")):
        assert f'"{pkg}": "{folder}"' in setup_py
    shipped = {f"{d}/{p.name}" for d, pkg in (("datasets", "edgellm._data.datasets"),
                                              ("results", "edgellm._data.results"))
               for pat in package_data[pkg] for p in (CHECKOUT / d).glob(pat)}
    on_disk = {f"{p.parent.name}/{p.name}" for d in ("datasets", "results")
               for p in (CHECKOUT / d).iterdir() if p.is_file()}
    assert on_disk <= shipped, f"not in the wheel: {sorted(on_disk - shipped)}"


# --------------------------------------------------------------------------------------------
# rendering without the web assets


def _executed_like_fixture():
    """The fixture lesson with the outputs an execution leaves: a tqdm bar (a widget view with a
    text fallback), the widget state, a printed line."""
    nb = nbformat.read(FIXTURE_LESSON, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output(
        "display_data", data={"application/vnd.jupyter.widget-view+json":
                              {"model_id": "abc", "version_major": 2, "version_minor": 0},
                              "text/plain": "steps: 100%|##########| 5/5"}),
        nbformat.v4.new_output("stream", name="stdout", text="total 10\n")]
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": {}, "version_major": 2, "version_minor": 0}}
    return nb


def _scripts(page: str) -> list[str]:
    return re.findall(r"<script[^>]+src=\"([^\"]+)\"", page) + \
        re.findall(r"var widgetRendererSrc = '([^']+)'", page)


def test_render_without_web_assets_says_so_and_loads_no_script(tmp_path, monkeypatch):
    monkeypatch.setattr(results_page, "load_sweeps", lambda *a: [])       # no plots: this is about pages
    monkeypatch.setenv("EDGELLM_NODE_MODULES", str(tmp_path / "absent"))   # assets missing
    nb_path = tmp_path / "run" / "00_fixture_widgets.ipynb"
    nb_path.parent.mkdir()
    nbformat.write(_executed_like_fixture(), nb_path)
    runs = [{"folder": "notebooks", "name": nb_path.stem, "ipynb": str(nb_path), "status": "ok",
             "seconds": 1.0}]
    out = tmp_path / "course"
    build.render_course(out, runs, fast=True, exercises_dir=tmp_path / "none", web_assets=False)
    pages = {p: (out / p).read_text()
             for p in ("index.html", "results.html", "notebooks/00_fixture_widgets.html")}
    for name, page in pages.items():
        assert render.NO_ASSETS_NOTE in page, name
    lesson = pages["notebooks/00_fixture_widgets.html"]
    assert _scripts(lesson) == [], _scripts(lesson)
    assert "text/x-mathjax-config" not in lesson and WIDGET_STATE not in lesson
    assert r"\mathrm{PPL}" in lesson                                # the formula, as TeX source
    assert "steps: 100%" in lesson and "total 10" in lesson         # the widget's static output
    assert (out / "_static" / "course.css").is_file()
    assert not (out / "_static" / "mathjax").exists()


def test_render_with_web_assets_but_without_them_or_npm_fails_before_rendering(tmp_path,
                                                                               monkeypatch):
    monkeypatch.delenv("EDGELLM_NODE_MODULES", raising=False)
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))             # no npm
    with pytest.raises(render.WebAssetsError) as e:
        build.render_course(tmp_path / "course", [], web_assets=True)
    msg = str(e.value)
    assert "npm" in msg and "apt-get install npm" in msg and "--no-web-assets" in msg
    assert not (tmp_path / "course").exists()


def test_course_run_fails_before_executing_a_notebook_when_assets_cannot_be_had(tmp_path,
                                                                               monkeypatch, capsys):
    from edgellm.cli import main
    from edgellm.course import run as course_run

    monkeypatch.delenv("EDGELLM_NODE_MODULES", raising=False)
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    def never(*a, **k):
        raise AssertionError("a notebook was executed before the asset check")

    monkeypatch.setattr(course_run, "run_notebook", never)
    assert main(["course", "run", "--out", str(tmp_path / "course"), "--fast"]) == 2
    assert "npm" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the wheel, outside the checkout

SMOKE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import nbformat
    import edgellm
    from edgellm import data, paths, results
    from edgellm.course import render

    venv = Path(sys.argv[1]).resolve()
    assert Path(edgellm.__file__).resolve().is_relative_to(venv), edgellm.__file__
    text = data.load_text("pydoc", "test")
    names = data.corpus_names()
    records = results.load_records("01_protocols")
    clips = paths.results_dir() / "04_lwc_w3g64.safetensors"
    nb = nbformat.read(sys.argv[2], as_version=4)
    web = render.assets_available()
    page = render.render_notebook(nb, Path("course/notebooks/page.html"), Path("course"),
                                  web_assets=web)
    print(json.dumps({"root": str(paths.root()), "results": str(paths.results_dir()),
                      "chars": len(text), "corpora": names, "records": len(records),
                      "clips": clips.is_file(), "manifest": (render.WEB_DIR / "package-lock.json").is_file(),
                      "page": page.stat().st_size, "web": web}))
""")


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


@pytest.mark.integration
def test_wheel_works_outside_the_checkout(tmp_path):
    import shutil
    import sysconfig

    venv_py = Path(sys.executable)
    # build from a copy of the checkout (setuptools writes build/ and *.egg-info next to the sources)
    src = tmp_path / "src"
    shutil.copytree(CHECKOUT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "node_modules", "__pycache__", "*.egg-info", ".pytest_cache",
        ".ruff_cache", ".ipynb_checkpoints", "exercises", "notebooks", "solutions", "tests", "docs"))
    wheels = tmp_path / "wheels"
    subprocess.run([str(venv_py), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(src)], check=True, timeout=120)
    wheel = next(wheels.glob("edgellm-*.whl"))

    # a throwaway venv that sees this environment's packages through a .pth file: they come
    # after its own site-packages, so that the wheel's edgellm wins over the editable one
    venv = tmp_path / "venv"
    subprocess.run([str(venv_py), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = _site_packages(venv)
    (site / "zz_edgellm_test_env.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    subprocess.run([str(venv_py), "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--no-deps", "--no-index", "-q", str(wheel)]
                   if _pip_has_python_flag(venv_py) else
                   [str(venv_py), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), str(wheel)], check=True, timeout=120)

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "smoke.py").write_text(SMOKE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGELLM_ROOT", "PYTHONPATH", "VIRTUAL_ENV")}
    # nbconvert's templates live in this environment's share/jupyter, not the throwaway venv's
    env["JUPYTER_PATH"] = os.pathsep.join(
        filter(None, [str(Path(sys.prefix) / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")]))
    r = subprocess.run([str(venv / "bin" / "python"), "smoke.py", str(venv), str(FIXTURE_LESSON)],
                       cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["root"] == str(work)
    assert Path(got["results"]).is_relative_to(site), got["results"]
    assert got["chars"] > 1000 and "pydoc" in got["corpora"] and got["records"] > 0
    assert got["clips"] and got["manifest"] and got["page"] > 10_000
    assert (work / "course" / "notebooks" / "page.html").is_file()


def _pip_has_python_flag(python: Path) -> bool:
    """pip >= 22.3 installs into another environment with ``--python``."""
    r = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True)
    major, minor = (int(x) for x in r.stdout.split()[1].split(".")[:2])
    return (major, minor) >= (22, 3)
