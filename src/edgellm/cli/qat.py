"""``edgellm qat``: quantization-aware training (fake quantization with a straight-through
estimator, learned step sizes, BitNet b1.58) compared with post-training quantization.

::

    edgellm qat --bits 2 --group-size 64 --steps 100 --control --eval --json
    edgellm qat --bits 1.58 --steps 150 --ramp 75 --lr 1e-4 --curve-every 25 --eval --json
    edgellm qat --bits 4 --steps 40 --out build/qat-q4_0        # exports bit for bit as Q4_0

``--bits`` 2 or 3: lesson 03's asymmetric min-max grid at ``--group-size`` (``--lsq``: learned
symmetric steps instead); 4: llama.cpp's Q4_0 grid (symmetric, groups of 32, fp16 scales;
``--group-size`` must be 32); 1.58: BitNet b1.58, absmean ternary weights per tensor and 8-bit
per-token activations (``--group-size`` ignored).  ``--ramp R`` raises the quantization strength
λ linearly to 1 over the first R steps.  The record compares QAT (``ppl``) with PTQ of the fp32
model (``ppl_ptq``: ``--ptq-method`` at 2-3 bits, absmean rounding at 1.58, llama.cpp's Q4_0 at 4)
and, with ``--control``, with the fp32 model fine-tuned the same steps then quantized the same
way (``ppl_control``), all paired on the same held-out tokens.
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import (
    add_eval_args,
    add_model_arg,
    add_seed_arg,
    check_eval_args,
    check_model_name,
    check_out_dir,
    eval_settings,
    parse_group_size,
)

AUTO = -1  # --group-size not given: 64 at 2-3 bits, 32 at 4 bits, per tensor at 1.58


def group_size_for(bits, given):
    """``--group-size`` as given, or the default of ``bits``."""
    if given != AUTO:
        return given
    return {4: 32, 1.58: None}.get(bits, 64)


def add_parsers(sub) -> None:
    from edgellm.qat.apply import INITS, LOSSES, PTQ_METHODS

    p = sub.add_parser("qat", help="quantization-aware training vs post-training quantization",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--bits", default="2", help="1.58 (BitNet ternary), 2, 3 or 4 (Q4_0 grid)")
    p.add_argument("--group-size", type=parse_group_size, default=AUTO,
                   help="weights per scale at 2-3 bits (default 64); 4 bits: 32 (Q4_0); "
                        "1.58: ignored (one scale per tensor)")
    p.add_argument("--lsq", action="store_true", help="learned step sizes (LSQ) at 2-3 bits")
    p.add_argument("--steps", type=int, default=100, help="AdamW steps (cosine schedule)")
    p.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--ramp", type=int, default=0,
                   help="steps over which the quantization strength rises to 1 (0: none)")
    p.add_argument("--loss", default="ce", choices=LOSSES,
                   help="ce: next-token loss; fkl: distill the fp32 model's predictions")
    p.add_argument("--init", default="ptq", choices=INITS,
                   help="2-3 bits: start from the PTQ model's weights (ptq) or the fp32 ones")
    p.add_argument("--ptq-method", default="imatrix", choices=PTQ_METHODS,
                   help="the PTQ compared with at 2-3 bits (lesson 03's best: imatrix)")
    p.add_argument("--control", action="store_true",
                   help="also fine-tune fp32 the same steps, then the same PTQ")
    p.add_argument("--curve-every", type=int, default=0,
                   help="record the validation NLL every N steps (the curve against tokens)")
    p.add_argument("--curve-tokens", type=int, default=2048, help="validation tokens per point")
    p.add_argument("--time-steps", type=int, default=0,
                   help="time R repeats of a plain and a QAT step on the first batch")
    p.add_argument("--train-data", default="pydoc", help="corpus whose train split is trained on")
    p.add_argument("--calib", default="pydoc", help="calibration corpus of the PTQ")
    p.add_argument("--n-samples", type=int, default=8, help="PTQ calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", help="save the QAT model (packed codes) to this new folder "
                   "(2-4 bits; `edgellm export --model FOLDER` writes its GGUF)")
    add_seed_arg(p)
    p.add_argument("--eval", action="store_true", help="perplexity and KL of QAT, PTQ (and control)")
    add_eval_args(p)
    p.set_defaults(func=run)


def check_args(args):
    """Every flag checked before a model is loaded; returns the parsed bits."""
    from edgellm.data import load_text
    from edgellm.qat.apply import check_options, parse_bits
    from edgellm.qat.fake import QATError
    from edgellm.train import check_settings

    args.group_size = group_size_for(parse_bits(args.bits), args.group_size)
    bits = check_options(bits=args.bits, group_size=args.group_size, steps=args.steps,
                         ramp=args.ramp, lsq=args.lsq, ptq_method=args.ptq_method,
                         loss=args.loss, curve_every=args.curve_every, init=args.init)
    check_settings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                   lr=args.lr, schedule="cosine", warmup_steps=0, max_grad_norm=1.0)
    for flag in ("curve_tokens", "n_samples", "calib_seq_len"):
        if getattr(args, flag) < 1:
            raise QATError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.time_steps < 0:
        raise QATError(f"--time-steps {args.time_steps}: give a number of repeats >= 0")
    if args.out:
        if bits == 1.58:
            raise QATError("a ternary model is measured here, not saved: llama.cpp cannot run "
                           "ternary types on 576-wide rows (drop --out)")
        check_out_dir(args.out, "--out", empty=True)
    check_model_name(args.model)
    check_eval_args(args)
    load_text(args.train_data, "train")
    load_text(args.calib, "train")
    return bits


def run(args) -> dict:
    from edgellm.qat.apply import qat_record

    bits = check_args(args)
    return qat_record(
        args.model, bits=bits, group_size=args.group_size, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, ramp=args.ramp,
        lsq=args.lsq, loss=args.loss, init=args.init, ptq_method=args.ptq_method, control=args.control,
        curve_every=args.curve_every, curve_tokens=args.curve_tokens,
        time_steps=args.time_steps, train_data=args.train_data, calib=args.calib,
        n_samples=args.n_samples, calib_seq_len=args.calib_seq_len, evaluate=args.eval,
        eval_settings=eval_settings(args), out=args.out, seed=args.seed,
        progress=not args.json, device=args.device)
