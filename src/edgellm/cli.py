"""The ``edgellm`` command: every number a lesson reports, from the shell, with ``--json``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from .metrics import PROTOCOLS


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="pydoc", help="corpus name (pydoc, wikitext2) or text file")
    p.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    p.add_argument("--protocol", default="gptq", choices=sorted(PROTOCOLS))
    p.add_argument("--ctx", type=int, default=512, help="window / chunk length in tokens")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--max-tokens", type=int, help="use only the first N tokens of the split")
    limit.add_argument("--chunks", type=int, help="score only the first N windows / chunks")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON record")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, threads, cache location, default model status")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("fetch", help="download and cache a registry model (the default: smollm2-135m)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("ppl", help="perplexity of a model on a corpus under a named protocol")
    p.add_argument("--model", default="smollm2-135m", help="registry name, folder, .gguf or hub id")
    p.add_argument("--stride", type=int, help="sliding protocol: step between windows (ctx/2)")
    _add_eval_args(p)

    p = sub.add_parser("kl", help="token-level KL divergence of a model against a reference")
    p.add_argument("--model", required=True)
    p.add_argument("--reference", default="smollm2-135m")
    _add_eval_args(p)

    p = sub.add_parser("results", help="list or regenerate the recorded sweeps in results/")
    p.add_argument("names", nargs="*", help="sweeps to run (default: all)")
    p.add_argument("--run", action="store_true", help="run the commands and rewrite the records")
    p.add_argument("--json", action="store_true")

    for module in _command_modules():
        module.add_parser(sub, _add_eval_args)
    return parser


# Subcommands that live next to their technique: each module defines
# ``add_parser(subparsers, add_eval_args)`` (setting ``func=run`` as a default) and ``run(args)``.
COMMAND_MODULES = ("edgellm.quant.cli", "edgellm.prune.cli", "edgellm.quant.bnb_cli")


def _command_modules():
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def _info() -> dict:
    import torch

    from .models import DEFAULT_MODEL, REGISTRY, cache_dir, verify_manifest
    from .records import versions

    folder = cache_dir() / "models" / DEFAULT_MODEL
    status = "not cached (run: edgellm fetch)"
    if folder.is_dir():
        problem = verify_manifest(folder)
        status = "cached and verified" if problem is None else f"cache damaged: {problem}"
    return {"versions": versions(), "threads": torch.get_num_threads(),
            "cache": str(cache_dir()), "default_model": DEFAULT_MODEL,
            "default_model_status": status, "models": sorted(REGISTRY)}


def _run(args) -> dict:
    from .metrics import evaluate_kl, evaluate_ppl, peak_rss_bytes
    from .models import ensure_cached, load_model

    if getattr(args, "func", None) is not None:
        return args.func(args)
    if args.command == "info":
        return _info()
    if args.command == "results":
        from . import results

        names = args.names or results.sweep_names()
        if args.run:
            for name in names:
                results.run_sweep(name, progress=not args.json)
        return {"sweeps": {n: len(results.load_records(n)) for n in names}}
    if args.command == "fetch":
        t0 = time.perf_counter()
        folder = ensure_cached(args.model)
        return {"model": args.model, "cache": str(folder), "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    model, tok = load_model(args.model, quiet=args.json)
    load_s = time.perf_counter() - t0
    common = dict(split=args.split, protocol=args.protocol, ctx=args.ctx,
                  max_tokens=args.max_tokens, chunks=args.chunks, batch_size=args.batch_size,
                  progress=not args.json, model_name=args.model)
    if args.command == "ppl":
        rec = evaluate_ppl(model, tok, args.data, stride=args.stride, **common)
    else:
        ref, _ = load_model(args.reference, quiet=args.json)
        rec = evaluate_kl(model, ref, tok, args.data, reference_name=args.reference, **common)
    rec["seconds_load"] = load_s
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return rec


def command_line(argv: list[str]) -> str:
    """The canonical command that reproduces a record (stored in every results/ record)."""
    return shlex.join(["edgellm", *argv])


def _print_human(rec: dict) -> None:
    for k, v in rec.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.6g}"
        print(f"{k:>20}: {v}")


def main(argv: list[str] | None = None) -> int:
    from .errors import EdgeLLMError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        rec = _run(args)
    except EdgeLLMError as e:
        print(f"edgellm {args.command}: error: {e}", file=sys.stderr)
        return 2
    rec.setdefault("command", command_line(argv))
    if args.json:
        print(json.dumps(rec, sort_keys=True))
    else:
        _print_human(rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
