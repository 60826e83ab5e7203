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
``--lora``); ``--control`` fine-tunes the unpruned model the same way (``ppl_control``); the
record keeps ``ppl_before_recovery`` / ``kl_mean_before_recovery`` and ``ppl`` is after recovery.
``--calib stdlib --data pydoc`` (any two corpora) is contextual pruning: scores from one domain,
perplexity on another.
"""

from __future__ import annotations

import argparse
import copy

from edgellm.cli.common import (
    add_calib_args,
    add_eval_args,
    add_model_arg,
    add_seed_arg,
    check_eval_args,
    check_model_name,
    check_out_dir,
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
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out", help="save the pruned model (safetensors) to this folder")
    p.add_argument("--eval", action="store_true", help="perplexity and KL vs the unpruned model")
    add_eval_args(p)
    p.set_defaults(func=run)


def _eval(model, reference, tok, args) -> dict:
    from edgellm.metrics import evaluate_paired

    res = evaluate_paired(model, reference, tok, data=args.data, split=args.split,
                             protocol=args.protocol, ctx=args.ctx, max_tokens=args.max_tokens,
                             chunks=args.chunks, batch_size=args.eval_batch_size,
                             progress=not args.json)
    # its eval_tokens_per_s (eval loop) sits beside the paired prefill_tokens_per_s
    return res


def run(args) -> dict:
    import os

    from edgellm.data import get_tokens
    from edgellm.measure import merge, paired_prefill, peak_rss_bytes
    from edgellm.models import load_model, n_params
    from edgellm.prune.accounting import model_bytes, sparse_storage
    from edgellm.prune.apply import prune_model
    from edgellm.records import record

    _check_args(args)  # fail before loading anything
    model, tok = load_model(args.model, quiet=args.json)
    reference = copy.deepcopy(model)
    rec = prune_model(model, tok, method=args.method, sparsity=args.sparsity, nm=args.nm,
                      scope=args.scope, structured=args.structured, ratio=args.ratio,
                      granularity=args.granularity, calib=args.calib, n_samples=args.n_samples,
                      seq_len=args.seq_len, seed=args.seed, progress=not args.json).info
    rec.update(n_params=n_params(model), n_params_base=n_params(reference),
               n_nonzero=sum(int((p != 0).sum()) for p in model.parameters()),
               size_bytes=model_bytes(model), size_bytes_base=model_bytes(reference))
    if args.structured is None or args.sparsity is not None or args.nm is not None:
        rec.update(sparse_storage(model, args.nm))
    speed_tokens = get_tokens(args.data, tok, args.split, 1024)
    merge(rec, paired_prefill(model, reference, speed_tokens))
    rec["speed_note"] = ("dense fp32 forward: zeros do not speed up a dense matmul; no CPU 2:4 "
                         "kernel in PyTorch")
    rec.update(ppl=None, ppl_base=None, kl_mean=None)
    if args.eval:
        merge(rec, _eval(model, reference, tok, args))
    if args.recover_steps:
        from edgellm.prune.recover import finetune, zero_masks

        train = get_tokens(args.calib, tok, "train")
        masks = zero_masks(model) if (args.sparsity is not None or args.nm is not None) else None
        kw = dict(steps=args.recover_steps, batch_size=args.recover_batch,
                  seq_len=args.recover_seq_len, lr=args.recover_lr, lora=args.lora,
                  seed=args.seed, progress=not args.json)
        before = {k: rec[k] for k in ("ppl", "kl_mean") if rec.get(k) is not None}
        ft = finetune(model, train, masks=masks, **kw)
        rec.update({f"{k}_before_recovery": v for k, v in before.items()})
        rec.update(recover_steps=ft.steps, recover_seconds=ft.seconds,
                   recover_lr=ft.lr, recover_lora=args.lora,
                   recover_loss_first=ft.losses[0], recover_loss_last=ft.losses[-1],
                   sparsity_after_recovery=sum(int((lin.weight == 0).sum()) for lin in
                                               _lins(model)) / sum(lin.weight.numel()
                                                                   for lin in _lins(model)))
        if args.eval:
            merge(rec, _eval(model, reference, tok, args))
        if args.control:
            control = copy.deepcopy(reference)
            finetune(control, train, **kw)
            if args.eval:
                c = _eval(control, reference, tok, args)
                rec.update(ppl_control=c["ppl"], kl_mean_control=c["kl_mean"])
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        rec.update(out=str(args.out),
                   file_bytes=os.path.getsize(os.path.join(args.out, "model.safetensors")))
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=args.seed, model=args.model)


def _check_args(args) -> None:
    from edgellm.prune.masks import PruneError, check_sparsity
    from edgellm.prune.structured import _check_ratio

    if args.sparsity is not None:
        check_sparsity(args.sparsity)
    if args.structured:
        _check_ratio(args.ratio, args.structured)
    if args.recover_steps < 0:
        raise PruneError(f"--recover-steps {args.recover_steps} must be >= 0")
    if args.n_samples < 1 or args.seq_len < 2:
        raise PruneError("--n-samples must be >= 1 and --seq-len >= 2")
    from edgellm.data import load_text

    check_model_name(args.model)
    check_eval_args(args)  # unknown corpus / changed stdlib files: fail before loading
    load_text(args.calib, "train")
    if args.out:
        check_out_dir(args.out, "--out")


def _lins(model):
    from edgellm.prune.layers import prunable_linears

    return list(prunable_linears(model).values())
