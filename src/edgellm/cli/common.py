"""Flags the subcommands share, parsed one way everywhere, and checks that run before any model
is loaded (an unknown corpus fails in milliseconds, not after a model load)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgellm.devices import DEVICES, ENV, check_cpu_only, check_device, default_device
from edgellm.errors import EdgeLLMError
from edgellm.metrics import PROTOCOLS
from edgellm.models import DEFAULT_MODEL


class UsageError(EdgeLLMError, ValueError):
    """A flag names a file or folder that cannot be used (missing, wrong kind, not writable)."""


def add_model_arg(p: argparse.ArgumentParser, *, help: str | None = None,
                  cpu_only: str | None = None) -> None:
    """``--model`` and ``--device`` (:func:`add_device_arg`)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=help or "registry name, saved folder, .gguf file or hub id")
    add_device_arg(p, cpu_only=cpu_only)


def add_device_arg(p: argparse.ArgumentParser, *, cpu_only: str | None = None) -> None:
    """``--device {cpu,cuda,mps}``: where the model runs (default ``$EDGELLM_DEVICE``, else
    cpu).  ``cpu_only`` names a path that runs on the CPU only (llama.cpp, ONNX Runtime,
    ExecuTorch, our kernels, bitsandbytes' CPU path): another device is a clear error there.
    :func:`check_device_args` checks it before any model is loaded."""
    if cpu_only:
        p.add_argument("--device", choices=DEVICES, help=f"cpu only: {cpu_only} runs on the CPU")
    else:
        p.add_argument("--device", choices=DEVICES,
                       help=f"where the model runs (default: ${ENV}, else cpu); cuda and mps "
                            "need that GPU here")
    p.set_defaults(cpu_only=cpu_only)


def check_device_args(args) -> None:
    """``--device`` names a device this machine has (a CPU-only command: the CPU), and a set
    ``EDGELLM_DEVICE`` is valid: before any model is loaded (:func:`edgellm.cli.main`)."""
    if not hasattr(args, "device"):
        return
    if getattr(args, "cpu_only", None):
        check_cpu_only(args.device, args.cpu_only)
    elif args.device is not None:
        check_device(args.device)
    else:
        default_device()


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed of every stochastic step")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON record")


