"""``edgellm lowrank``: factorize the default model's linears into low-rank pairs, measure
parameters, size, speed, perplexity and KL.

::

    edgellm lowrank --method svd --ratio 0.2 --eval --max-tokens 4096 --json
    edgellm lowrank --method svdllm --ratio 0.2 --calib pydoc --n-samples 32 --seq-len 512 --eval
    edgellm lowrank --method asvd --rank 96 --out DIR
    edgellm lowrank --method svdllm --ratio 0.2 --allocate sensitivity --spread 0.1 --eval

Every decoder linear ``W`` (out, in) becomes two linears ``B A`` (out×r, r×in); the tied
embedding / lm_head is left alone.  ``--ratio R`` removes the fraction R of the factorized
linears' parameters in every layer (0.2 keeps 80 %); ``--rank K`` uses one rank everywhere
(it must be below every linear's min(out, in); at or above a linear's break-even rank
out·in/(out+in) it saves nothing, and a warning says so).  ``svd`` is plain truncated SVD;
``asvd`` scales input channels by mean |x|^alpha first (ASVD); ``svdllm`` whitens by the
Cholesky factor of the calibration Hessian (SVD-LLM).  ``--allocate sensitivity`` (with
``--ratio``) first measures each layer's ΔNLL when only it is factorized (``sensitivity``, on
``--sensitivity-tokens`` of the calibration corpus's validation split), then removes
``ratio ± spread`` from the least / most sensitive layers, linearly in between (``layer_ratios``),
at the same total budget (``ratio_achieved``).

``n_params`` / ``n_params_base``: parameters of the factorized and the original model;
``bpw``: bits per original weight of the factorized linears with the factors at fp16
(16 × kept fraction); ``size_bytes``: bytes of the factorized model as held (fp32, tied
embedding once).  Speed: ``paired-prefill`` (factorized and original model timed alternately).
With ``--eval`` the original model is the reference (``ppl``, ``ppl_base``, ``delta_nll`` ±
``delta_nll_stderr``, ``kl_mean``, ``top1_agreement``).  ``--out DIR`` saves the factorized
model (config, safetensors, ``lowrank.json`` of ranks; reload with
``edgellm.lowrank.layers.load_factorized``).
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
from edgellm.lowrank.apply import METHODS


def add_parsers(sub) -> None:
    p = sub.add_parser("lowrank", help="low-rank factorization of a model (SVD, ASVD, SVD-LLM)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--method", default="svd", choices=METHODS)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float,
                        help="fraction of the factorized linears' parameters removed, in (0, 1)")
    target.add_argument("--rank", type=int, help="one rank for every decoder linear")
    p.add_argument("--alpha", type=float, default=0.5, help="ASVD exponent of mean |x|")
    add_allocation_args(p, "ratio")  # with --ratio
    add_calib_args(p, n_samples=32)
    add_seed_arg(p)
    p.add_argument("--out", help="save the factorized model to this new (or empty) folder")
    p.add_argument("--eval", action="store_true",
                   help="measure perplexity and KL against the original model")
    add_eval_args(p)
    p.set_defaults(func=run)


def _config_shapes(name: str):
    """Linear shapes from the model's config.json, when it can be read without loading."""
    from pathlib import Path

    from edgellm.lowrank.apply import shapes_from_config
    from edgellm.models import REGISTRY, registry_entry
    from edgellm.paths import cache_dir

    folder = (cache_dir() / "models" / registry_entry(name).name if name in REGISTRY
              else Path(name).expanduser())
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return shapes_from_config(AutoConfig.from_pretrained(folder))
    except (AttributeError, ValueError, OSError):
        return None


def check_args(args) -> None:
    """Every bad value fails here, before the model is loaded."""
    from pathlib import Path

    from edgellm.data import load_text
    from edgellm.lowrank.apply import check_options, plan_ranks
    from edgellm.lowrank.svd import LowRankError

    check_options(args.method, ratio=args.ratio, rank=args.rank, alpha=args.alpha)
    if args.allocate == "sensitivity":
        from edgellm.lowrank.sensitivity import spread_ratios

        if args.ratio is None:
            raise LowRankError("--allocate sensitivity spreads a --ratio over the layers; give "
                               "--ratio instead of --rank")
        spread_ratios({0: 0.0, 1: 1.0}, args.ratio, args.spread)  # raises on a bad spread
        if args.sensitivity_tokens < 64:
            raise LowRankError(f"--sensitivity-tokens {args.sensitivity_tokens}: give at least 64")
    if args.n_samples < 1 or args.seq_len < 2:
        raise LowRankError("--n-samples must be >= 1 and --seq-len >= 2")
    check_model_name(args.model)
    check_eval_args(args)
    if args.method != "svd":
        load_text(args.calib, "train")
    if args.allocate == "sensitivity":
        load_text(args.calib, "validation")
    if args.out:
        check_out_dir(args.out, "--out")
        out = Path(args.out).expanduser()
        if out.is_dir() and any(out.iterdir()):
            raise LowRankError(f"--out {args.out}: the folder is not empty; give a new folder")
    shapes = _config_shapes(args.model)
    if shapes is not None:  # an impossible rank fails now; the break-even warning comes later
        plan_ranks(shapes, ratio=args.ratio, rank=args.rank)


def run(args) -> dict:
    from edgellm.lowrank.apply import factorize_record

    check_args(args)
    return factorize_record(
        args.model, method=args.method, ratio=args.ratio, rank=args.rank, alpha=args.alpha,
        calib=args.calib, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
        evaluate=args.eval, eval_settings=eval_settings(args), out=args.out,
        allocate=args.allocate, spread=args.spread, sensitivity_tokens=args.sensitivity_tokens,
        progress=not args.json, device=args.device)
