"""``quantize_model``: the library entry point of weight / activation / KV-cache quantization.

One call quantizes a model in place by method name (``rtn``, ``gptq``, ``awq``, ``imatrix``,
``gguf``, ``smoothquant``, ``llm_int8``, ``rotate``, ``lwc``), optionally with mixed precision
(``bpw_budget``), activation quantization (``a_bits``) and a quantized KV cache (``kv_bits``).
:func:`quantize_record` loads, quantizes, saves and evaluates: the record ``edgellm quantize``
(:mod:`edgellm.cli.quantize`, which only parses and checks flags) prints;
:func:`production_record` does the same for the production libraries (``edgellm bnb`` /
``edgellm torchao``).  Notebooks call :func:`quantize_model` directly.

Over 400 lines because it is the one explicit dispatch of every method and option (weights,
activations, KV cache, LoRC, the production libraries): each branch is a few lines calling its
own module, and splitting them would scatter the order of the steps across files.
"""

from __future__ import annotations

import time

from edgellm.metrics import EvalSettings
from edgellm.models import DEFAULT_MODEL
from edgellm.quant.result import QuantResult

METHODS = ("rtn", "gptq", "awq", "imatrix", "gguf", "smoothquant", "llm_int8", "rotate", "lwc")
CALIBRATED = ("gptq", "awq", "imatrix", "lwc")  # weight quantizers that need calibration inputs
A_FORMATS = ("int", "fp8")
# LoRC fits W − Q with W the weights the quantizer was given: every method whose model holds
# fake-quantized weights of its own input (AWQ rescales weights and norms inside its search;
# llm_int8 keeps int8 codes and quantizes at run time)
GROUP_PARAMS = ("current", "block_start")  # GPTQ: where a group's scale comes from
LORC_METHODS = ("rtn", "gptq", "imatrix", "gguf", "smoothquant", "rotate", "lwc")
DECODE_PROMPT_TOKENS = 32  # untimed prompt before the timed decode steps


def check_options(method: str = "rtn", *, a_bits: int | None = None, a_format: str = "int",
                  a_static: bool = False, alpha: float = 0.5, kv_bits: int | None = None,
                  threshold: float | None = 6.0, bpw_budget: float | None = None,
                  qtype: str = "Q4_0", bits: int = 4, keep_salient: float | None = None,
                  salient_by: str = "act", lorc_rank: int = 0, act_order: bool = False,
                  damp: float = 0.01, group_params: str = "current") -> None:
    """Reject bad combinations before any work (raises :class:`QuantError`; a bad LoRC rank
    :class:`edgellm.lowrank.svd.LowRankError`)."""
    from edgellm.quant.qtensor import QuantError
    from edgellm.quant.rtn import check_bits
    from edgellm.quant.salient import check_salient

    check_salient(keep_salient, salient_by)
    if keep_salient is not None and (method != "rtn" or bpw_budget is not None):
        raise QuantError("--keep-salient is AWQ's motivation experiment on plain RTN; use it "
                         "with --method rtn and without --bpw-budget")

    if method not in METHODS:
        raise QuantError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    check_gptq_options(method, act_order=act_order, damp=damp, group_params=group_params,
                       bpw_budget=bpw_budget)
    if method not in ("gguf", "llm_int8"):  # these two fix their own bits
        check_bits(bits)
    if method == "gguf":
        from edgellm.quant.gguf_formats import GGUF_TYPES

        if qtype.upper() not in GGUF_TYPES:
            raise QuantError(f"unknown GGUF type {qtype!r} for --method gguf; use one of "
                             f"{', '.join(GGUF_TYPES)}")
    if a_bits is not None:
        from edgellm.quant.actquant import check_act

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
        from edgellm.quant.smoothquant import check_alpha

        check_alpha(alpha)
    if method == "llm_int8":
        from edgellm.quant.llm_int8 import check_threshold

        check_threshold(threshold)
        if bpw_budget is not None:
            raise QuantError("llm_int8 stores every weight in int8; --bpw-budget does not apply")
    if lorc_rank:
        from edgellm.lowrank.apply import check_lorc_rank

        check_lorc_rank(lorc_rank)
        if method not in LORC_METHODS:
            why = ("stores int8 codes and quantizes at run time: there are no fake-quantized "
                   "weights to correct" if method == "llm_int8" else
                   "rescales the weights and the norms inside its search, so W − Q is not "
                   "defined against the weights it was given")
            raise QuantError(f"--lorc-rank does not apply to --method {method}: it {why}; use "
                             f"one of {', '.join(LORC_METHODS)}")
    if kv_bits is not None and not (kv_bits == 16 or 2 <= kv_bits <= 8):
        raise QuantError(f"kv_bits={kv_bits} is not supported; the KV cache takes 2–8 bits "
                         "(or 16 = fp16)")


