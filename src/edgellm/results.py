"""Recorded sweeps: the expensive numbers lessons show, each reproducible from its command.

A sweep is a file ``results/<name>.json``::

    {"name": ..., "description": ..., "commands": ["edgellm ppl --ctx 64 ...", ...],
     "records": [{... "command": "edgellm ppl --ctx 64 ..."}, ...]}

``commands`` is the specification (written by hand); ``records`` are what ``make results``
(``edgellm results --run``) produced by running each command with ``--json``.  A sweep marked
``"pending": true`` is specified but not run yet (its ``records`` are empty; lessons say so and
``edgellm results --run NAME`` fills it in).  Lessons load the
records in full mode and recompute one point live; a test re-runs a sampled record.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex

from .course import ROOT
from .records import write_json

RESULTS_DIR = ROOT / "results"


def sweep_names() -> list[str]:
    return sorted(p.stem for p in RESULTS_DIR.glob("*.json"))


def load_sweep(name: str) -> dict:
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no recorded sweep {name!r} in results/; known: {', '.join(sweep_names())}. "
            "Regenerate with `make results`."
        )
    return json.loads(path.read_text())


def load_records(name: str) -> list[dict]:
    """The records of a sweep, in the order of its commands."""
    return load_sweep(name).get("records", [])


def run_command(command: str) -> dict:
    """Run one ``edgellm …`` command in this process and return its JSON record."""
    from .cli import main

    argv = shlex.split(command)
    if not argv or argv[0] != "edgellm":
        raise ValueError(f"a recorded command must start with 'edgellm': {command!r}")
    argv = argv[1:] + ([] if "--json" in argv else ["--json"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"{command!r} failed with exit code {code}")
    rec = json.loads(buf.getvalue().strip().splitlines()[-1])
    rec["command"] = command
    return rec


def run_sweep(name: str, *, progress: bool = True) -> dict:
    """Run every command of a sweep and write its records (atomically)."""
    sweep = load_sweep(name)
    records = []
    for i, cmd in enumerate(sweep["commands"], 1):
        if progress:
            print(f"[{name} {i}/{len(sweep['commands'])}] {cmd}", flush=True)
        records.append(run_command(cmd))
    sweep["records"] = records
    sweep.pop("pending", None)
    write_json(sweep, RESULTS_DIR / f"{name}.json")
    return sweep
