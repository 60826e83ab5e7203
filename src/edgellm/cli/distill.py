"""``edgellm distill``: compress the model into a student, recover it by knowledge distillation
from the uncompressed teacher, and measure both.

::

    edgellm distill --student drop-layers --ratio 0.2 --loss fkl --steps 40 --eval --json
    edgellm distill --student drop-layers --ratio 0.2 --loss seqkd --teacher-url http://host:8080
    edgellm distill --student drop-layers --ratio 0.5 --loss fkl --save-as smollm2-135m-draft

``--model`` is the teacher and the source of the student.  ``--student`` drop-layers (``--ratio``
of the decoder layers removed, lowest block influence first, first and last kept), channels
(MLP channels), nm (2:4 Wanda), lowrank (SVD-LLM, ``--ratio`` of the linears' parameters) or
none (the teacher itself fine-tuned the same way: the control).  ``--loss`` ce (data only), fkl,
rkl, skew, mixed (``--alpha``·CE + (1−alpha)·fKL), hidden (fKL + hidden-state matching,
``--hidden-kind``), seqkd (CE on text the teacher generated through an OpenAI-compatible
endpoint: ``--teacher-url``, or a llama.cpp server started on ``--teacher-gguf`` or the default
model's GGUF).  ``--top-k K`` trains fkl against the teacher's cached top-K log-probs + a tail
bucket.  ``--batch-size``/``--seq-len`` are the training batch; ``--eval-batch-size`` the
evaluation's.  ``--baseline-loss ce`` also trains the same student with that loss and reports
the paired ΔNLL between the two.
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import (
    UsageError,
    add_eval_args,
    add_model_arg,
    add_seed_arg,
    check_eval_args,
    check_in_file,
    check_model_name,
    check_out_dir,
    eval_settings,
)
from edgellm.distill.apply import DEFAULT_LR, DEFAULT_SCHEDULE, LOSSES, WHITE_BOX
from edgellm.distill.students import KINDS
from edgellm.train import SCHEDULES


def add_parsers(sub) -> None:
    p = sub.add_parser("distill", help="knowledge distillation of a compressed student",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, help="the teacher (and source of the student): registry name, folder, .gguf")
    p.add_argument("--student", default="drop-layers", choices=KINDS)
    p.add_argument("--ratio", type=float, default=0.2,
                   help="fraction removed: of the layers (drop-layers), MLP channels, parameters")
    p.add_argument("--loss", default="fkl", choices=LOSSES)
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (T² factor)")
    p.add_argument("--top-k", type=int, default=0,
                   help="fkl against the teacher's cached top-K log-probs + tail (0: full logits)")
    p.add_argument("--alpha", type=float, default=0.5, help="CE weight of mixed; skew of skew")
    p.add_argument("--hidden-kind", default="mse", choices=["mse", "cosine"])
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="windows per forward/backward inside a step, gradients accumulated "
                        "(memory; 0: the whole batch at once)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--train-data", default="pydoc", help="corpus whose train split is trained on")
    p.add_argument("--calib", default="pydoc", help="calibration corpus for building the student")
    p.add_argument("--n-samples", type=int, default=8, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--baseline-loss", choices=[x for x in LOSSES if x != "seqkd"],
                   help="also train the same student with this loss: paired ΔNLL vs it")
    p.add_argument("--time-steps", type=int, default=0,
                   help="time R repeats of one step of each kind (teacher forward, student "
                        "step, live KD step, top-k KD step) on the first batch")
    g = p.add_argument_group("seqkd (black-box teacher)")
    g.add_argument("--teacher-url", help="OpenAI-compatible endpoint (…/v1/completions)")
    g.add_argument("--teacher-gguf", help="serve this GGUF with llama.cpp as the teacher")
    g.add_argument("--prompts", help="text file, one prompt per line (default: pydoc train)")
    g.add_argument("--n-prompts", type=int, default=64)
    g.add_argument("--prompt-tokens", type=int, default=32)
    g.add_argument("--gen-tokens", type=int, default=192, help="tokens generated per prompt")
    g.add_argument("--gen-temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--out", help="save the student (safetensors) to this new folder")
    p.add_argument("--save-as", help="save the student under a derived-model name "
                   "(smollm2-135m-draft), loadable with --model NAME")
    add_seed_arg(p)
    p.add_argument("--eval", action="store_true", help="perplexity and KL vs the teacher")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args) -> dict:
    from edgellm.distill.apply import distill_record

    check_args(args)  # fail before loading anything
    seqkd = None
    if args.loss == "seqkd":
        seqkd = dict(url=args.teacher_url, gguf=args.teacher_gguf, prompts_file=args.prompts,
                     n_prompts=args.n_prompts, prompt_tokens=args.prompt_tokens,
                     max_tokens=args.gen_tokens, temperature=args.gen_temperature,
                     top_p=args.top_p)
    return distill_record(
        args.model, student=args.student, ratio=args.ratio, loss=args.loss,
        temperature=args.temperature, top_k=args.top_k, alpha=args.alpha, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, hidden_kind=args.hidden_kind,
        hidden_weight=args.hidden_weight, calib=args.calib, n_samples=args.n_samples,
        calib_seq_len=args.calib_seq_len, train_data=args.train_data, seqkd=seqkd,
        baseline_loss=args.baseline_loss, time_steps=args.time_steps,
        micro_batch_size=args.micro_batch_size or None, evaluate=args.eval, eval_settings=eval_settings(args),
        out=args.out, save_as=args.save_as, seed=args.seed, progress=not args.json,
        device=args.device)


def check_args(args) -> None:
    """Every flag checked before a model is loaded (a bad value fails in milliseconds)."""

    from edgellm.data import load_text
    from edgellm.distill.losses import DistillError, check_temperature
    from edgellm.distill.students import check_ratio
    from edgellm.models import DERIVED
    from edgellm.train import check_settings

    check_ratio(args.student, args.ratio)
    check_temperature(args.temperature)
    if args.top_k < 0:
        raise DistillError(f"--top-k {args.top_k}: give a positive number of teacher log-probs "
                           "to keep (e.g. 64), or 0 for the full logits")
    if args.top_k and args.loss != "fkl":
        raise DistillError(f"--top-k caches the teacher for --loss fkl only (got {args.loss})")
    if args.micro_batch_size < 0:
        raise DistillError(f"--micro-batch-size {args.micro_batch_size} must be >= 0")
    if args.time_steps < 0:
        raise DistillError(f"--time-steps {args.time_steps}: give a number of repeats >= 0")
    if not 0.0 <= args.alpha <= 1.0:
        raise DistillError(f"--alpha {args.alpha} must be in [0, 1]")
    check_settings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                   lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
                   max_grad_norm=None)
    if args.n_samples < 1 or args.calib_seq_len < 2:
        raise DistillError("--n-samples must be >= 1 and --calib-seq-len >= 2")
    if args.loss == "seqkd":
        if args.teacher_url and args.teacher_gguf:
            raise UsageError("give --teacher-url or --teacher-gguf, not both")
        for name in ("n_prompts", "prompt_tokens", "gen_tokens"):
            if getattr(args, name) < 1:
                raise DistillError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 < args.top_p <= 1 or args.gen_temperature < 0:
            raise DistillError("--top-p must be in (0, 1] and --gen-temperature >= 0")
        if args.prompts:
            check_in_file(args.prompts, "prompt file (one prompt per line)")
    elif args.teacher_url or args.prompts:
        raise UsageError("--teacher-url and --prompts are for --loss seqkd (black-box KD)")
    if args.teacher_gguf:
        gguf = check_in_file(args.teacher_gguf, "teacher GGUF", suffix=".gguf")
        if args.loss != "seqkd":
            if args.loss in WHITE_BOX:
                _check_same_vocab(args.model, gguf, args.loss)
            raise UsageError(f"--teacher-gguf is the black-box teacher of --loss seqkd; with "
                             f"--loss {args.loss} the teacher is --model (give --model "
                             f"{args.teacher_gguf} to distill from that GGUF)")
    check_model_name(args.model)
    check_eval_args(args)
    load_text(args.train_data, "train")
    if args.student != "none":
        load_text(args.calib, "train")
    if args.out:
        check_out_dir(args.out, "--out", empty=True)
    if args.save_as and args.save_as not in DERIVED:
        raise UsageError(f"--save-as {args.save_as!r}: known derived names: "
                         f"{', '.join(sorted(DERIVED))}")
    if (args.out or args.save_as) and args.student == "lowrank":
        raise UsageError("a low-rank student cannot be saved as a plain model here; drop "
                         "--out/--save-as or use edgellm lowrank --out")
    if args.teacher_url:
        from edgellm.deploy.server import check_endpoint

        check_endpoint(args.teacher_url)


def _check_same_vocab(model: str, gguf, loss: str) -> None:
    """A white-box loss with ``--teacher-gguf``: the GGUF's vocabulary must be the model's."""
    from gguf import GGUFReader

    from edgellm.distill.losses import DistillError
    from edgellm.models import REGISTRY, default_gguf

    def n_vocab(path) -> int:
        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.tokens")
        return len(field.data) if field is not None else -1

    ours = default_gguf(model, quiet=True) if model in REGISTRY else None
    theirs = n_vocab(gguf)
    mine = n_vocab(ours) if ours else None
    if mine is None or theirs != mine:
        raise DistillError(
            f"--teacher-gguf {gguf} has a vocabulary of {theirs} tokens, the student's "
            f"({model}) {mine if mine is not None else 'cannot be compared'}: --loss {loss} "
            "compares logits token by token; use --loss seqkd (text only) for a teacher of "
            "another family")