def check_gptq_options(method: str, *, act_order: bool = False, damp: float = 0.01,
                       group_params: str = "current", bpw_budget: float | None = None) -> None:
    """GPTQ's own settings (``--act-order``, ``--damp``, ``--group-params``) apply to
    ``--method gptq`` only, without ``--bpw-budget``."""
    from edgellm.quant.qtensor import QuantError

    if not 0 < damp < 1:
        raise QuantError(f"damp={damp}: GPTQ's damping is a fraction of the mean diagonal of H; "
                         "use a value in (0, 1), e.g. 0.01 (the papers') or 0.1")
    if group_params not in GROUP_PARAMS:
        raise QuantError(f"group_params={group_params!r}; use one of {', '.join(GROUP_PARAMS)}")
    if (act_order, damp, group_params) != (False, 0.01, "current") and (
            method != "gptq" or bpw_budget is not None):
        raise QuantError("--act-order, --damp and --group-params are GPTQ's settings: use them "
                         "with --method gptq and without --bpw-budget")


def quantize_weights(model, calib, *, method: str = "rtn", bits: int = 4,
                     group_size: int | None = 64, sym: bool = False,
                     bpw_budget: float | None = None, act_order: bool = False,
                     damp: float = 0.01, group_params: str = "current",
                     progress: bool = False) -> QuantResult:
    """Quantize the decoder's linear weights by method name (explicit dispatch); a
    :class:`QuantResult`.  ``calib`` (n_samples, seq_len) token ids for the calibrated
    methods and for a ``bpw_budget`` (mixed precision with RTN or GPTQ); ``None`` otherwise.
    ``smoothquant`` and ``rotate`` weights are quantized by RTN after their transform.
    ``act_order``, ``damp`` and ``group_params`` are GPTQ's (:func:`edgellm.quant.gptq.gptq_quantize`)."""
    from edgellm.quant.qtensor import QuantError

    common = dict(bits=bits, group_size=group_size, sym=sym, progress=progress)
    if bpw_budget is not None:
        from edgellm.quant.mixed import apply_mixed

        return apply_mixed(model, calib, bpw_budget=bpw_budget, method=method,
                           group_size=group_size, sym=sym, progress=progress)
    if method in ("rtn", "smoothquant", "rotate"):
        from edgellm.quant.rtn import apply_rtn

        return apply_rtn(model, **common)
    if method == "gptq":
        from edgellm.quant.gptq import apply_gptq

        return apply_gptq(model, calib, act_order=act_order, damp=damp,
                          group_params=group_params, **common)
    if method == "awq":
        from edgellm.quant.awq import apply_awq

        return apply_awq(model, calib, **common)
    if method == "imatrix":
        from edgellm.quant.imatrix import apply_imatrix

        return apply_imatrix(model, calib, **common)
    if method == "lwc":
        from edgellm.quant.lwc import apply_lwc

        return apply_lwc(model, calib, **common)
    raise QuantError(f"unknown weight quantization method {method!r}; use one of "
                     f"rtn, smoothquant, rotate, {', '.join(CALIBRATED)}")


