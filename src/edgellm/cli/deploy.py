"""``edgellm export``: a model, a LoRA adapter, or the adapter merged into the model, to GGUF (or
the model to ONNX with its KV cache, or to an ExecuTorch XNNPACK program);
``edgellm bench-runtime``: load time, time to first token, prefill and decode speed of one runtime
on one prompt, against the decode bound;
``edgellm roofline``: the machine's read bandwidth and peak matmul throughput, and the decode
bound they put on a GGUF file.

::

    edgellm export --format gguf --type F32 --out build/smollm2-f32.gguf --json
    edgellm export --adapter adapters/funccall --format gguf --out build/funccall-lora.gguf
    edgellm export --adapter adapters/funccall --merge --type Q8_0 --out build/merged-q8.gguf
    edgellm bench-runtime --runtime llamacpp --model build/smollm2-f32.gguf --threads 1 --json
    edgellm bench-runtime --runtime torch --threads 2 --prompt-tokens 128 --gen-tokens 128 --json
    edgellm export --from-quantized build/gptq-w4g32 --format gguf --out build/gptq-q4_0.gguf
    edgellm export --format onnx --type int8-keep-down --out build/m-int8.onnx --eval --json
    edgellm export --format executorch --type 8da4w --out build/m-8da4w.pte --json
    edgellm bench-runtime --runtime onnxruntime --model build/m-int8.onnx --threads 2 --json
    edgellm ppl --runtime executorch --model build/m-8da4w.pte --max-tokens 8192 --json
    edgellm roofline --threads 1 --json
    edgellm roofline --threads 2 --model build/smollm2-f32.gguf --position 128 --json

llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, from the
llama-cpp-python source distribution) write ``F32``, ``F16``, ``BF16`` or ``Q8_0``; the token
embedding and the norms stay F32.  An adapter alone becomes a GGUF LoRA that llama.cpp applies at
run time on the base model's GGUF (``llama-cli --lora``; llama-cpp-python's ``lora_path``).
Keys: ``type``, ``size_bytes``, ``bpw`` (of the decoder blocks' tensors, from the file),
``tensor_types`` (every tensor's stored type, read back from the file).
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import (
    add_device_arg,
    add_eval_args,
    add_json_arg,
    add_model_arg,
    check_in_dir,
    check_model_name,
    check_out_file,
)


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a model or a LoRA adapter as a GGUF file (or a model "
                                      "as ONNX or an ExecuTorch program)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, cpu_only="export (llama.cpp's converter, ONNX and ExecuTorch lowering)")
    p.add_argument("--adapter", help="an adapter folder (edgellm finetune --out, or peft's)")
    p.add_argument("--merge", action="store_true",
                   help="with --adapter: merge it into the model and export the merged model")
    p.add_argument("--format", default="gguf", choices=["gguf", "onnx", "executorch"],
                   help="gguf: llama.cpp; onnx: ONNX Runtime (the graph with its KV cache, weights "
                        "in FILE.data beside it); executorch: an XNNPACK .pte program")
    p.add_argument("--type",
                   help="gguf (default F32): F32, F16, BF16, Q8_0 (the converter) or one of "
                        "llama.cpp's types made by llama-quantize: Q6_K, Q5_K_M, Q5_1, Q5_0, "
                        "Q4_K_M, Q4_K_S, Q4_1, Q4_0, IQ4_NL, IQ4_XS, Q3_K_M, Q3_K_S, IQ3_XXS, Q2_K, "
                        "IQ2_XS, IQ2_XXS; onnx (default fp32): fp32, int8, int8-keep-down; "
                        "executorch (default fp32): fp32, 8da4w")
    p.add_argument("--max-len", type=int, default=512,
                   help="executorch: positions of the program's static KV cache")
    imat = p.add_mutually_exclusive_group()
    imat.add_argument("--imatrix", metavar="FILE", help="an importance matrix from llama-imatrix")
    imat.add_argument("--calib", help="compute the importance matrix with llama-imatrix on this "
                                      "corpus's train split (cached)")
    p.add_argument("--n-samples", type=int, default=128,
                   help="--calib: windows of 512 tokens the importance matrix averages over")
    p.add_argument("--token-embedding-type",
                   help="the tied token embedding's type instead of llama.cpp's choice "
                        "(e.g. Q8_0, the default model's source type)")
    p.add_argument("--from-quantized", metavar="DIR",
                   help="a folder of `edgellm quantize --out` (4-bit g32 sym/asym, 8-bit g32 sym): "
                        "its codes and scales written into Q4_0 / Q4_1 / Q8_0 blocks bit for bit")
    p.add_argument("--out", required=True, help="the GGUF file to write")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the file in llama.cpp against the model in PyTorch (PPL, paired "
                        "ΔNLL, KL, top-1; a --from-quantized file also against its simulation)")
    p.add_argument("--threads", type=int, help="the runtime's threads for --eval (default: llama.cpp "
                                               "all cores, the others 1)")
    add_eval_args(p)
    p.set_defaults(func=run_export)

    p = sub.add_parser("bench-runtime", help="time one prompt and one greedy generation in a runtime",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", required=True,
                   choices=["llamacpp", "torch", "bnb", "torchao", "onnxruntime", "executorch"],
                   help="torch: eager fp32; bnb: bitsandbytes NF4 with double quantization; "
                        "torchao: int8 weight-only (lesson 05's formats, the same protocol); "
                        "llamacpp / onnxruntime / executorch run a file of edgellm export")
    p.add_argument("--model", help="a .gguf / .onnx / .pte file (llamacpp / onnxruntime / "
                                   "executorch) or a model name or folder (torch, bnb, torchao)")
    add_device_arg(p, cpu_only="bench-runtime (this CPU's timings)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    add_json_arg(p)
    p.set_defaults(func=run_bench_runtime)

    p = sub.add_parser("roofline", help="measure read bandwidth and peak matmul throughput",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's current count)")
    p.add_argument("--size-mib", type=int, default=512,
                   help="array size for the bandwidth tests (far above the last-level cache)")
    p.add_argument("--model", help="a GGUF file: add its bytes per decoded token and the bound")
    add_device_arg(p, cpu_only="roofline (this CPU's bandwidth and matmul peak)")
    p.add_argument("--position", type=int, default=0,
                   help="with --model: the KV-cache position the token is decoded at")
    add_json_arg(p)
    p.set_defaults(func=run_roofline)


def run_export(args) -> dict:
    from edgellm.cli.common import (
        UsageError,
        check_eval_args,
        check_in_file,
        check_llamacpp_protocol,
    )
    from edgellm.deploy.apply import export
    from edgellm.deploy.export import check_type
    from edgellm.errors import EdgeLLMError

    check_model_name(args.model)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give a positive number")
    if args.format != "gguf":
        return _export_runtime(args)
    args.type = args.type or "F32"
    evaluate = None
    if args.eval:
        check_eval_args(args)
        evaluate = dict(data=args.data, split=args.split, protocol=args.protocol, ctx=args.ctx,
                        max_tokens=args.max_tokens, chunks=args.chunks, threads=args.threads,
                        batch_size=args.eval_batch_size, progress=not args.json)
        check_llamacpp_protocol(args.protocol)
    if args.from_quantized:
        if args.adapter:
            raise EdgeLLMError("--from-quantized exports a quantized model; drop --adapter")
        check_in_dir(args.from_quantized, "--from-quantized", what="a quantized model "
                     "(edgellm quantize --out)")
        check_out_file(args.out, "--out")
        return export(out=args.out, from_quantized=args.from_quantized, evaluate=evaluate,
                      threads=args.threads, progress=not args.json)
    if args.merge and not args.adapter:
        raise EdgeLLMError("--merge merges an adapter: give --adapter DIR too")
    if args.n_samples < 1:
        raise UsageError(f"--n-samples {args.n_samples}: give a positive number")
    if args.imatrix:
        check_in_file(args.imatrix, "importance matrix", suffix=None)
    qtype = check_type(args.type, adapter=bool(args.adapter) and not args.merge,
                       imatrix=args.imatrix or args.calib)
    if args.calib:
        from edgellm.data import load_text

        load_text(args.calib, "train")
    if args.token_embedding_type:
        from edgellm.deploy.llamacpp_quant import check_tensor_type

        check_tensor_type(args.token_embedding_type)
    from edgellm.deploy.export import CONVERTER_TYPES

    if (args.imatrix or args.calib or args.token_embedding_type) and qtype in CONVERTER_TYPES:
        raise UsageError(f"--imatrix, --calib and --token-embedding-type apply to llama-quantize's "
                         f"types; --type {qtype} is written by the converter")
    if args.adapter:
        check_in_dir(args.adapter, "--adapter", what="an adapter (edgellm finetune --out)")
        from edgellm.lora.apply import read_adapter_meta

        read_adapter_meta(args.adapter)
    check_out_file(args.out, "--out")
    return export(args.model, out=args.out, adapter=args.adapter, merge=args.merge,
                  qtype=qtype, imatrix=args.imatrix, imatrix_calib=args.calib,
                  imatrix_chunks=args.n_samples, threads=args.threads,
                  token_embedding_type=args.token_embedding_type, evaluate=evaluate,
                  progress=not args.json)


def _export_runtime(args) -> dict:
    """``edgellm export --format onnx|executorch``: the model only (no adapter, no llama.cpp
    options)."""
    from edgellm.cli.common import UsageError, check_eval_args, check_llamacpp_protocol
    from edgellm.deploy.apply import export_runtime

    for flag, used in (("--adapter", args.adapter), ("--merge", args.merge),
                       ("--from-quantized", args.from_quantized), ("--imatrix", args.imatrix),
                       ("--calib", args.calib),
                       ("--token-embedding-type", args.token_embedding_type)):
        if used:
            raise UsageError(f"{flag} applies to --format gguf; --format {args.format} exports "
                             "the model itself (merge an adapter or quantize into a model folder "
                             "first)")
    qtype = (args.type or "fp32").lower()
    if args.format == "onnx":
        from edgellm.deploy.onnx_runtime import check_onnx_type

        check_onnx_type("fp32" if qtype == "f32" else qtype)
        suffix = ".onnx"
    else:
        from edgellm.deploy.executorch_runtime import check_pte_type

        check_pte_type("fp32" if qtype == "f32" else qtype)
        suffix = ".pte"
        if args.max_len < 2:
            raise UsageError(f"--max-len {args.max_len}: give at least 2")
    if not str(args.out).endswith(suffix):
        raise UsageError(f"--out {args.out}: --format {args.format} writes a {suffix} file")
    check_out_file(args.out, "--out")
    evaluate = None
    if args.eval:
        check_eval_args(args)
        check_llamacpp_protocol(args.protocol)
        if args.format == "executorch" and args.ctx > args.max_len:
            raise UsageError(f"--ctx {args.ctx} exceeds --max-len {args.max_len}: the program's "
                             "cache holds --max-len positions")
        evaluate = dict(data=args.data, split=args.split, protocol=args.protocol, ctx=args.ctx,
                        max_tokens=args.max_tokens, chunks=args.chunks,
                        batch_size=args.eval_batch_size, progress=not args.json)
    return export_runtime(args.model, out=args.out, fmt=args.format,
                          qtype="fp32" if qtype == "f32" else qtype, max_len=args.max_len,
                          evaluate=evaluate, threads=args.threads or 1, progress=not args.json)


def run_roofline(args) -> dict:
    from edgellm.cli.common import UsageError, check_in_file
    from edgellm.deploy.apply import roofline

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give a positive number")
    if args.size_mib < 16:
        raise UsageError(f"--size-mib {args.size_mib}: give at least 16 (the arrays must not fit "
                         "in the cache)")
    if args.position < 0:
        raise UsageError(f"--position {args.position}: give 0 or more")
    if args.model:
        from edgellm.deploy.export import check_gguf

        check_in_file(args.model, "GGUF file", suffix=".gguf")
        check_gguf(args.model)
    return roofline(threads=args.threads, size_mib=args.size_mib, model=args.model,
                    position=args.position)


def run_bench_runtime(args) -> dict:
    from edgellm.cli.common import RUNTIME_FILES, UsageError, check_runtime_file
    from edgellm.deploy.apply import bench_runtime

    for flag, v in (("--threads", args.threads), ("--prompt-tokens", args.prompt_tokens),
                    ("--repeats", args.repeats)):
        if v < 1:
            raise UsageError(f"{flag} {v}: give a positive number")
    if args.gen_tokens < 2:
        raise UsageError(f"--gen-tokens {args.gen_tokens}: give at least 2 (decode is timed "
                         "from the first generated token to the last)")
    if args.runtime in RUNTIME_FILES:
        check_runtime_file(args.runtime, args.model)
    elif args.model:
        check_model_name(args.model)
    return bench_runtime(args.runtime, args.model, threads=args.threads,
                         prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                         repeats=args.repeats)
