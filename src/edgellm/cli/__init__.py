"""The ``edgellm`` command: every number a lesson reports, from the shell, with ``--json``.

One entry point.  Each subcommand module only parses flags, checks them before any model is
loaded, calls a library ``apply`` function and returns a record (a dict) that :func:`main`
prints.  A record flows CLI → apply → technique → metrics / measure → record.

Every error a user can cause (an unknown model, corpus, sweep, method, type, file, a bad value)
is an :class:`edgellm.errors.EdgeLLMError` (or an argparse error): :func:`main` prints one line
and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys

from edgellm.cli import (
    core,
    course,
    deploy,
    distill,
    finetune,
    kernels,
    lowrank,
    pipeline,
    production,
    prune,
    qat,
    quantize,
    serve,
)
from edgellm.cli.common import add_json_arg, check_device_args
from edgellm.errors import EdgeLLMError
from edgellm.results import ResultsError, load_records, load_sweep, sweep_names

# the subcommand modules, in the order ``edgellm --help`` lists them
SUBCOMMANDS = (core, quantize, prune, distill, lowrank, finetune, qat, production, deploy,
               serve, kernels, pipeline, course)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parsers(sub)
    p = sub.add_parser("results", help="list or regenerate the recorded sweeps in results/")
    p.add_argument("names", nargs="*", help="sweeps to run (default: all)")
    p.add_argument("--run", action="store_true", help="run the commands and rewrite the records")
    add_json_arg(p)
    p.set_defaults(func=results)
    return parser


def command_line(argv: list[str]) -> str:
    """The canonical command that reproduces a record (stored in every results/ record)."""
    return shlex.join(["edgellm", *argv])


def run_record(argv: list[str]) -> dict:
    """Parse ``argv`` and run it: the record, without printing (raises on a user error)."""
    args = build_parser().parse_args(argv)
    check_device_args(args)
    rec = args.func(args)
    rec.setdefault("command", command_line(argv))
    return rec


# --------------------------------------------------------------------------------------------
# recorded sweeps: ``edgellm results [--run] [NAME ...]``


def results(args) -> dict:
    names = args.names or sweep_names()
    unknown = [n for n in names if n not in sweep_names()]
    if unknown:
        raise ResultsError(f"no recorded sweep {', '.join(map(repr, unknown))} in results/; "
                           f"known: {', '.join(sweep_names())}")
    if args.run:
        for name in names:
            run_sweep(name, progress=not args.json)
    return {"sweeps": {n: len(load_records(n)) for n in names}}


def run_command(command: str) -> dict:
    """Run one recorded ``edgellm …`` command line in this process and return its JSON record."""
    argv = shlex.split(command)
    if not argv or argv[0] != "edgellm":
        raise ResultsError(f"a recorded command must start with 'edgellm': {command!r}")
    argv = argv[1:] + ([] if "--json" in argv else ["--json"])
    from edgellm.measure import reset_peak_rss

    reset_peak_rss()  # peak_rss_bytes is this command's, not the sweep process's so far
    with contextlib.redirect_stdout(io.StringIO()):  # progress text stays out of the record
        rec = run_record(argv)
    # exactly what `edgellm ... --json` prints and a reader would load
    rec = json.loads(json.dumps(rec, sort_keys=True))
    rec["command"] = command
    return rec


def run_sweep(name: str, *, progress: bool = True) -> dict:
    """Run every command of a sweep and write its records (atomically)."""
    from edgellm.paths import results_dir
    from edgellm.records import write_json

    sweep = load_sweep(name)
    records = []
    for i, cmd in enumerate(sweep["commands"], 1):
        if progress:
            print(f"[{name} {i}/{len(sweep['commands'])}] {cmd}", flush=True)
        records.append(run_command(cmd))
    sweep["records"] = records
    sweep.pop("pending", None)
    write_json(sweep, results_dir() / f"{name}.json")
    return sweep


# --------------------------------------------------------------------------------------------
# printing


def _print_human(rec: dict) -> None:
    for k, v in rec.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.6g}"
        print(f"{k:>20}: {v}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        check_device_args(args)  # --device cuda without a GPU: one line, before any model load
        rec = args.func(args)
    except EdgeLLMError as e:
        print(f"edgellm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a crash: no traceback
        print(f"edgellm {args.command}: interrupted", file=sys.stderr)
        return 130
    rec.setdefault("command", command_line(argv))
    code = rec.pop("exit_code", 0)
    if args.json:
        print(json.dumps(rec, sort_keys=True))
    elif args.command not in ("course", "exercises"):
        _print_human(rec)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