def quantize_model(model, tok=None, *, method: str = "rtn", bits: int = 4,
                   group_size: int | None = 64, sym: bool = False, qtype: str = "Q4_0",
                   bpw_budget: float | None = None, calib: str = "pydoc", n_samples: int = 128,
                   seq_len: int = 512, seed: int = 0, progress: bool = False,
                   a_bits: int | None = None, a_format: str = "int", a_static: bool = False,
                   alpha: float = 0.5, kv_bits: int | None = None,
                   threshold: float | None = 6.0, keep_salient: float | None = None,
                   salient_by: str = "act", lorc_rank: int = 0, act_order: bool = False,
                   damp: float = 0.01, group_params: str = "current") -> QuantResult:
    """Quantize ``model`` in place by method name; return a :class:`QuantResult`.

    ``keep_salient`` (a fraction, e.g. 0.01) restores that share of each linear's input
    channels to full precision after RTN, chosen ``salient_by`` activation magnitude, weight
    magnitude or at random (AWQ's motivation experiment, :mod:`edgellm.quant.salient`).

    The library entry point behind ``edgellm quantize`` (notebooks call it too).  Order:
    rotation / smoothing (function-preserving transforms), weight quantization, then the
    activation (``a_bits``) and KV-cache (``kv_bits``) quantizers wrap the layers.  The
    result's ``info`` is the JSON-ready record of the run (``method``, ``bits``, …,
    ``method_info`` for what a method reports about itself, ``seconds_quantize``); LWC's
    learned clipping strengths are its ``clips``.

    ``lorc_rank`` K > 0 adds LoRC (ZeroQuant-V2) after the weight quantizer: each quantized
    linear then holds ``Q + U Vᵀ``, the rank-K SVD of its error ``W − Q`` against the weights
    the quantizer was given (after a rotation / smoothing); ``info["lorc"]`` says what it
    added (:func:`edgellm.lowrank.apply.apply_lorc`, factors counted at fp16).
    """
    import torch

    from edgellm.quant.rtn import check_bits

    check_options(method, a_bits=a_bits, a_format=a_format, a_static=a_static, alpha=alpha,
                  kv_bits=kv_bits, threshold=threshold, bpw_budget=bpw_budget, qtype=qtype,
                  bits=bits, keep_salient=keep_salient, salient_by=salient_by,
                  lorc_rank=lorc_rank, act_order=act_order, damp=damp,
                  group_params=group_params)
    info = {"method": method, "bits": bits, "group_size": group_size, "sym": sym,
            "a_bits": a_bits, "a_format": a_format if a_bits is not None else None,
            "a_static": a_static if a_bits is not None else None,
            "alpha": alpha if method == "smoothquant" else None, "kv_bits": kv_bits}
    if method == "gptq":
        info.update(act_order=act_order, damp=damp, group_params=group_params)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ids = None
    clips = None
    given = {}  # LoRC: the weights the quantizer is given, {name: W (out, in)}

    def keep_weights():
        if lorc_rank:
            from edgellm.models import linear_layers

            given.update({n: m.weight.detach().clone() for n, m in linear_layers(model).items()})

    def calibration():
        nonlocal ids
        if ids is None:
            from edgellm.data import get_calibration

            ids = get_calibration(calib, n_samples, seq_len, seed, tokenizer=tok)
            info.update(calib=calib, n_samples=n_samples, seq_len=seq_len)
        return ids

    if method == "gguf":
        from edgellm.quant.gguf_formats import TYPE_BITS, apply_gguf

        qtype = qtype.upper()
        keep_weights()
        qts = apply_gguf(model, qtype, progress=progress)
        info.update(type=qtype, bits=TYPE_BITS.get(qtype), sym=None,
                    group_size=None if qtype == "F16" else 32)
    elif method == "llm_int8":
        from edgellm.quant.llm_int8 import apply_llm_int8, check_threshold

        threshold = check_threshold(threshold)
        qts = apply_llm_int8(model, threshold)
        info.update(bits=8, group_size=None, sym=True, a_bits=8, a_format="int",
                    threshold=threshold)
    else:
        check_bits(bits)
        if method in CALIBRATED or bpw_budget is not None or method == "smoothquant":
            calibration()
        if method == "rotate":
            from edgellm.quant.rotate import apply_rotation

            info["rotation"] = "hadamard"
            info["method_info"] = apply_rotation(model, kind="hadamard", seed=seed)
        if method == "smoothquant":
            from edgellm.quant.smoothquant import apply_smoothquant

            sq = apply_smoothquant(model, ids, alpha, progress=progress)
            info["act_absmax_before"] = sq["act_absmax_before"]
            info["act_absmax_after"] = sq["act_absmax_after"]
        if keep_salient is not None:
            from edgellm.models import linear_layers
            from edgellm.quant.salient import mean_abs_inputs, restore_salient

            lins = linear_layers(model)
            originals = {n: lin.weight.detach().float().clone() for n, lin in lins.items()}
            mags = mean_abs_inputs(model, calibration(), lins) if salient_by == "act" else None
        keep_weights()
        res = quantize_weights(model, ids, method=method, bits=bits, group_size=group_size,
                               sym=sym, bpw_budget=bpw_budget, act_order=act_order, damp=damp,
                               group_params=group_params, progress=progress)
        qts, clips = res.qtensors, res.clips
        if keep_salient is not None:
            info.update(keep_salient=keep_salient, salient_by=salient_by,
                        **restore_salient(lins, originals, keep_salient, salient_by,
                                          act_mag=mags, seed=seed))
        if bpw_budget is not None:
            info["bpw_budget"] = bpw_budget
        if res.info:  # what a method reports about itself (mixed: the bits per layer)
            info["method_info"] = res.info
        if given:  # LoRC, before the activation quantizers wrap the linears
            from edgellm.lowrank.apply import apply_lorc

            lorc = apply_lorc(model, {n: given.pop(n) for n in qts}, lorc_rank)
            given.clear()
            info["lorc"] = lorc.info
        if a_bits is not None:
            from edgellm.quant.actquant import apply_act_quant

            aq = apply_act_quant(model, a_bits=a_bits, a_format=a_format,
                                 static=a_static, calib=calibration() if a_static else None)
            info["granularity"] = aq["granularity"]
    if given:  # gguf
        from edgellm.lowrank.apply import apply_lorc

        info["lorc"] = apply_lorc(model, {n: given.pop(n) for n in qts}, lorc_rank).info
        given.clear()
    info["rank"] = lorc_rank
    if kv_bits is not None:
        from edgellm.quant.kv import apply_kv_quant

        info["kv_info"] = apply_kv_quant(model, bits=kv_bits)
    info["seconds_quantize"] = time.perf_counter() - t0
    info["n_layers"] = len(qts)
    return QuantResult(qts, info, clips=clips)


