"""The course as a person uses it, in Debian's Chromium driven by playwright-core (npm):

* lesson 00 in JupyterLab (the widget extension installed by setup): Run All Cells, drag the slider,
  see the output change; a screenshot goes to build/browser/;
* the rendered HTML course, served from this machine with every other host blocked: formulas
  typeset by the local MathJax, widgets drawn by the local widget manager, nothing fetched outside.

Needs `bash scripts/ci_system_deps.sh` (Chromium + the npm packages); skipped without them, except
under CI=true where a missing part is a failure.
"""

import functools
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from edgellm.paths import root

ROOT = root()

BROWSER_DIR = Path(__file__).parent / "browser"
SCRIPT = BROWSER_DIR / "browser_test.mjs"
LESSON = ROOT / "notebooks" / "00_setup_and_tour.ipynb"
SHOTS = ROOT / "build" / "browser"

pytestmark = [pytest.mark.browser, pytest.mark.notebook]


def _chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    return next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)),
                None)


@pytest.fixture(scope="module")
def browser_env():
    from conftest import skip_missing_system_part

    missing, parts = [], []
    if _chromium() is None:
        missing.append("chromium")
        parts.append("Chromium")
    if shutil.which("node") is None:
        missing.append("node")
        parts.append("npm")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append("tests/browser/node_modules (npm ci)")
        parts.append("the npm web assets")
    if missing:
        skip_missing_system_part(f"browser test needs {', '.join(missing)}: run "
                                 "scripts/ci_system_deps.sh", *parts)
    SHOTS.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "CHROMIUM": _chromium()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(env, *args, timeout=600) -> dict:
    r = subprocess.run(["node", str(SCRIPT), *args], cwd=BROWSER_DIR, env=env, capture_output=True,
                       text=True, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"ok": False, "reason": f"no JSON result (exit {r.returncode})"}
    result["log"] = r.stderr[-4000:]
    return result


def _jupyterlab(root: Path, port: int, token: str, home: Path) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1 only, with a token, fresh settings, FAST mode for its kernels."""
    settings = home / "settings"
    for plugin, values in {
        # every cell stays in the page (no virtual scrolling), no news or update pop-ups
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                        "checkForUpdates": False},
    }.items():
        f = settings / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    env = {**os.environ, "EDGELLM_FAST": "1", "HF_HUB_OFFLINE": "1",
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    jupyter = Path(sys.executable).parent / "jupyter"
    cmd = [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--ServerApp.terminals_enabled=False",
           "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")                     # CI containers run as root
    log = open(home / "jupyterlab.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("JupyterLab exited: " + (home / "jupyterlab.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("JupyterLab did not start in 90 s: " + (home / "jupyterlab.log").read_text()[-2000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_lesson_in_jupyterlab(notebook: Path, env: dict, screenshot: Path, workdir: Path) -> dict:
    """Copy ``notebook`` into a scratch lab folder (autosave must not touch the repository), open it
    in JupyterLab, Run All, drag the first slider; returns the browser script's JSON result."""
    lab = workdir / "lab"
    (lab / notebook.parent.name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(notebook, lab / notebook.parent.name / notebook.name)
    port, token = _free_port(), secrets.token_hex(16)
    proc = _jupyterlab(lab, port, token, workdir)
    try:
        url = f"http://127.0.0.1:{port}/lab/tree/{notebook.parent.name}/{notebook.name}?token={token}"
        return _node(env, "lesson", "--url", url, "--screenshot", str(Path(screenshot).resolve()), "--timeout", "300")
    finally:
        _stop(proc)


def test_lesson_00_widget_reacts_to_the_slider_in_jupyterlab(browser_env, tmp_path):
    if not LESSON.is_file():
        pytest.skip("notebooks/00_setup_and_tour.ipynb does not exist yet")
    shot = SHOTS / "lesson00_jupyterlab.png"
    result = run_lesson_in_jupyterlab(LESSON, browser_env, shot, tmp_path)
    assert result["ok"], json.dumps(result, indent=1)[-6000:]
    assert result["slider"]["before"] != result["slider"]["after"]
    assert result["output"]["before"] != result["output"]["after"] or result["output"]["imagesChanged"]
    assert shot.stat().st_size > 10_000


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_rendered_course_works_offline(browser_env, rendered_course):
    handler = functools.partial(_QuietHandler, directory=str(rendered_course))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        result = _node(browser_env, "course", "--url", url,
                       "--screenshot", str(SHOTS / "course_offline.png"))
    finally:
        server.shutdown()
        server.server_close()
    assert result["ok"], json.dumps(result, indent=1)[-6000:]
    assert result["blocked"] == [] and result["failed"] == [] and result["httpErrors"] == []
    pages = {p["url"] for p in result["pages"]}
    assert "/results.html" in pages and any(p.startswith("/notebooks/") for p in pages)
    assert any(p["hasMath"] and p["mathOk"] for p in result["pages"]), "no formula was typeset"
