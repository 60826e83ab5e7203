"""Where things are: the course's root folder, the files that ship with the package, the cache.

``root()`` is the folder the course runs in (notebooks/, solutions/, exercises/, build/):
``$EDGELLM_ROOT`` when set, else the source checkout this package is imported from, else the
current folder.  The files the library itself reads (the corpus registry ``datasets/``, the
recorded sweeps ``results/``) live at the top of the repository and ship inside the wheel as
``edgellm/_data/{datasets,results}`` (``pyproject.toml`` maps them there), so
:func:`datasets_dir` and :func:`results_dir` find them in both cases; ``$EDGELLM_ROOT`` overrides
them too.  The npm manifest of the offline web assets is ``edgellm/course/web/``.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_DATA = PACKAGE_DIR / "_data"            # datasets/ and results/ inside an installed wheel


def _checkout() -> Path | None:
    """The repository root when the package is used from its source tree (``src/edgellm``)."""
    top = PACKAGE_DIR.parents[1]
    if (top / "pyproject.toml").is_file() and (top / "src" / "edgellm") == PACKAGE_DIR:
        return top
    return None


def _override() -> Path | None:
    env = os.environ.get("EDGELLM_ROOT")
    return Path(env).resolve() if env else None


def root() -> Path:
    """The course folder: ``$EDGELLM_ROOT``, the source checkout, or the current folder."""
    return _override() or _checkout() or Path.cwd()


def _shipped(name: str) -> Path:
    """``name`` (``datasets`` or ``results``) under ``$EDGELLM_ROOT``, the checkout or the wheel."""
    top = _override() or _checkout()
    return top / name if top is not None else PACKAGE_DATA / name


def results_dir() -> Path:
    """The recorded sweeps (``results/*.json``, and the clipping values of ``04_lwc``)."""
    return _shipped("results")


def datasets_dir() -> Path:
    """The bundled corpora and their registry (``datasets/``)."""
    return _shipped("datasets")


def datasets_registry() -> Path:
    """``datasets/registry.json``: name, source, licence and sha256 of every bundled corpus."""
    return datasets_dir() / "registry.json"


def cache_dir() -> Path:
    """Where models and downloads are cached: ``$EDGELLM_CACHE`` or ``~/.cache/edgellm``."""
    return Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm")