def add_calib_args(p: argparse.ArgumentParser, *, n_samples: int = 128, seq_len: int = 512) -> None:
    p.add_argument("--calib", default="pydoc", help="calibration corpus (train split)")
    p.add_argument("--n-samples", type=int, default=n_samples, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per calibration window")


def add_allocation_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--allocate``, ``--spread``, ``--sensitivity-tokens``: the same ``what`` (``sparsity``
    or ``ratio``) in every decoder layer, or spread by each layer's measured sensitivity at
    the same total (:mod:`edgellm.allocation`)."""
    p.add_argument("--allocate", default="uniform", choices=["uniform", "sensitivity"],
                   help=f"the same {what} in every layer, or spread by each layer's measured "
                        "sensitivity at the same total")
    p.add_argument("--spread", type=float, default=0.1,
                   help=f"sensitivity allocation: layer values from {what}+spread (least "
                        f"sensitive) to {what}-spread (most)")
    p.add_argument("--sensitivity-tokens", type=int, default=2048,
                   help="held-out tokens (the calibration corpus's validation split) of the scan")


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


def check_llamacpp_protocol(protocol: str) -> None:
    """An exported file (llama.cpp, ONNX Runtime, ExecuTorch) is evaluated on whole windows from
    an empty cache: no sliding windows."""
    if protocol == "sliding":
        raise UsageError("an exported runtime evaluates whole windows from an empty cache: use "
                         "--protocol gptq or llamacpp")


#: the runtimes that run an exported file, and the file each runs
RUNTIME_FILES = {"llamacpp": ("GGUF file", ".gguf", "gguf"),
                 "onnxruntime": ("model in ONNX format", ".onnx", "onnx"),
                 "executorch": ("ExecuTorch program", ".pte", "executorch")}


def check_runtime_file(runtime: str, path) -> None:
    """``path`` is a complete file of the kind ``runtime`` runs (else a clear error that says
    which ``edgellm export --format`` writes one)."""
    what, suffix, fmt = RUNTIME_FILES[runtime]
    if not path:
        raise UsageError(f"--runtime {runtime} runs a {what}: give --model FILE{suffix} "
                         f"(edgellm export --format {fmt} writes one)")
    check_in_file(path, what, suffix=suffix)
    if runtime == "llamacpp":
        from edgellm.deploy.export import check_gguf

        check_gguf(path)
    elif runtime == "onnxruntime":
        from edgellm.deploy.onnx_runtime import check_onnx_file

        check_onnx_file(path)
    else:
        from edgellm.deploy.executorch_runtime import check_pte_file

        check_pte_file(path)


def check_eval_args(args) -> None:
    """Corpus and split exist, sizes are positive: before any model is loaded."""
    from edgellm.data import load_text
    from edgellm.metrics import EvalError

    for name in ("ctx", "max_tokens", "chunks", "eval_batch_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise EvalError(f"--{name.replace('_', '-')} {v}: give a positive number")
    load_text(args.data, args.split)


def check_model_name(name: str, flag: str = "--model") -> None:
    """A registry name, an existing path, or a hub id (``owner/name``): else a clear error."""
    from edgellm.models import CONTROLS, DERIVED, REGISTRY, registry_entry

    if name in REGISTRY or name in CONTROLS or name in DERIVED:
        return
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{flag} {name}: this folder has no config.json, so it is not a saved "
                         "Hugging Face model; give a model folder (config.json + weights), a "
                         ".gguf file, or a registry name (see `edgellm info`)")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise UsageError(f"{flag} {name}: a model file must be a .gguf file; for a saved "
                         "Hugging Face model give its folder")
    if path.exists():
        return
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf"):
        return  # a hub id: load_model says whether the hub can be reached
    if name.lower().endswith(".gguf") or name.startswith((".", "/", "~")):
        raise UsageError(f"{flag} {name}: no such file or folder; give an existing .gguf file "
                         "or model folder, or a registry name (see `edgellm info`)")
    registry_entry(name)  # raises with the registered names and what else may be given


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(path, flag: str, *, empty: bool = False) -> None:
    """A folder the command will write: it is a folder, or can be created here; checked before
    anything long runs, so a bad ``--out`` fails in milliseconds, not after the work.
    ``empty=True``: an existing folder must also be empty (nothing is ever written over)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: this is a file, not a folder; give a new or existing folder")
    if empty and p.is_dir() and any(p.iterdir()):
        raise UsageError(f"{flag} {path}: this folder is not empty; give a new or empty folder "
                         "(nothing is overwritten)")
    _check_writable_parent(p, path, flag)


def check_out_file(path, flag: str) -> None:
    """A file the command will write: not a folder, and its folder exists or can be created."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {path}: this is a folder; give a file name")
    _check_writable_parent(p.parent, path, flag)


def _check_writable_parent(p: Path, given, flag: str) -> None:
    base = _nearest_existing(p.absolute())
    if not base.is_dir():
        raise UsageError(f"{flag} {given}: {base} is a file, so nothing can be created under it; "
                         "give another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {given}: no permission to write in {base}; give another path")


def check_in_file(path, what: str, *, suffix: str | None = None) -> Path:
    """An input file exists, is a file, and (optionally) has the right extension."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{path}: no such file; give the path of an existing {what}")
    if not p.is_file():
        raise UsageError(f"{path}: this is not a file; give the path of a {what}")
    if suffix is not None and p.suffix.lower() != suffix:
        raise UsageError(f"{path}: expected a {what} ({suffix} file)")
    return p


def check_in_dir(path, flag: str, *, what: str) -> Path:
    """An input folder exists and holds what the command reads (``what`` describes it)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: no such folder; give the folder of {what}")
    return p


def eval_settings(args):
    """The :class:`edgellm.metrics.EvalSettings` of the evaluation flags."""
    from edgellm.metrics import EvalSettings

    return EvalSettings(data=args.data, split=args.split, protocol=args.protocol, ctx=args.ctx,
                        max_tokens=args.max_tokens, chunks=args.chunks,
                        batch_size=args.eval_batch_size)
