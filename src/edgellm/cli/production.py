"""``edgellm bnb`` and ``edgellm torchao``: the production libraries on the default model.

::

    edgellm bnb --mode nf4 --eval --max-tokens 2048 --json
    edgellm bnb --mode nf4 --double-quant --eval --json
    edgellm bnb --mode int8 --threshold 6.0 --eval --json
    edgellm bnb --mode int4 --impl edgellm --eval --json      # QLoRA's Int4, our code
    edgellm torchao --mode int8_dynamic --eval --max-tokens 512 --json

The model is loaded from the cache in fp32 and its 210 decoder linears are replaced by the
library's modules (the tied embedding / lm_head stays fp32).  Reported: ``memory_bytes`` (real
bytes of parameters, buffers, packed storage and quant states, as loaded) and
``memory_bytes_runtime`` (after running: bitsandbytes re-lays 4-bit weights out on AVX512-BF16
CPUs), ``seconds_load`` (cached fp32 load + quantization), ``prefill_tokens_per_s`` (protocol
``prefill``: plain forward passes over the evaluation windows, after one warm-up window: batched,
compute-bound), ``decode_tokens_per_s`` (protocol ``decode``: greedy generation at batch 1 with the
KV cache, ``--decode-tokens`` steps after a 32-token prompt: memory- and overhead-bound), each with
the fp32 model's speed measured in the same run (``*_base``) and named in ``speed_protocol``, and
with ``--eval`` perplexity, KL and top-1 agreement against the fp32 model on the same tokens
(``edgellm quantize``'s ``evaluate_paired``, with its ``eval_tokens_per_s``).  ``--impl edgellm`` runs our from-scratch block formats instead
(fake-quantized fp32 weights: quality only; ``size_bytes`` is the packed size they would need).
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import (
    add_eval_args,
    add_model_arg,
    add_seed_arg,
    check_eval_args,
    check_model_name,
    eval_settings,
    parse_threshold,
)

IMPLS = ("bnb", "edgellm")
BNB_CHOICES = ("nf4", "fp4", "int8", "fp4_e2m1", "int4", "int4_asym")


def add_parsers(sub) -> None:
    p = sub.add_parser("bnb", help="bitsandbytes NF4 / FP4 / int8 on CPU (and our versions)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, cpu_only="edgellm bnb (bitsandbytes' CPU path, timed on this CPU)")
    p.add_argument("--mode", default="nf4", choices=BNB_CHOICES,
                   help="bitsandbytes: nf4, fp4, int8; with --impl edgellm also fp4_e2m1 "
                   "(plain E2M1), int4 (symmetric absmax, QLoRA's Int4), int4_asym (min/max RTN)")
    p.add_argument("--impl", default="bnb", choices=IMPLS,
                   help="bnb: the library's modules; edgellm: our from-scratch formats")
    p.add_argument("--double-quant", action="store_true",
                   help="QLoRA double quantization of the 4-bit block absmax (8-bit, blocks of 256)")
    p.add_argument("--blocksize", type=int, default=64, help="weights per absmax (4-bit modes)")
    p.add_argument("--threshold", type=parse_threshold, default=6.0,
                   help="int8: activation outlier threshold of LLM.int8() (0 / inf / none = "
                   "no decomposition)")
    p.add_argument("--no-cpu-kernel", action="store_true",
                   help="4-bit: skip bitsandbytes' fused bf16 AVX512 kernel (dequantize to fp32, "
                   "then matmul)")
    _add_run_args(p)

    p = sub.add_parser("torchao", help="torchao int8 weight-only / dynamic on CPU",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, cpu_only="edgellm torchao (torchao's CPU int8, timed on this CPU)")
    p.add_argument("--mode", default="int8_weight_only",
                   choices=("int8_weight_only", "int8_dynamic"))
    _add_run_args(p)


def _add_run_args(p) -> None:
    """What ``edgellm bnb`` and ``edgellm torchao`` share: seed, evaluation, speed."""
    add_seed_arg(p)
    p.add_argument("--eval", action="store_true",
                   help="measure perplexity and KL against the unquantized model")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="greedy generation steps timed for decode_tokens_per_s (0 = skip)")
    add_eval_args(p)
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Bad combinations → QuantError before any model is loaded."""
    from edgellm.quant.backends.bitsandbytes import check_bnb_args
    from edgellm.quant.backends.torchao import check_torchao_mode
    from edgellm.quant.blockwise import check_our_args
    from edgellm.quant.qtensor import QuantError

    check_model_name(args.model)
    check_eval_args(args)
    if args.decode_tokens < 0:
        raise QuantError(f"--decode-tokens {args.decode_tokens}: give a number of generation "
                         "steps ≥ 1, or 0 to skip the decode speed")
    if args.command == "torchao":
        check_torchao_mode(args.mode)
        return
    if args.impl == "bnb":
        check_bnb_args(args.mode, args.double_quant, args.blocksize, args.threshold)
        if args.mode == "int8" and args.no_cpu_kernel:
            raise QuantError("--no-cpu-kernel applies to the 4-bit modes (nf4, fp4)")
    else:
        check_our_args(args.mode, args.double_quant, args.blocksize)


def run(args) -> dict:
    from edgellm.quant.apply import production_record

    check_args(args)
    return production_record(
        args.model, library="torchao" if args.command == "torchao" else args.impl,
        mode=args.mode, double_quant=getattr(args, "double_quant", False),
        blocksize=getattr(args, "blocksize", 64), threshold=getattr(args, "threshold", 6.0),
        cpu_kernel=not getattr(args, "no_cpu_kernel", False), evaluate=args.eval,
        eval_settings=eval_settings(args), decode_tokens=args.decode_tokens, seed=args.seed,
        progress=not args.json)