def quantize_record(model_name: str = DEFAULT_MODEL, *, evaluate: bool = False,
                    eval_settings: EvalSettings | None = None, out: str | None = None,
                    save_clips: str | None = None, seed: int = 0, progress: bool = False,
                    device: str | None = None, **settings) -> dict:
    """Load ``model_name`` on ``device`` (:func:`edgellm.models.load_model`), quantize it (``settings``: :func:`quantize_model`'s keywords), save
    it to ``out`` and the LWC clips to ``save_clips`` if given, and with ``evaluate`` score it
    against the unquantized model (:func:`edgellm.metrics.evaluate_paired`): the record
    ``edgellm quantize`` prints.  ``size_bytes`` is the packed size; the process holds
    fake-quantized fp32 weights, so no ``memory_bytes`` (``edgellm bnb``/``torchao`` measure
    what a real format holds)."""
    import os

    from edgellm.lowrank.lorc import lorc_size
    from edgellm.measure import merge, peak_rss_bytes
    from edgellm.metrics import evaluate_paired
    from edgellm.models import load_model, n_params
    from edgellm.quant.size import model_size
    from edgellm.records import record

    eval_settings = eval_settings or EvalSettings()
    if out and settings.get("lorc_rank"):
        from edgellm.quant.qtensor import QuantError

        raise QuantError("--out saves the packed codes and scales only, not LoRC's factors; "
                         "drop --out or --lorc-rank")
    model, tok = load_model(model_name, quiet=not progress, device=device)
    res = quantize_model(model, tok, seed=seed, progress=progress, **settings)
    info = res.info
    if save_clips:
        from edgellm.quant.lwc import save_clips as write_clips

        write_clips(res.clips, save_clips, metadata={
            "bits": info["bits"], "seed": seed, "group_size": info["group_size"],
            "command": "edgellm quantize --method lwc"})
        info["clips_file"] = str(save_clips)
    rec = {**info, **model_size(model, res.qtensors), "ppl": None, "ppl_base": None,
           "kl_mean": None}
    rec.update(lorc_size(rec, info.get("lorc"), n_params(model)))
    if out:
        from edgellm.quant.save import WEIGHTS, save_quantized

        folder = save_quantized(model, res.qtensors, out, tok,
                                meta={"method": info["method"], **info, "model": model_name})
        rec.update(out=str(out), file_bytes=os.path.getsize(folder / WEIGHTS))
    if evaluate:
        reference, _ = load_model(model_name, quiet=True, device=device)
        change = max_weight_change(model, reference)
        rec.update(max_abs_weight_change=change, lossless=change == 0.0)
        merge(rec, evaluate_paired(model, reference, tok, progress=progress,
                                   **eval_settings.kwargs()))
        if info["method"] == "llm_int8":
            from edgellm.quant.llm_int8 import llm_int8_report

            rec.update(llm_int8_report(model))
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=seed, model=model_name)


