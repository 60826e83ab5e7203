"""The pins: requirements.lock and environment.yml agree; torch carries no local build tag."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    out = {}
    for line in lines:
        line = line.strip().removeprefix("- ").strip()
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = version
    return out


def test_lock_and_conda_environment_agree():
    lock = pins((ROOT / "requirements.lock").read_text().splitlines())
    env = pins((ROOT / "environment.yml").read_text().splitlines())
    assert lock and lock == env


def test_torch_pinned_without_a_platform_build():
    lock = pins((ROOT / "requirements.lock").read_text().splitlines())
    assert lock["torch"] == "2.13.0"
    assert "+cpu" not in (ROOT / "requirements.lock").read_text()


def test_environment_yml_is_python_311():
    assert "python=3.11" in (ROOT / "environment.yml").read_text()
