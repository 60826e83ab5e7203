"""Recorded sweeps: the expensive numbers lessons show, each reproducible from its command.

A sweep is a file ``results/<name>.json``::

    {"name": ..., "description": ..., "commands": ["edgellm ppl --ctx 64 ...", ...],
     "records": [{... "command": "edgellm ppl --ctx 64 ..."}, ...]}

``commands`` is the specification (written by hand); ``records`` are what ``make results``
(``edgellm results --run``) produced by running each command with ``--json``.  A sweep marked
``"pending": true`` is specified but not run yet (its ``records`` are empty; lessons say so and
``edgellm results --run NAME`` fills it in).  Lessons load the
records in full mode and recompute one point live; a test re-runs a sampled record.  Running a
sweep is the command line's job (``edgellm results --run``, :func:`edgellm.cli.run_sweep`); this module only reads.
"""

from __future__ import annotations

import json

from edgellm.errors import EdgeLLMError
from edgellm.paths import results_dir


class ResultsError(EdgeLLMError, FileNotFoundError):
    """A sweep that is not recorded in results/."""


def sweep_names() -> list[str]:
    return sorted(p.stem for p in results_dir().glob("*.json"))


def load_sweep(name: str) -> dict:
    path = results_dir() / f"{name}.json"
    if not path.is_file():
        raise ResultsError(
            f"no recorded sweep {name!r} in results/; known: {', '.join(sweep_names())}. "
            "Regenerate with `make results`."
        )
    return json.loads(path.read_text())


def load_records(name: str) -> list[dict]:
    """The records of a sweep, in the order of its commands."""
    return load_sweep(name).get("records", [])
