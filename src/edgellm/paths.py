"""Where things are: the course's root folder, the files that ship with the package, the cache.

``root()`` is the checkout the course runs from (notebooks/, solutions/, results/, build/):
``$EDGELLM_ROOT`` when set, else the checkout this package was installed from in editable mode,
else the current folder.  Files the library itself needs (the corpus registry, the recorded
sweeps, the web-asset manifest) are found through the functions below, so that a wheel works too.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _checkout() -> Path | None:
    """The repository root when the package is used from its source tree (``src/edgellm``)."""
    top = PACKAGE_DIR.parents[1]
    if (top / "pyproject.toml").is_file() and (top / "src" / "edgellm") == PACKAGE_DIR:
        return top
    return None


def root() -> Path:
    """The course folder: ``$EDGELLM_ROOT``, the source checkout, or the current folder."""
    env = os.environ.get("EDGELLM_ROOT")
    if env:
        return Path(env).resolve()
    return _checkout() or Path.cwd()


def results_dir() -> Path:
    """The recorded sweeps (``results/*.json``)."""
    return root() / "results"


def datasets_registry() -> Path:
    """``datasets/registry.json``: name, source, licence and sha256 of every bundled corpus."""
    return root() / "datasets" / "registry.json"


def cache_dir() -> Path:
    """Where models and downloads are cached: ``$EDGELLM_CACHE`` or ``~/.cache/edgellm``."""
    return Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm")
