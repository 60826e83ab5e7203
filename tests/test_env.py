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


def pip_entries(text: str) -> list[str]:
    """The entries under environment.yml's ``- pip:`` list."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip().removeprefix("- ").strip() for line in lines[start + 1:]
            if line.strip().startswith("- ")]


def test_conda_environment_pins_every_package_exactly_once():
    """Binder (repo2docker) and `conda env create -f environment.yml` install exactly the lock:
    every pip entry is a `==` pin or the course itself, none twice, in either file."""
    entries = pip_entries((ROOT / "environment.yml").read_text())
    loose = [e for e in entries if "==" not in e and e != "-e ."]
    assert loose == [], f"unpinned entries in environment.yml: {loose}"
    assert "-e ." in entries, "environment.yml must install the course itself (-e .)"
    for name, lines in (("environment.yml", [e for e in entries if "==" in e]),
                        ("requirements.lock", [line for line in (
                            ROOT / "requirements.lock").read_text().splitlines()
                            if "==" in line])):
        names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
        twice = sorted({n for n in names if names.count(n) > 1})
        assert twice == [], f"{name} pins {twice} more than once"


def test_accelerate_is_pinned_for_offloading():
    """``load_model(device_map="auto")`` (models larger than memory) needs accelerate."""
    lock = pins((ROOT / "requirements.lock").read_text().splitlines())
    assert "accelerate" in lock