def max_weight_change(model, reference) -> float:
    """Largest |W_quantized - W_reference| over the decoder linears (0.0: nothing changed)."""
    from edgellm.models import linear_layers

    ref = linear_layers(reference)
    return max((lin.weight - ref[name].weight).abs().max().item()
               for name, lin in linear_layers(model).items())


def quantize_production(model, *, library: str = "bnb", mode: str = "nf4",
                        double_quant: bool = False, blocksize: int = 64, threshold: float = 6.0,
                        cpu_kernel: bool = True) -> dict:
    """Quantize ``model`` in place with ``library`` in ``{"bnb", "edgellm", "torchao"}``;
    return what was done (``mode``, ``library``, …, ``seconds_quantize``)."""
    from edgellm.quant.backends.bitsandbytes import apply_bnb
    from edgellm.quant.backends.torchao import apply_torchao
    from edgellm.quant.blockwise import apply_blockwise, our_bpw

    t0 = time.perf_counter()
    info = {"library": library, "mode": mode}
    if library == "torchao":
        apply_torchao(model, mode)
        info["double_quant"] = False
    elif library == "bnb":
        apply_bnb(model, mode, double_quant, blocksize, threshold=threshold,
                    cpu_kernel=cpu_kernel)
        info.update(double_quant=double_quant, cpu_kernel=cpu_kernel)
        if mode == "int8":
            info["threshold"] = threshold
        else:
            info["blocksize"] = blocksize
    else:
        apply_blockwise(model, mode, blocksize, double_quant)
        info.update(double_quant=double_quant, blocksize=None if mode == "int8" else blocksize,
                    bpw=our_bpw(mode, blocksize, double_quant))
    info["seconds_quantize"] = time.perf_counter() - t0
    return info


