"""``edgellm quantize``: quantize the default model's linears, measure size, perplexity and KL.

::

    edgellm quantize --method rtn --bits 4 --group-size 64 --eval --max-tokens 4096 --json
    edgellm quantize --method gguf --type Q4_0 --eval --json
    edgellm quantize --method gptq --bits 3 --calib pydoc --n-samples 128 --seq-len 512 --eval

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

METHODS = ("rtn", "gptq", "awq", "imatrix", "gguf")
CALIBRATED = {"gptq": "apply_gptq", "awq": "apply_awq", "imatrix": "apply_imatrix"}


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


def _call(fn, model, calib, **kwargs):
    """Call an apply_* function with the keyword arguments it accepts."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(model, calib, **kwargs) if calib is not None else fn(model, **kwargs)


def quantize_model(model, tok=None, *, method: str = "rtn", bits: int = 4,
                   group_size: int | None = 64, sym: bool = False, qtype: str = "Q4_0",
                   bpw_budget: float | None = None, calib: str = "pydoc", n_samples: int = 128,
                   seq_len: int = 512, seed: int = 0, progress: bool = False):
    """Quantize ``model`` in place by method name; return ``(qtensors, info)``.

    The library entry point behind ``edgellm quantize`` (notebooks call it too).
    """
    import torch

    from .qtensor import QuantError
    from .rtn import check_bits

    if method not in METHODS:
        raise QuantError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    info = {"method": method, "bits": bits, "group_size": group_size, "sym": sym}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if method == "gguf":
        from .gguf_formats import TYPE_BITS, apply_gguf

        qtype = qtype.upper()
        qts = apply_gguf(model, qtype, progress=progress)
        info.update(type=qtype, bits=TYPE_BITS.get(qtype), sym=None,
                    group_size=None if qtype == "F16" else 32)
    else:
        check_bits(bits)
        ids = None
        if method in CALIBRATED or bpw_budget is not None:
            from ..data import get_calibration

            ids = get_calibration(calib, n_samples, seq_len, seed, tokenizer=tok)
            info.update(calib=calib, n_samples=n_samples, seq_len=seq_len)
        common = dict(bits=bits, group_size=group_size, sym=sym, progress=progress)
        extra: dict = {}  # what a method reports about itself (mixed: the bits per layer)
        if bpw_budget is not None:
            fn = _import_method("mixed", "apply_mixed")
            qts = _call(fn, model, ids, bpw_budget=bpw_budget, method=method, info=extra,
                        **common)
            info["bpw_budget"] = bpw_budget
        elif method == "rtn":
            from .rtn import apply_rtn

            qts = apply_rtn(model, **common)
        else:
            qts = _call(_import_method(method, CALIBRATED[method]), model, ids, info=extra,
                        **common)
        if extra:
            info["method_info"] = extra
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
    r = token_logprobs(model, tokens, protocol, ctx, chunks=chunks, bos_id=bos,
                       batch_size=batch_size, progress=progress, reference=reference)
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
            "chunks": chunks, "seconds_eval": time.perf_counter() - t0}


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

    model, tok = load_model(args.model, quiet=args.json)
    qts, info = quantize_model(
        model, tok, method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
        qtype=args.type, bpw_budget=args.bpw_budget, calib=args.calib, n_samples=args.n_samples,
        seq_len=args.seq_len, seed=args.seed, progress=not args.json)
    rec = {**info, **model_size(model, qts)}
    rec.update(ppl=None, ppl_base=None, kl_mean=None)
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
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=args.seed, model=args.model)
