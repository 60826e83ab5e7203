"""Entry points of the deployment commands: ``edgellm export`` (GGUF, ONNX, ExecuTorch),
``quantize --gguf``, ``roofline``, ``bench-runtime`` and the loading of an exported file for
``ppl``/``kl --runtime``.  LoRA adapters on device (``eval-task --runtime llamacpp``,
``finetune --on-device``) have theirs in :mod:`edgellm.deploy.adapters`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def export(model_name: str | None = None, *, out, adapter=None, merge: bool = False,
           qtype: str = "F32", from_quantized=None, imatrix=None, imatrix_calib: str | None = None,
           imatrix_chunks: int = 128, token_embedding_type: str | None = None,
           evaluate: dict | None = None, threads: int | None = None,
           progress: bool = False) -> dict:
    """The record of ``edgellm export --format gguf``: ``model_name`` (or its ``adapter``, or the
    adapter merged into it) written to ``out`` with llama.cpp's converters, or for llama.cpp's
    own types (``Q4_K_M`` …) converted to F32 and quantized by ``llama-quantize`` (with the
    importance matrix ``imatrix``, or one computed on ``imatrix_calib``'s train split); or, with
    ``from_quantized`` (a folder of ``edgellm quantize --out``), our codes and scales written
    into GGUF blocks bit for bit (:mod:`edgellm.deploy.gguf_blocks`).  ``evaluate`` (keyword
    arguments of :func:`edgellm.metrics.evaluate_paired`) adds the file's PPL, paired ΔNLL, KL
    and top-1 agreement, computed by llama.cpp, against the model in PyTorch."""
    from edgellm.deploy.export_quant import (
        evaluate_gguf,
        export_quantized,
        llama_quantize,
        type_counts,
    )

    if from_quantized is not None:
        return export_quantized(from_quantized, out=out, evaluate=evaluate, progress=progress)
    from edgellm.deploy.export import (
        CONVERTER_TYPES,
        adapter_to_gguf,
        check_type,
        gguf_bpw,
        model_to_gguf,
        tensor_types,
    )
    from edgellm.measure import peak_rss_bytes
    from edgellm.models import DEFAULT_MODEL, linear_layers, load_model
    from edgellm.records import record

    model_name = model_name or DEFAULT_MODEL
    qtype = check_type(qtype, adapter=adapter is not None and not merge,
                       imatrix=imatrix or imatrix_calib)
    t0 = time.perf_counter()
    model, tok = load_model(model_name, quiet=not progress, device="cpu")
    if adapter is not None:
        from edgellm.lora.apply import check_adapter_base

        check_adapter_base(model, adapter)
    extra = {}
    if adapter is not None and not merge:
        path = adapter_to_gguf(adapter, model, tok, out, qtype=qtype)
        kind = "lora"
    else:
        if adapter is not None:
            from edgellm.deploy.adapters import merged

            model = merged(model, adapter)
        kind = "model"
        if qtype in CONVERTER_TYPES:
            path = model_to_gguf(model, tok, out, qtype=qtype)
        else:
            path, extra = llama_quantize(model, tok, out, qtype, model_name=model_name,
                                          imatrix=imatrix, imatrix_calib=imatrix_calib,
                                          imatrix_chunks=imatrix_chunks, threads=threads,
                                          token_embedding_type=token_embedding_type)
    types = tensor_types(path)
    n_linear = len(linear_layers(model))
    rec = {"model": model_name, "adapter": None if adapter is None else str(adapter),
           "merge": merge, "kind": kind, "format": "gguf", "type": qtype, "out": str(path),
           "size_bytes": path.stat().st_size, "bpw": gguf_bpw(path),
           "tensor_types": types, "type_counts": type_counts(types), "n_tensors": len(types),
           "n_linear": n_linear, **extra, "seconds_export": time.perf_counter() - t0}
    if evaluate is not None and kind == "model":
        rec.update(evaluate_gguf(path, model, tok, **evaluate))
    rec.update(peak_rss_bytes=peak_rss_bytes(), seconds=time.perf_counter() - t0)
    return record(rec, protocol=rec.get("protocol", "export"), data=rec.get("data"))


def quantize_record_gguf(gguf, model_name: str | None = None, *, out=None,
                         evaluate: bool = False, eval_settings=None, threads: int | None = None,
                         **settings) -> dict:
    """:func:`edgellm.quant.apply.quantize_record`, then the same codes and scales written into
    llama.cpp's blocks at ``gguf``; with ``evaluate``, the file is also evaluated in llama.cpp on
    the same tokens (the record's ``gguf``: against the fp32 model, and ``*_vs_simulated``
    against our simulation of the same codes)."""
    from edgellm.deploy.export_quant import export_quantized
    from edgellm.metrics import EvalSettings
    from edgellm.models import DEFAULT_MODEL
    from edgellm.quant.apply import quantize_record

    model_name = model_name or DEFAULT_MODEL
    ev = None
    if evaluate:
        ev = {**(eval_settings or EvalSettings()).kwargs(), "threads": threads,
              "progress": settings.get("progress", False)}
    with tempfile.TemporaryDirectory(prefix="edgellm-quant-") as tmp:
        folder = out or Path(tmp) / "quantized"
        rec = quantize_record(model_name, out=folder, evaluate=evaluate,  # on the CPU by default
                              eval_settings=eval_settings, **{"device": "cpu", **settings})
        rec["gguf"] = export_quantized(folder, out=gguf, evaluate=ev,
                                       progress=settings.get("progress", False))
    if out is None:                                  # the folder was temporary
        rec.pop("out", None)
        rec.pop("file_bytes", None)
        rec["gguf"]["from_quantized"] = None
    return rec


def roofline(*, threads: int | None = None, size_mib: int = 512, model=None,
             position: int = 0) -> dict:
    """The record of ``edgellm roofline``: :func:`edgellm.deploy.roofline.measure`, and with a
    GGUF ``model`` its bytes per decoded token and ``decode_bound_tokens_per_s``."""
    from edgellm.deploy.export import gguf_decode_bytes
    from edgellm.deploy.roofline import decode_bound, measure
    from edgellm.measure import protocol
    from edgellm.records import record

    t0 = time.perf_counter()
    rec = measure(threads=threads, mib=size_mib)
    if model is not None:
        rec["model"] = str(model)
        rec.update(gguf_decode_bytes(model, position=position))
        rec["decode_bound_tokens_per_s"] = decode_bound(rec["bandwidth_bytes_per_s"],
                                                        rec["bytes_per_token"])
        rec["speed_protocol"] = {"decode_bound_tokens_per_s": protocol(
            "decode-bound", threads=rec["threads"], position=position)}
    rec["seconds"] = time.perf_counter() - t0
    return {**record(rec, protocol="roofline", data=None), "threads": rec["threads"]}


RUNTIMES = ("llamacpp", "torch", "bnb", "torchao", "onnxruntime", "executorch")
#: runtimes that run a file (the rest load a model name or folder into PyTorch)
FILE_RUNTIMES = {"llamacpp": ".gguf", "onnxruntime": ".onnx", "executorch": ".pte"}
#: the library setting each PyTorch-library runtime uses (lesson 05's formats)
LIBRARY_MODES = {"bnb": ("bnb", "nf4", True), "torchao": ("torchao", "int8_weight_only", False)}


def bench_runtime(runtime: str, model=None, *, threads: int = 1, prompt_tokens: int = 128,
                  gen_tokens: int = 128, repeats: int = 3, data: str = "pydoc",
                  with_llama_bench: bool = True) -> dict:
    """The record of ``edgellm bench-runtime``: load, time to first token, prefill and decode
    tokens/s of ``model`` (a file for the runtimes of :data:`FILE_RUNTIMES`, a model name or
    folder for the PyTorch ones) on the same prompt ids (:mod:`edgellm.deploy.runtime`), its size
    and the process's peak RSS, then the machine's read bandwidth at the same thread count and the
    decode bound it gives (``decode_bound_tokens_per_s``, ``fraction_of_bound``) and the compute
    bound on prefill (``prefill_bound_tokens_per_s``); for ``llamacpp`` also llama.cpp's own
    ``llama-bench`` on the same file and thread count (``llama_bench``)."""
    from edgellm.deploy.export import gguf_decode_bytes
    from edgellm.deploy.roofline import (
        decode_bound,
        default_config,
        file_read,
        measure,
        model_read,
    )
    from edgellm.deploy.runtime import bench_llamacpp, bench_torch, llama_bench, prompt_ids
    from edgellm.measure import check_speed_keys, peak_rss_bytes, protocol
    from edgellm.models import DEFAULT_MODEL, load_model, load_tokenizer
    from edgellm.records import record

    if runtime not in RUNTIMES:
        from edgellm.errors import EdgeLLMError

        raise EdgeLLMError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    t_start = time.perf_counter()
    lb = None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        position = prompt_tokens + gen_tokens // 2           # the mean position of a decode step
        if runtime in FILE_RUNTIMES:
            tok = load_tokenizer(DEFAULT_MODEL, quiet=True)  # the tokenizer of the prompt
            ids = prompt_ids(tok, prompt_tokens, data=data)
            kw = dict(gen_tokens=gen_tokens, threads=threads, repeats=repeats)
            if runtime == "llamacpp":
                res = bench_llamacpp(model, ids, **kw)
                size = Path(model).stat().st_size
                decode = gguf_decode_bytes(model, position=position)
                read, n_weights = decode["bytes_per_token"], decode["n_weights"]
                if with_llama_bench:
                    lb = llama_bench(model, threads=threads, prompt_tokens=prompt_tokens,
                                     gen_tokens=gen_tokens, repeats=repeats)
            else:
                cfg, n_weights = default_config()
                if runtime == "onnxruntime":
                    from edgellm.deploy.onnx_runtime import bench_onnx, onnx_size, onnx_type

                    res = bench_onnx(model, ids, **kw)
                    size, separate = onnx_size(model), onnx_type(model) != "fp32"
                else:
                    from edgellm.deploy.executorch_runtime import bench_executorch

                    res = bench_executorch(model, ids, **kw)
                    size, separate = Path(model).stat().st_size, True
                read = file_read(size, cfg, separate_embedding=separate, position=position)
        else:
            t0 = time.perf_counter()
            m, tok = load_model(model or DEFAULT_MODEL, quiet=True, device="cpu")
            if runtime in LIBRARY_MODES:
                from edgellm.quant.apply import quantize_production

                library, mode, dq = LIBRARY_MODES[runtime]
                lib = quantize_production(m, library=library, mode=mode, double_quant=dq)
            load_s = time.perf_counter() - t0
            ids = prompt_ids(tok, prompt_tokens, data=data)
            res = bench_torch(m, ids, gen_tokens=gen_tokens, repeats=repeats, load_s=load_s)
            if runtime in LIBRARY_MODES:
                res.update(library=lib["library"], mode=lib["mode"],
                           double_quant=lib.get("double_quant"))
            read, n_weights, size = model_read(m, position=position)
            del m
        peak = peak_rss_bytes()                              # before the bandwidth arrays
        machine = measure(threads=threads)
    finally:
        torch.set_num_threads(old)
    bound = decode_bound(machine["bandwidth_bytes_per_s"], read)
    rec = {"runtime": runtime, "model": str(model or DEFAULT_MODEL), **res, "size_bytes": size,
           "peak_rss_bytes": peak, "bytes_per_token": read,
           "bandwidth_bytes_per_s": machine["bandwidth_bytes_per_s"],
           "peak_flops": machine["peak_flops"], "cpu": machine["cpu"],
           "decode_bound_tokens_per_s": bound,
           "fraction_of_bound": (res["decode_tokens_per_s"] or 0) / bound,
           "prefill_bound_tokens_per_s": machine["peak_flops"] / (2 * n_weights),
           "seconds": time.perf_counter() - t_start}
    rec["speed_protocol"]["decode_bound_tokens_per_s"] = protocol(
        "decode-bound", threads=threads, position=position)
    rec["speed_protocol"]["prefill_bound_tokens_per_s"] = protocol("prefill-bound",
                                                                   threads=threads)
    if lb is not None:
        rec["llama_bench"] = {**lb, "fraction_of_bound": lb["decode_tokens_per_s"] / bound,
                              "speed_protocol": {
                                  "prefill_tokens_per_s": protocol(
                                      "llama-bench-pp", prompt_tokens=prompt_tokens,
                                      repeats=repeats, threads=threads),
                                  "decode_tokens_per_s": protocol(
                                      "llama-bench-tg", gen_tokens=gen_tokens, repeats=repeats,
                                      threads=threads)}}
        check_speed_keys(rec["llama_bench"])
    check_speed_keys(rec)
    return {**record(rec, protocol="runtime", data=data), "threads": threads}


def runtime_model(runtime: str, path, *, ctx: int = 512, threads: int = 1):
    """``(model, tokenizer)`` for the course's evaluation of an exported file run by its
    runtime (a function of token ids to logits: :class:`~edgellm.deploy.llamacpp.LlamaCppLM`,
    :class:`~edgellm.deploy.onnx_runtime.OrtLM`, :class:`~edgellm.deploy.executorch_runtime.PteLM`)
    and the default model's tokenizer; for a GGUF file, after checking that llama.cpp tokenizes
    a sample text to the same ids (else the tokens scored would not be the file's)."""
    from edgellm.models import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL, quiet=True)
    if runtime == "onnxruntime":
        from edgellm.deploy.onnx_runtime import OrtLM

        return OrtLM(path, threads=threads), tok
    if runtime == "executorch":
        from edgellm.deploy.executorch_runtime import PteLM

        return PteLM(path, threads=threads), tok
    from edgellm.deploy.llamacpp import LlamaCppError, LlamaCppLM, llamacpp_tokenize

    sample = "def join(a, *p):\n    \"\"\"Join two or more pathname components.\"\"\"\n"
    try:
        theirs = llamacpp_tokenize(path, sample)
    except (ValueError, RuntimeError) as e:
        raise LlamaCppError(f"llama.cpp could not read {path} ({e}); is it a complete GGUF "
                            "file?") from None
    if theirs != tok(sample, add_special_tokens=False)["input_ids"]:
        raise LlamaCppError(f"{path}: its tokenizer is not {DEFAULT_MODEL}'s; evaluate it with "
                            "its own tokenizer (not supported here)")
    return LlamaCppLM(path, n_ctx=ctx, threads=threads), tok


def export_runtime(model_name: str | None = None, *, out, fmt: str, qtype: str = "fp32",
                   max_len: int = 512, evaluate: dict | None = None, threads: int = 1,
                   progress: bool = False) -> dict:
    """The record of ``edgellm export --format onnx|executorch``: ``model_name`` written by
    :func:`~edgellm.deploy.onnx_runtime.export_onnx` or
    :func:`~edgellm.deploy.executorch_runtime.export_pte`; ``evaluate`` (keyword arguments of
    :func:`edgellm.metrics.evaluate_paired`) adds the file's PPL, paired ΔNLL, KL and top-1
    agreement, run by its runtime, against the model in PyTorch."""
    from edgellm.measure import peak_rss_bytes
    from edgellm.metrics import evaluate_paired
    from edgellm.models import DEFAULT_MODEL, load_model
    from edgellm.records import record

    model_name = model_name or DEFAULT_MODEL
    model, tok = load_model(model_name, quiet=not progress, device="cpu")
    if fmt == "onnx":
        from edgellm.deploy.onnx_runtime import export_onnx

        rec = export_onnx(model, out, qtype=qtype, progress=progress)
    else:
        from edgellm.deploy.executorch_runtime import export_pte

        rec = export_pte(model, out, qtype=qtype, max_len=max_len)
    rec["model"] = model_name
    if evaluate is not None:
        runtime = "onnxruntime" if fmt == "onnx" else "executorch"
        lm, _ = runtime_model(runtime, out, threads=threads)
        if fmt != "onnx":                  # export_pte untied and quantized ``model`` in place
            model, _ = load_model(model_name, quiet=True, device="cpu")
        rec.update(evaluate_paired(lm, model, tok, **evaluate), runtime=runtime)
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, protocol=rec.get("protocol", "export"), data=rec.get("data"))


