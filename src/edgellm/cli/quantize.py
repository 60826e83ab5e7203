"""``edgellm quantize``: quantize the default model's linears, measure size, perplexity and KL.

::

    edgellm quantize --method rtn --bits 4 --group-size 64 --eval --max-tokens 4096 --json
    edgellm quantize --method gguf --type Q4_0 --eval --json
    edgellm quantize --method gptq --bits 3 --calib pydoc --n-samples 128 --seq-len 512 --eval
    edgellm quantize --method rtn --bits 8 --group-size 0 --sym --a-bits 8 --eval   # naive W8A8
    edgellm quantize --method smoothquant --alpha 0.5 --bits 8 --group-size 0 --sym --a-bits 8
    edgellm quantize --method llm_int8 --threshold 6.0 --eval

Activations: ``--a-bits N`` fake-quantizes every decoder linear's input (dynamic per-token scales;
``--a-static`` = one per-tensor scale per layer measured on the calibration set), ``--a-format
fp8`` uses E4M3 instead of integers.  ``smoothquant`` migrates activation outliers into the
weights first (``--alpha``); ``llm_int8`` is LLM.int8()'s vector-wise int8 matmul with fp16
outlier columns (``--threshold``; 0 or inf = plain absmax int8); ``rotate`` applies a Hadamard
rotation before RTN; ``lwc`` learns weight clipping; ``--kv-bits`` quantizes the KV cache.

``--lorc-rank K`` adds LoRC (ZeroQuant-V2) after the weight quantizer: every quantized linear
holds ``Q(W) + U Vᵀ`` with ``U Vᵀ`` the rank-K SVD of its error ``W − Q(W)``, the factors
stored in fp16; ``bpw`` and ``size_bytes`` include them (``bpw_quant``: without), ``rank`` is
K and ``n_params`` counts the factors.  K must be below every linear's min(out, in).

``--group-size 0`` (or ``channel``) quantizes per output channel.  With ``--eval`` a second,
unquantized copy of the model is loaded as the reference: the quantized and the reference model
score the same tokens, giving ``ppl``, ``ppl_base``, the paired ``delta_nll`` with its standard
error, ``kl_mean`` (KL(P_base ‖ P_quant) per token), and ``lossless`` (every quantized weight
equals the original: true for asymmetric 4-bit g32, this model's source format).  ``--out DIR`` saves the packed model
(:mod:`edgellm.quant.save`).  The tied embedding / lm_head is never quantized (reported apart).
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import (
    add_calib_args,
    add_eval_args,
    add_model_arg,
    add_seed_arg,
    check_cpu_only,
    check_eval_args,
    check_model_name,
    check_out_dir,
    check_out_file,
    eval_settings,
    parse_group_size,
    parse_threshold,
)
from edgellm.quant.apply import A_FORMATS, GROUP_PARAMS, METHODS
from edgellm.quant.salient import SALIENT_BY


def add_parsers(sub) -> None:
    p = sub.add_parser("quantize", help="weight-only post-training quantization of a model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument("--bits", type=int, default=4, help="weight bits (2-8); ignored with gguf")
    p.add_argument("--group-size", type=parse_group_size, default=64,
                   help="weights per scale along the input dim; 0 or 'channel' = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric (no zero point); default asym")
    p.add_argument("--type", default="Q4_0", help="GGUF type with --method gguf "
                   "(F16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, MXFP4)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by "
                   "decreasing diag(H) (default: left to right)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping, a fraction of the "
                   "mean diagonal of H added to it (default 0.01)")
    p.add_argument("--group-params", default="current", choices=GROUP_PARAMS,
                   help="GPTQ with groups: each group's scale from the weights as updated so far "
                   "(current, default) or as they stood when the 128-column block started "
                   "(block_start, the reference implementation's)")
    p.add_argument("--bpw-budget", type=float, help="mixed precision: average bits per weight "
                   "(more bits to the most sensitive layers)")
    p.add_argument("--a-bits", type=int, help="activation bits (2-8, or 16); default: "
                   "weight-only (activations stay fp32)")
    p.add_argument("--a-format", default="int", choices=A_FORMATS,
                   help="activation format: int, or fp8 (E4M3, needs --a-bits 8)")
    p.add_argument("--a-static", action="store_true", help="static per-tensor activation "
                   "scales from the calibration set (default: dynamic per-token)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="SmoothQuant migration strength in [0, 1]")
    p.add_argument("--threshold", type=parse_threshold, default=6.0, help="LLM.int8 outlier "
                   "threshold; 0 or inf = absmax int8 without decomposition")
    p.add_argument("--kv-bits", type=int, help="KV-cache bits (default: not quantized)")
    p.add_argument("--keep-salient", type=float, help="with --method rtn: keep this fraction "
                   "of each linear's input channels in full precision (AWQ's motivation: 0.01)")
    p.add_argument("--salient-by", default="act", choices=SALIENT_BY,
                   help="how --keep-salient picks channels: activation magnitude, weight "
                   "magnitude, or at random (seeded by --seed)")
    p.add_argument("--lorc-rank", type=int, default=0, help="LoRC: add a rank-K fp16 "
                   "correction U Vᵀ of each quantized linear's error W − Q (0 = off)")
    p.add_argument("--save-clips", help="with --method lwc: write the learned clipping values to "
                   "this .safetensors file (lessons apply them without training)")
    add_calib_args(p)
    add_seed_arg(p)
    p.add_argument("--out", help="save the quantized model (packed codes + scales) to this folder")
    p.add_argument("--gguf", metavar="FILE",
                   help="also write the quantized linears into llama.cpp's blocks (4-bit g32 "
                        "sym → Q4_0, asym → Q4_1, 8-bit g32 sym → Q8_0) as this GGUF file; with "
                        "--eval, evaluated in llama.cpp too (the record's 'gguf')")
    p.add_argument("--threads", type=int, help="--gguf --eval: llama.cpp threads")
    p.add_argument("--eval", action="store_true",
                   help="measure perplexity and KL against the unquantized model")
    add_eval_args(p)
    p.set_defaults(func=run)


def run(args) -> dict:
    from edgellm.data import load_text
    from edgellm.quant.apply import check_options, quantize_record
    from edgellm.quant.qtensor import QuantError

    opts = dict(a_bits=args.a_bits, a_format=args.a_format, a_static=args.a_static,
                alpha=args.alpha, kv_bits=args.kv_bits, threshold=args.threshold,
                lorc_rank=args.lorc_rank, act_order=args.act_order, damp=args.damp,
                group_params=args.group_params)
    # every bad name or value fails here, before the model is loaded
    check_options(args.method, bpw_budget=args.bpw_budget, qtype=args.type, bits=args.bits,
                  keep_salient=args.keep_salient, salient_by=args.salient_by, **opts)
    check_model_name(args.model)
    check_eval_args(args)
    if args.lorc_rank:  # an impossible rank fails before the load, naming the layer
        from edgellm.cli.lowrank import _config_shapes
        from edgellm.lowrank.apply import check_lorc_rank

        check_lorc_rank(args.lorc_rank, _config_shapes(args.model))
        if args.out:
            raise QuantError("--out saves the packed codes and scales only, not LoRC's "
                             "factors; drop --out or --lorc-rank")
    load_text(args.calib, "train")
    device = args.device
    if args.method == "gguf" or args.gguf:  # gguf.quants packs numpy arrays; llama.cpp: its CPU
        check_cpu_only(device, "--method gguf / --gguf (llama.cpp's blocks, packed by numpy)")
        device = "cpu"
    if args.out:
        check_out_dir(args.out, "--out")
    if args.save_clips:
        check_out_file(args.save_clips, "--save-clips")
        if args.method != "lwc":
            raise QuantError("--save-clips only applies to --method lwc (the learned clipping "
                             "values)")
    record = quantize_record
    if args.gguf:
        from functools import partial

        from edgellm.cli.common import check_llamacpp_protocol
        from edgellm.deploy.apply import quantize_record_gguf
        from edgellm.deploy.gguf_blocks import check_block_settings

        check_out_file(args.gguf, "--gguf")
        check_block_settings(args.method, bits=args.bits, group_size=args.group_size,
                             sym=args.sym, a_bits=args.a_bits, kv_bits=args.kv_bits)
        if args.threads is not None and args.threads < 1:
            raise QuantError(f"--threads {args.threads}: give a positive number")
        if args.eval:
            check_llamacpp_protocol(args.protocol)
        record = partial(quantize_record_gguf, args.gguf, threads=args.threads)
    return record(
        args.model, method=args.method, bits=args.bits, group_size=args.group_size,
        sym=args.sym, qtype=args.type, bpw_budget=args.bpw_budget, calib=args.calib,
        n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, evaluate=args.eval,
        eval_settings=eval_settings(args), out=args.out, save_clips=args.save_clips,
        keep_salient=args.keep_salient, salient_by=args.salient_by, progress=not args.json,
        device=device, **opts)
