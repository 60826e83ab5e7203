"""``edgellm info``, ``fetch``, ``ppl`` and ``kl``: the environment, the cache and the yardsticks."""

from __future__ import annotations

import time

from edgellm.cli.common import (
    DEFAULT_MODEL,
    add_device_arg,
    add_eval_args,
    add_json_arg,
    add_model_arg,
    check_eval_args,
    check_model_name,
)


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="versions, threads, cache location, default model status")
    add_json_arg(p)
    p.set_defaults(func=info)

    p = sub.add_parser("fetch", help=f"download and cache a registry model (the default: "
                                     f"{DEFAULT_MODEL})")
    p.add_argument("--model", default=DEFAULT_MODEL)
    add_json_arg(p)
    p.set_defaults(func=fetch)

    p = sub.add_parser("ppl", help="perplexity of a model on a corpus under a named protocol")
    add_model_arg(p)
    p.add_argument("--stride", type=int, help="sliding protocol: step between windows (ctx/2)")
    _add_runtime_args(p)
    add_eval_args(p)
    p.set_defaults(func=ppl)

    p = sub.add_parser("kl", help="token-level KL divergence of a model against a reference")
    p.add_argument("--model", required=True, help="the model to compare")
    p.add_argument("--reference", default=DEFAULT_MODEL)
    add_device_arg(p)
    p.add_argument("--stride", type=int, help="sliding protocol: step between windows (ctx/2)")
    _add_runtime_args(p)
    add_eval_args(p)
    p.set_defaults(func=kl)


def _add_runtime_args(p) -> None:
    p.add_argument("--device-map", choices=["auto"],
                   help="auto: accelerate spreads a model larger than memory over the GPUs, "
                        "the CPU and disk (instead of --device)")
    p.add_argument("--runtime", default="torch",
                   choices=["torch", "llamacpp", "onnxruntime", "executorch"],
                   help="llamacpp / onnxruntime / executorch: --model is a .gguf / .onnx / .pte "
                        "file (edgellm export) evaluated by that runtime itself, same tokens, "
                        "protocols and keys")
    p.add_argument("--threads", type=int, default=1,
                   help="the runtime's threads (with --runtime other than torch)")


def _load(args, name: str, quiet: bool):
    """The model to evaluate: a PyTorch model, or with ``--runtime`` an exported file run by
    its runtime (the tokenizer then comes from the default model)."""
    if args.runtime == "torch":
        return load_any(name, quiet=quiet, device=args.device, device_map=args.device_map)
    from edgellm.deploy.apply import runtime_model

    return runtime_model(args.runtime, name, ctx=args.ctx, threads=args.threads)


def load_any(name: str, *, quiet: bool = False, device: str | None = None,
             device_map: str | None = None):
    """``load_model``, or for a folder of ``edgellm quantize --out`` its simulated model
    (``load_quantized``) with the default model's tokenizer when none was saved; on ``device``
    (default ``EDGELLM_DEVICE``, else cpu) or spread by accelerate (``device_map="auto"``)."""
    from pathlib import Path

    from edgellm.devices import check_device, default_device
    from edgellm.models import load_model, load_tokenizer

    path = Path(name).expanduser()
    if path.is_dir() and (path / "quant_config.json").is_file():
        from edgellm.quant.save import load_quantized

        model, tok, _ = load_quantized(path)
        model = model.to(check_device(device or default_device()))
        return model, tok or load_tokenizer(DEFAULT_MODEL, quiet=True)
    return load_model(name, quiet=quiet, device=device, device_map=device_map)


def _check_runtime(args) -> None:
    from edgellm.cli.common import (
        UsageError,
        check_cpu_only,
        check_llamacpp_protocol,
        check_runtime_file,
    )

    if args.device_map and (args.device or args.runtime != "torch"):
        raise UsageError("--device-map auto places a PyTorch model itself: drop --device "
                         "and --runtime")
    if args.runtime != "torch":
        check_cpu_only(args.device, f"--runtime {args.runtime}")
        check_runtime_file(args.runtime, args.model)
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: give a positive number")
        check_llamacpp_protocol(args.protocol)
    else:
        check_model_name(args.model)


def info(args) -> dict:
    import torch

    from edgellm.devices import default_device
    from edgellm.models import REGISTRY, verify_manifest
    from edgellm.paths import cache_dir
    from edgellm.records import versions

    folder = cache_dir() / "models" / DEFAULT_MODEL
    status = "not cached (run: edgellm fetch)"
    if folder.is_dir():
        problem = verify_manifest(folder)
        status = "cached and verified" if problem is None else f"cache damaged: {problem}"
    return {"versions": versions(), "threads": torch.get_num_threads(),
            "device_default": default_device(),
            "cuda_available": torch.cuda.is_available(),
            "cache": str(cache_dir()), "default_model": DEFAULT_MODEL,
            "default_model_status": status, "models": sorted(REGISTRY)}


def fetch(args) -> dict:
    from edgellm.models import ensure_cached, registry_entry

    registry_entry(args.model)  # unknown name: a clear error before anything else
    t0 = time.perf_counter()
    folder = ensure_cached(args.model)
    return {"model": args.model, "cache": str(folder), "seconds": time.perf_counter() - t0}


def _eval_kwargs(args) -> dict:
    return dict(split=args.split, protocol=args.protocol, ctx=args.ctx, stride=args.stride,
                max_tokens=args.max_tokens, chunks=args.chunks, batch_size=args.eval_batch_size,
                progress=not args.json, model_name=args.model)


def ppl(args) -> dict:
    from edgellm.measure import peak_rss_bytes
    from edgellm.metrics import evaluate_ppl

    _check_runtime(args)
    check_eval_args(args)
    t0 = time.perf_counter()
    model, tok = _load(args, args.model, quiet=args.json)
    load_s = time.perf_counter() - t0
    rec = evaluate_ppl(model, tok, args.data, **_eval_kwargs(args))
    rec["runtime"] = args.runtime
    rec.update(seconds_load=load_s, peak_rss_bytes=peak_rss_bytes())
    return rec


def kl(args) -> dict:
    from edgellm.measure import peak_rss_bytes
    from edgellm.metrics import evaluate_kl

    _check_runtime(args)
    check_model_name(args.reference, "--reference")
    check_eval_args(args)
    t0 = time.perf_counter()
    model, tok = _load(args, args.model, quiet=args.json)
    load_s = time.perf_counter() - t0
    ref, _ = load_any(args.reference, quiet=args.json, device=args.device,
                      device_map=args.device_map)
    rec = evaluate_kl(model, ref, tok, args.data, reference_name=args.reference,
                      **_eval_kwargs(args))
    rec["runtime"] = args.runtime
    rec.update(seconds_load=load_s, peak_rss_bytes=peak_rss_bytes())
    return rec