SPECULATIVE_RUNTIMES = ("torch",)


def speculative(target: str | None = None, *, draft: str = "prompt-lookup", gamma: int = 4,
                n_prompts: int = 8, prompt_tokens: int = 128, new_tokens: int = 64,
                threads: int = 1, data: str = "pydoc", runtime: str = "torch",
                progress=None) -> dict:
    """The record of ``edgellm speculative``: greedy speculative decoding of ``target`` with
    ``draft`` (``prompt-lookup``; ``drop-layers``, the target with half its layers dropped by
    block influence and not trained; or a model name / folder sharing the tokenizer, e.g. the
    distilled ``smollm2-135m-draft``) against plain greedy decoding of the same prompts
    (:func:`edgellm.deploy.speculative.compare`).  For a draft model also its cost per step
    relative to the target's (``cost_ratio``, from both models' decode speed) and the speedup the
    formula predicts (``speedup_expected``).  Fails when nothing was accepted (no speculation
    happened, so ``identical`` would mean nothing)."""
    from edgellm.data import get_calibration, get_tokens
    from edgellm.deploy.speculative import (
        DraftModel,
        PromptLookup,
        SpeculativeError,
        check_vocab,
        compare,
        expected_speedup,
    )
    from edgellm.measure import check_speed_keys, decode_tokens_per_s, protocol
    from edgellm.models import DEFAULT_MODEL, load_model
    from edgellm.records import record

    if runtime not in SPECULATIVE_RUNTIMES:
        raise SpeculativeError(f"runtime {runtime!r}: speculative decoding runs in "
                               f"{', '.join(SPECULATIVE_RUNTIMES)}")
    target = target or DEFAULT_MODEL
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, tok = load_model(target, quiet=True, device="cpu")
        ids = get_tokens(data, tok, "test")
        stride = (ids.numel() - prompt_tokens - new_tokens) // n_prompts
        if stride < prompt_tokens:
            raise SpeculativeError(f"{data}/test is too short for {n_prompts} prompts of "
                                   f"{prompt_tokens} tokens; ask for fewer prompts")
        prompts = [ids[i * stride:i * stride + prompt_tokens].tolist() for i in range(n_prompts)]
        info: dict = {"draft": draft}
        if draft == "prompt-lookup":
            proposer, draft_model = PromptLookup(), None
        else:
            if draft == "drop-layers":
                from edgellm.distill.students import make_student

                calib = get_calibration(data, n_samples=8, seq_len=256, tokenizer=tok)
                draft_model, sinfo = make_student(model, "drop-layers", ratio=0.5, calib=calib)
                info.update(draft_kept=sinfo["kept"])
            else:
                draft_model = load_model(draft, quiet=True, device="cpu")[0]
            check_vocab(model, draft_model)
            info.update(draft_n_layers=draft_model.config.num_hidden_layers)
            proposer = DraftModel(draft_model, name=draft)
        res = compare(model, prompts, proposer, gamma=gamma, new_tokens=new_tokens,
                      progress=progress)
        if res["accepted"] == 0 or res["tokens_per_step"] <= 1:
            raise SpeculativeError(f"draft {draft!r} had none of its {res['drafted']} tokens "
                                   "accepted: nothing was speculated, so the comparison says "
                                   "nothing; try --draft prompt-lookup or a distilled draft")
        gen = protocol("generate", batch=1, prompts=n_prompts, prompt_tokens=prompt_tokens,
                       new_tokens=new_tokens)
        speed = {"decode_tokens_per_s": gen, "decode_tokens_per_s_base": gen,
                 "speedup": {**gen, "ratio": "plain seconds / speculative seconds"}}
        if draft_model is not None:
            prompt = torch.tensor(prompts[0])
            t_tps = decode_tokens_per_s(model, prompt, new_tokens=32, repeats=3)
            d_tps = decode_tokens_per_s(draft_model, prompt, new_tokens=32, repeats=3)
            c = t_tps["decode_tokens_per_s"] / d_tps["decode_tokens_per_s"]
            info.update(cost_ratio=c, speedup_expected=expected_speedup(
                res["acceptance_rate"], gamma, c))
        else:
            info.update(cost_ratio=0.0, speedup_expected=res["tokens_per_step_expected"])
        rec = record({**res, **info, "speed_protocol": speed}, model=target, data=data,
                     gamma=gamma, n_prompts=n_prompts, prompt_tokens=prompt_tokens,
                     new_tokens=new_tokens, runtime=runtime)
        check_speed_keys(rec)
        return rec
    finally:
        torch.set_num_threads(old)
