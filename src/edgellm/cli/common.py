"""Flags the subcommands share, parsed one way everywhere, and checks that run before any model
is loaded (an unknown corpus fails in milliseconds, not after a model load)."""

from __future__ import annotations

import argparse

from edgellm.metrics import PROTOCOLS

DEFAULT_MODEL = "smollm2-135m"


def add_model_arg(p: argparse.ArgumentParser, *, help: str | None = None) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=help or "registry name, saved folder, .gguf file or hub id")


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed of every stochastic step")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON record")


def add_calib_args(p: argparse.ArgumentParser, *, n_samples: int = 128, seq_len: int = 512) -> None:
    p.add_argument("--calib", default="pydoc", help="calibration corpus (train split)")
    p.add_argument("--n-samples", type=int, default=n_samples, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per calibration window")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The evaluation flags: corpus, split, protocol, context, how many tokens, batch, ``--json``."""
    p.add_argument("--data", default="pydoc", help="corpus name (pydoc, stdlib, wikitext2) or text file")
    p.add_argument("--split", default="test", choices=["train", "validation", "test", "all"])
    p.add_argument("--protocol", default="gptq", choices=sorted(PROTOCOLS))
    p.add_argument("--ctx", type=int, default=512, help="window / chunk length in tokens")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--max-tokens", type=int, help="use only the first N tokens of the split")
    limit.add_argument("--chunks", type=int, help="score only the first N windows / chunks")
    p.add_argument("--eval-batch-size", type=int, default=4,
                   help="windows per forward pass during evaluation")
    add_json_arg(p)


def parse_group_size(text: str) -> int | None:
    """``--group-size``: an integer, or 0 / ``channel`` / ``none`` for per-channel (None)."""
    if text.lower() in ("0", "channel", "none", "per-channel"):
        return None
    try:
        g = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--group-size {text!r}: give an integer (e.g. 32, 64) or 0 / 'channel'") from None
    if g < 0:
        raise argparse.ArgumentTypeError("--group-size must be positive, or 0 for per-channel")
    return g


def parse_threshold(text: str) -> float | None:
    """``--threshold`` of LLM.int8(): a magnitude, or ``none`` / ``inf`` / ``off`` (None)."""
    if text.lower() in ("none", "inf", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--threshold {text!r}: give a magnitude (6.0), or 0 / inf for no decomposition"
        ) from None


def check_eval_args(args) -> None:
    """Corpus and split exist, sizes are positive: before any model is loaded."""
    from edgellm.data import load_text
    from edgellm.metrics import EvalError

    for name in ("ctx", "max_tokens", "chunks", "eval_batch_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise EvalError(f"--{name.replace('_', '-')} {v}: give a positive number")
    load_text(args.data, args.split)


def check_model_name(name: str) -> None:
    """A registry name, an existing path, or a hub id (``owner/name``): else a clear error."""
    from pathlib import Path

    from edgellm.models import REGISTRY, registry_entry

    if name in REGISTRY or Path(name).exists():
        return
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf"):
        return  # a hub id: load_model says whether the hub can be reached
    registry_entry(name)  # raises with the registered names and what else may be given
