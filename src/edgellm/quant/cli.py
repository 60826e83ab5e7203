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

``--group-size 0`` (or ``channel``) quantizes per output channel.  With ``--eval`` a second,
unquantized copy of the model is loaded as the reference: the quantized and the reference model
score the same tokens, giving ``ppl``, ``ppl_base``, the paired ``delta_nll`` with its standard
error, ``kl_mean`` (KL(P_base ‖ P_quant) per token), and ``lossless`` (every quantized weight
equals the original: true for asymmetric 4-bit g32, this model's source format).  ``--out DIR`` saves the packed model
(:mod:`edgellm.quant.save`).  The tied embedding / lm_head is never quantized (reported apart).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import time

METHODS = ("rtn", "gptq", "awq", "imatrix", "gguf", "smoothquant", "llm_int8", "rotate", "lwc")
CALIBRATED = {"gptq": "apply_gptq", "awq": "apply_awq", "imatrix": "apply_imatrix",
              "lwc": "apply_lwc"}
A_FORMATS = ("int", "fp8")


def _group_size(text: str):
    if text.lower() in ("0", "channel", "none", "per-channel"):
        return None
    try:
        g = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--group-size {text!r}: give an integer (e.g. 32, 64) or 0 / 'channel'") from None
    if g < 0:
        raise argparse.ArgumentTypeError("--group-size must be positive, or 0 for per-channel")
    return g


def _threshold(text: str):
    if text.lower() in ("none", "inf", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--threshold {text!r}: give a magnitude (6.0), or 0 / inf for no decomposition"
        ) from None


def add_parser(subparsers, add_eval_args) -> None:
    p = subparsers.add_parser("quantize", help="weight-only post-training quantization of a model",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument("--bits", type=int, default=4, help="weight bits (2-8); ignored with gguf")
    p.add_argument("--group-size", type=_group_size, default=64,
                   help="weights per scale along the input dim; 0 or 'channel' = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric (no zero point); default asym")
    p.add_argument("--type", default="Q4_0", help="GGUF type with --method gguf "
                   "(F16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, MXFP4)")
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
    p.add_argument("--threshold", type=_threshold, default=6.0, help="LLM.int8 outlier "
                   "threshold; 0 or inf = absmax int8 without decomposition")
    p.add_argument("--kv-bits", type=int, help="KV-cache bits (default: not quantized)")
    p.add_argument("--save-clips", help="with --method lwc: write the learned clipping values to "
                   "this .safetensors file (lessons apply them without training)")
    p.add_argument("--calib", default="pydoc", help="calibration corpus (train split)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the quantized model (packed codes + scales) to this folder")
    p.add_argument("--eval", action="store_true",
                   help="measure perplexity and KL against the unquantized model")
    add_eval_args(p)
    p.set_defaults(func=run)


def _import_method(module: str, func: str):
    try:
        mod = importlib.import_module(f"edgellm.quant.{module}")
    except ModuleNotFoundError as e:
        from .qtensor import QuantError

        raise QuantError(f"method {module!r} is not available in this installation "
                         f"(edgellm.quant.{module} is missing: {e})") from None
    return getattr(mod, func)


def _jsonable(d: dict) -> dict:
    """The JSON-friendly part of a method's info dict (numbers, strings, lists; no tensors)."""
    ok = (int, float, str, bool, type(None))
    out = {}
    for k, v in d.items():
        if isinstance(v, ok):
            out[str(k)] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, ok) for x in v):
            out[str(k)] = list(v)
        elif isinstance(v, dict):
            sub = _jsonable(v)
            if sub:
                out[str(k)] = sub
    return out


