"""``edgellm pipeline {run,grade} RECIPE``: chain the course's tools under a device budget.

::

    edgellm pipeline run recipes/phone.yaml --json
    edgellm pipeline grade recipes/phone.yaml --budget phone --json

``run`` runs the recipe's steps (structured pruning / KD, a LoRA task adapter, GPTQ/AWQ or QAT,
the GGUF export, the llama.cpp benchmark), each one cached under the recipe's hash, and prints
each step's record.  ``grade`` runs (or reuses) the recipe, then measures the exported file
itself (size, perplexity, task accuracy, decode speed) against the budget and prints the verdict
per criterion, ``within_budget`` and the score.  A recipe is checked before anything runs;
FAST mode (``--fast``, or ``EDGELLM_FAST=1``) caps every step count and shrinks the evaluation.
"""

from __future__ import annotations

import argparse
import os

from edgellm.cli.common import add_json_arg

#: the keys every record of this command has (None where a run does not measure it)
KEYS = ("size_bytes", "decode_tokens_per_s", "ppl", "accuracy", "within_budget")


def add_parsers(sub) -> None:
    p = sub.add_parser("pipeline", help="run a recipe of the course's tools; grade it under a "
                       "device budget", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="action", required=True)
    for name, func, helptext in (("run", run, "run (or reuse) every step of a recipe"),
                                 ("grade", grade, "run a recipe, then measure its GGUF "
                                  "against a budget")):
        r = psub.add_parser(name, help=helptext)
        r.add_argument("recipe", help="recipe file (.yaml or .json), e.g. recipes/phone.yaml")
        if name == "grade":
            r.add_argument("--budget", help="budget name (default: the recipe's budget)")
            r.add_argument("--threads", type=int, help="threads of the measurements (default: "
                           "the budget's)")
        r.add_argument("--fast", action="store_true",
                       default=os.environ.get("EDGELLM_FAST", "").lower() in ("1", "true",
                                                                             "yes", "on"),
                       help="FAST mode: every step count capped, a smaller evaluation")
        add_json_arg(r)
        r.set_defaults(func=func)


def _check(args):
    """The recipe (and budget) checked before anything is loaded."""
    from edgellm.pipeline.budgets import get_budget
    from edgellm.pipeline.recipe import PipelineError, load_recipe

    recipe = load_recipe(args.recipe)
    if getattr(args, "budget", None) is not None:
        get_budget(args.budget)
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise PipelineError(f"--threads {args.threads}: give a positive number of threads")
    return recipe


def run(args) -> dict:
    from edgellm.pipeline.apply import run_recipe

    recipe = _check(args)
    rec = run_recipe(recipe, fast=args.fast, progress=not args.json)
    rec.pop("path", None)
    return {**dict.fromkeys(KEYS), **rec}


def grade(args) -> dict:
    from edgellm.pipeline.apply import grade as grade_recipe

    recipe = _check(args)
    return grade_recipe(recipe, budget=args.budget, threads=args.threads, fast=args.fast,
                        progress=not args.json)
