"""``edgellm prune``: prune the default model (unstructured, N:M or structured), optionally
recover with a short fine-tune, and measure perplexity, KL, size and speed.

::

    edgellm prune --method wanda --sparsity 0.5 --eval --max-tokens 4096 --json
    edgellm prune --method sparsegpt --nm 2:4 --calib pydoc --n-samples 32 --seq-len 512 --eval
    edgellm prune --structured layers --ratio 0.2 --recover-steps 20 --control --eval --out DIR

``--sparsity`` is the fraction of each decoder linear's weights set to zero (per output row for
magnitude and Wanda, per column block for SparseGPT); ``--nm 2:4`` keeps 2 of every 4.  The
tied embedding / lm_head is never pruned.  ``--structured`` removes heads, MLP channels or
layers (scored from calibration activations; ``--method magnitude`` scores heads/channels by
weights only); given together with ``--sparsity``/``--nm`` the structured step runs first.
With ``--eval`` an unpruned copy is the reference: ``ppl``, ``ppl_base``, ``kl_mean``.
``--recover-steps K`` fine-tunes K steps on the train split (plain with the zeros kept, or
``--lora``); ``--control`` fine-tunes the unpruned model the same way (``ppl_control``);
``--baseline-calib C`` prunes a second copy calibrated on corpus C and reports the paired
``delta_nll_vs_baseline`` between the two masks (contextual pruning); ``--allocate
sensitivity`` (Wanda) measures each layer's ΔNLL when pruned alone and spreads the sparsity
by ``--spread`` over the layers at the same total (``sensitivity``, ``layer_sparsity_target``); the
record keeps ``ppl_before_recovery`` / ``kl_mean_before_recovery`` and ``ppl`` is after recovery.
``--calib stdlib --data pydoc`` (any two corpora) is contextual pruning: scores from one domain,
perplexity on another.
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import (
    add_allocation_args,
    add_calib_args,
    add_eval_args,
    add_model_arg,
    add_seed_arg,
    check_eval_args,
    check_model_name,
    check_out_dir,
    eval_settings,
)
from edgellm.prune.apply import METHODS, STRUCTURED


def _nm(text: str):
    from edgellm.prune.masks import PruneError, parse_nm

    try:
        return parse_nm(text)
    except PruneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parsers(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (unstructured, N:M, structured)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--method", default="wanda", choices=METHODS)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="fraction of weights removed, in [0, 1)")
    target.add_argument("--nm", type=_nm, help="N:M pattern, e.g. 2:4 or 4:8")
    p.add_argument("--scope", default="row", choices=["row", "layer", "global"],
                   help="magnitude only: compare weights per row, per layer or globally")
    p.add_argument("--structured", choices=STRUCTURED, help="remove whole heads/channels/layers")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction removed with --structured")
    p.add_argument("--granularity", default="query", choices=["query", "group"],
                   help="heads: query heads within each KV group, or whole KV groups")
    add_calib_args(p, n_samples=32)
    add_seed_arg(p)
    p.add_argument("--recover-steps", type=int, default=0, help="fine-tune steps after pruning")
    p.add_argument("--recover-lr", type=float, help="default 2e-5 (plain) or 2e-4 (--lora)")
    p.add_argument("--recover-batch", type=int, default=2, help="training batch of the recovery")
    p.add_argument("--recover-seq-len", type=int, default=256)
    p.add_argument("--lora", action="store_true", help="recover with LoRA adapters (peft), merged")
    p.add_argument("--control", action="store_true",
                   help="also fine-tune the unpruned model the same way (ppl_control)")
    p.add_argument("--baseline-calib", metavar="CORPUS",
                   help="also prune a copy calibrated on CORPUS; with --eval, the paired "
                        "delta_nll_vs_baseline (this mask minus that one)")
    add_allocation_args(p, "sparsity")  # Wanda only
    p.add_argument("--out", help="save the pruned model (safetensors) to this folder")
    p.add_argument("--eval", action="store_true", help="perplexity and KL vs the unpruned model")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args) -> dict:
    from edgellm.prune.apply import prune_record

    _check_args(args)  # fail before loading anything
    return prune_record(
        args.model, method=args.method, sparsity=args.sparsity, nm=args.nm, scope=args.scope,
        structured=args.structured, ratio=args.ratio, granularity=args.granularity,
        calib=args.calib, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
        evaluate=args.eval, eval_settings=eval_settings(args), recover_steps=args.recover_steps,
        recover_lr=args.recover_lr, recover_batch=args.recover_batch,
        recover_seq_len=args.recover_seq_len, lora=args.lora, control=args.control,
        baseline_calib=args.baseline_calib, allocate=args.allocate, spread=args.spread,
        sensitivity_tokens=args.sensitivity_tokens, out=args.out, progress=not args.json,
        device=args.device)


def _check_args(args) -> None:
    from edgellm.prune.masks import PruneError, check_sparsity
    from edgellm.prune.structured import _check_ratio

    if args.sparsity is not None:
        check_sparsity(args.sparsity)
    if args.structured:
        _check_ratio(args.ratio, args.structured)
    from edgellm.prune.apply import check_allocation

    check_allocation(args.allocate, method=args.method, sparsity=args.sparsity, nm=args.nm,
                     structured=args.structured, spread=args.spread,
                     sensitivity_tokens=args.sensitivity_tokens)
    if args.recover_steps < 0:
        raise PruneError(f"--recover-steps {args.recover_steps} must be >= 0")
    if args.n_samples < 1 or args.seq_len < 2:
        raise PruneError("--n-samples must be >= 1 and --seq-len >= 2")
    from edgellm.data import load_text

    check_model_name(args.model)
    check_eval_args(args)  # unknown corpus / changed stdlib files: fail before loading
    load_text(args.calib, "train")
    if args.baseline_calib is not None:
        if args.method == "magnitude" and args.structured is None:
            raise PruneError("--baseline-calib compares two calibrations, but magnitude pruning "
                             "uses none: use --method wanda or sparsegpt")
        load_text(args.baseline_calib, "train")
    if args.out:
        check_out_dir(args.out, "--out")