def _library_version(library: str) -> str | None:
    from importlib import metadata

    name = {"bnb": "bitsandbytes", "torchao": "torchao"}.get(library)
    try:
        return metadata.version(name) if name else None
    except metadata.PackageNotFoundError:
        return None


def production_record(model_name: str = DEFAULT_MODEL, *, library: str = "bnb",
                      mode: str = "nf4", double_quant: bool = False, blocksize: int = 64,
                      threshold: float | None = 6.0, cpu_kernel: bool = True,
                      evaluate: bool = False, eval_settings: EvalSettings | None = None,
                      decode_tokens: int = 32, seed: int = 0, progress: bool = False) -> dict:
    """Load ``model_name`` in fp32, swap its decoder linears for ``library``'s modules
    (:func:`quantize_production`), and measure: held memory (as loaded and after running),
    batched prefill and batch-1 decode speed next to the fp32 model's in the same run (each
    under its named protocol), and with ``evaluate`` quality against the fp32 model: the
    record ``edgellm bnb`` / ``edgellm torchao`` prints.  Our own block formats
    (``library="edgellm"``) are fake-quantized fp32 weights: quality only, no speed keys."""
    import torch

    from edgellm.data import get_tokens
    from edgellm.measure import (
        as_base,
        decode_tokens_per_s,
        memory_bytes,
        memory_report,
        merge,
        peak_rss_bytes,
        prefill_tokens_per_s,
    )
    from edgellm.metrics import evaluate_paired
    from edgellm.models import linear_layers, load_model
    from edgellm.records import record

    ev = eval_settings or EvalSettings()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, tok = load_model(model_name, quiet=not progress, device="cpu")  # CPU backends
    seconds_load_base = time.perf_counter() - t0
    rec = {"memory_bytes_base": memory_bytes(model)}
    info = quantize_production(model, library=library, mode=mode, double_quant=double_quant,
                               blocksize=blocksize, threshold=threshold, cpu_kernel=cpu_kernel)
    rec.update(info, seconds_load=seconds_load_base + info["seconds_quantize"],
               seconds_load_base=seconds_load_base, library_version=_library_version(library))
    rec.update(memory_report(model))
    if library == "edgellm":
        n = sum(lin.weight.numel() for lin in linear_layers(model).values())
        rec["size_bytes"] = rec["memory_bytes"] - rec["memory_bytes_linears"] + round(
            n * info["bpw"] / 8)
    reference, _ = load_model(model_name, quiet=True, device="cpu")
    tokens = get_tokens(ev.data, tok, ev.split, ev.max_tokens)
    rec.update(ppl=None, ppl_base=None, kl_mean=None, top1_agreement=None,
               n_tokens=None, protocol=ev.protocol, ctx=ev.ctx, data=ev.data)
    if evaluate:
        merge(rec, evaluate_paired(model, reference, tok, progress=progress, **ev.kwargs()))
    # fake-quantized fp32 weights (our code) run at fp32 speed: no speed keys for them
    if library != "edgellm":
        speed = prefill_tokens_per_s(model, tokens, ev.ctx, ev.batch_size, ev.chunks)
        speed_base = prefill_tokens_per_s(reference, tokens, ev.ctx, ev.batch_size, ev.chunks)
        merge(rec, {k: speed[k] for k in ("prefill_tokens_per_s", "speed_protocol")},
              as_base(speed_base))
        rec["n_tokens_speed"] = speed["prefill_tokens"]
    if library != "edgellm" and decode_tokens:
        prompt = tokens[:DECODE_PROMPT_TOKENS]
        dec = decode_tokens_per_s(model, prompt, decode_tokens)
        dec_base = decode_tokens_per_s(reference, prompt, decode_tokens)
        merge(rec, {k: dec[k] for k in ("decode_tokens_per_s", "speed_protocol")},
              as_base(dec_base))
        rec["decode_new_tokens"] = decode_tokens
    rec["memory_bytes_runtime"] = memory_bytes(model)
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=seed, model=model_name)