def _call(fn, model, calib, **kwargs):
    """Call an apply_* function with the keyword arguments it accepts."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(model, calib, **kwargs) if calib is not None else fn(model, **kwargs)


def check_options(method: str = "rtn", *, a_bits: int | None = None, a_format: str = "int",
                  a_static: bool = False, alpha: float = 0.5, kv_bits: int | None = None,
                  threshold: float | None = 6.0, bpw_budget: float | None = None) -> None:
    """Reject bad combinations before any work (raises :class:`QuantError`)."""
    from .qtensor import QuantError

    if method not in METHODS:
        raise QuantError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if a_bits is not None:
        from .actquant import check_act

        check_act(a_bits, a_format)
        if method == "llm_int8":
            raise QuantError("llm_int8 quantizes its activations itself (int8 per token with "
                             "fp16 outlier columns); drop --a-bits / --a-format")
        if method == "gguf":
            raise QuantError("--a-bits is not available with --method gguf (llama.cpp formats "
                             "are weight-only here); use --method rtn")
    elif a_format != "int" or a_static:
        raise QuantError("--a-format / --a-static describe activation quantization; give "
                         "--a-bits too (e.g. --a-bits 8)")
    if method == "smoothquant":
        from .smoothquant import check_alpha

        check_alpha(alpha)
    if method == "llm_int8":
        from .llm_int8 import check_threshold

        check_threshold(threshold)
        if bpw_budget is not None:
            raise QuantError("llm_int8 stores every weight in int8; --bpw-budget does not apply")
    if kv_bits is not None and not (kv_bits == 16 or 2 <= kv_bits <= 8):
        raise QuantError(f"kv_bits={kv_bits} is not supported; the KV cache takes 2–8 bits "
                         "(or 16 = fp16)")


def quantize_model(model, tok=None, *, method: str = "rtn", bits: int = 4,
                   group_size: int | None = 64, sym: bool = False, qtype: str = "Q4_0",
                   bpw_budget: float | None = None, calib: str = "pydoc", n_samples: int = 128,
                   seq_len: int = 512, seed: int = 0, progress: bool = False,
                   a_bits: int | None = None, a_format: str = "int", a_static: bool = False,
                   alpha: float = 0.5, kv_bits: int | None = None,
                   threshold: float | None = 6.0):
    """Quantize ``model`` in place by method name; return ``(qtensors, info)``.

    The library entry point behind ``edgellm quantize`` (notebooks call it too).  Order:
    rotation / smoothing (function-preserving transforms), weight quantization, then the
    activation (``a_bits``) and KV-cache (``kv_bits``) quantizers wrap the layers.
    """
    import torch

    from .rtn import check_bits

    check_options(method, a_bits=a_bits, a_format=a_format, a_static=a_static, alpha=alpha,
                  kv_bits=kv_bits, threshold=threshold, bpw_budget=bpw_budget)
    info = {"method": method, "bits": bits, "group_size": group_size, "sym": sym,
            "a_bits": a_bits, "a_format": a_format if a_bits is not None else None,
            "a_static": a_static if a_bits is not None else None,
            "alpha": alpha if method == "smoothquant" else None, "kv_bits": kv_bits}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ids = None

    def calibration():
        nonlocal ids
        if ids is None:
            from ..data import get_calibration

            ids = get_calibration(calib, n_samples, seq_len, seed, tokenizer=tok)
            info.update(calib=calib, n_samples=n_samples, seq_len=seq_len)
        return ids

    if method == "gguf":
        from .gguf_formats import TYPE_BITS, apply_gguf

        qtype = qtype.upper()
        qts = apply_gguf(model, qtype, progress=progress)
        info.update(type=qtype, bits=TYPE_BITS.get(qtype), sym=None,
                    group_size=None if qtype == "F16" else 32)
    elif method == "llm_int8":
        from .llm_int8 import apply_llm_int8, check_threshold

        threshold = check_threshold(threshold)
        qts = apply_llm_int8(model, threshold)
        info.update(bits=8, group_size=None, sym=True, a_bits=8, a_format="int",
                    threshold=threshold)
    else:
        check_bits(bits)
        if method in CALIBRATED or bpw_budget is not None or method == "smoothquant":
            calibration()
        if method == "rotate":
            fn = _import_method("rotate", "apply_rotation")
            rot = fn(model, kind="hadamard", seed=seed)
            info["rotation"] = "hadamard"
            if isinstance(rot, dict):
                info["method_info"] = _jsonable(rot)
        if method == "smoothquant":
            from .smoothquant import apply_smoothquant

            sq = apply_smoothquant(model, ids, alpha, progress=progress)
            info["act_absmax_before"] = sq["act_absmax_before"]
            info["act_absmax_after"] = sq["act_absmax_after"]
        common = dict(bits=bits, group_size=group_size, sym=sym, progress=progress)
        extra: dict = {}  # what a method reports about itself (mixed: the bits per layer)
        if bpw_budget is not None:
            fn = _import_method("mixed", "apply_mixed")
            qts = _call(fn, model, ids, bpw_budget=bpw_budget, method=method, info=extra,
                        **common)
            info["bpw_budget"] = bpw_budget
        elif method in ("rtn", "smoothquant", "rotate"):
            from .rtn import apply_rtn

            qts = apply_rtn(model, **common)
        else:
            qts = _call(_import_method(method, CALIBRATED[method]), model, ids, info=extra,
                        seed=seed, **common)
        if extra:
            info["method_info"] = _jsonable(extra)
        if "clips" in extra:  # LWC's learned values (tensors): run() saves them with --save-clips
            info["clips"] = extra["clips"]
        if a_bits is not None:
            from .actquant import apply_act_quant

            aq = apply_act_quant(model, a_bits=a_bits, a_format=a_format,
                                 static=a_static, calib=calibration() if a_static else None)
            info["granularity"] = aq["granularity"]
    if kv_bits is not None:
        fn = _import_method("kv", "apply_kv_quant")
        kv = fn(model, bits=kv_bits)
        if isinstance(kv, dict):
            info["kv_info"] = _jsonable(kv)
    info["seconds_quantize"] = time.perf_counter() - t0
    info["n_layers"] = len(qts)
    return qts, info


def evaluate_quantized(model, reference, tok, *, data: str = "pydoc", split: str = "test",
                       protocol: str = "gptq", ctx: int = 512, max_tokens: int | None = None,
                       chunks: int | None = None, batch_size: int = 4,
                       progress: bool = False) -> dict:
    """Perplexity of ``model`` and ``reference`` on the same tokens, the paired ΔNLL with its
    standard error, and KL(P_reference ‖ P_model)."""
    import torch

    from ..data import get_tokens, load_text, sha256_text
    from ..metrics import mean_stderr, ppl_from_nll, token_logprobs

    tokens = get_tokens(data, tok, split, max_tokens)
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    t0 = time.perf_counter()
    # time the quantized model's own forward passes (the reference runs in the same loop)
    clock = {"start": 0.0, "seconds": 0.0}

    def pre(module, args, kwargs=None):
        clock["start"] = time.perf_counter()

    def post(module, args, output):
        clock["seconds"] += time.perf_counter() - clock["start"]

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        r = token_logprobs(model, tokens, protocol, ctx, chunks=chunks, bos_id=bos,
                           batch_size=batch_size, progress=progress, reference=reference)
    finally:
        for h in handles:
            h.remove()
    q, base = ppl_from_nll(r["nll"]), ppl_from_nll(r["nll_ref"])
    d_mean, d_se = mean_stderr(r["nll"] - r["nll_ref"])
    kl_mean, kl_se = mean_stderr(r["kl"])
    return {"ppl": q["ppl"], "ppl_stderr": q["ppl_stderr"], "nll": q["nll"],
            "ppl_base": base["ppl"], "ppl_base_stderr": base["ppl_stderr"],
            "delta_ppl": q["ppl"] - base["ppl"], "delta_nll": d_mean, "delta_nll_stderr": d_se,
            "kl_mean": kl_mean, "kl_stderr": kl_se,
            "kl_p99": float(torch.quantile(r["kl"].float(), 0.99)),
            "top1_agreement": r["top1"].mean().item(), "n_tokens": r["nll"].numel(),
            "protocol": protocol, "ctx": ctx, "data": data, "split": split,
            "data_sha256": sha256_text(load_text(data, split)), "max_tokens": max_tokens,
            "chunks": chunks, "seconds_eval": time.perf_counter() - t0,
            "seconds_model": clock["seconds"],
            "tokens_per_s": r["n_fed"] / clock["seconds"] if clock["seconds"] else None}


def max_weight_change(model, reference) -> float:
    """Largest |W_quantized - W_reference| over the decoder linears (0.0: nothing changed)."""
    from ..models import linear_layers

    ref = linear_layers(reference)
    return max((lin.weight - ref[name].weight).abs().max().item()
               for name, lin in linear_layers(model).items())


def run(args) -> dict:
    import os

    from ..metrics import peak_rss_bytes
    from ..models import load_model
    from ..records import record
    from .size import model_size

    opts = dict(a_bits=args.a_bits, a_format=args.a_format, a_static=args.a_static,
                alpha=args.alpha, kv_bits=args.kv_bits, threshold=args.threshold)
    check_options(args.method, bpw_budget=args.bpw_budget, **opts)  # fail before loading
    if args.save_clips and args.method != "lwc":
        from .qtensor import QuantError

        raise QuantError("--save-clips only applies to --method lwc (the learned clipping values)")
    model, tok = load_model(args.model, quiet=args.json)
    qts, info = quantize_model(
        model, tok, method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
        qtype=args.type, bpw_budget=args.bpw_budget, calib=args.calib, n_samples=args.n_samples,
        seq_len=args.seq_len, seed=args.seed, progress=not args.json, **opts)
    clips = info.pop("clips", None)
    if args.save_clips:
        from .lwc import save_clips

        save_clips(clips, args.save_clips, metadata={"bits": args.bits, "seed": args.seed,
                                                     "group_size": args.group_size,
                                                     "command": "edgellm quantize --method lwc"})
        info["clips_file"] = str(args.save_clips)
    rec = {**info, **model_size(model, qts)}
    rec.update(memory_bytes=rec["size_bytes"], ppl=None, ppl_base=None, kl_mean=None,
               tokens_per_s=None)
    if args.out:
        from .save import WEIGHTS, save_quantized

        folder = save_quantized(model, qts, args.out, tok, meta={"method": args.method, **info})
        rec.update(out=str(args.out), file_bytes=os.path.getsize(folder / WEIGHTS))
    if args.eval:
        reference, _ = load_model(args.model, quiet=True)
        change = max_weight_change(model, reference)
        rec.update(max_abs_weight_change=change, lossless=change == 0.0)
        rec.update(evaluate_quantized(
            model, reference, tok, data=args.data, split=args.split, protocol=args.protocol,
            ctx=args.ctx, max_tokens=args.max_tokens, chunks=args.chunks,
            batch_size=args.batch_size, progress=not args.json))
        if args.method == "llm_int8":
            from .llm_int8 import llm_int8_report

            rec.update(llm_int8_report(model))
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=args.seed, model=args.model)
