"""Entry points of the deployment commands: ``edgellm export`` and a LoRA adapter on a task,
run by llama.cpp (``edgellm eval-task --runtime llamacpp``).

An adapter on device is the base model's GGUF plus a GGUF LoRA applied at run time (or the
adapter merged into the weights first).  :func:`eval_task_llamacpp` runs both the Hugging Face
model with the adapter (peft) and llama.cpp on the same prompt token ids, greedy, and reports the
task metric of each and how often their generated tokens agree, token for token.
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
    model, tok = load_model(model_name, quiet=not progress)
    if adapter is not None:
        from edgellm.lora.apply import check_adapter_base

        check_adapter_base(model, adapter)
    extra = {}
    if adapter is not None and not merge:
        path = adapter_to_gguf(adapter, model, tok, out, qtype=qtype)
        kind = "lora"
    else:
        if adapter is not None:
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
        rec = quantize_record(model_name, out=folder, evaluate=evaluate,
                              eval_settings=eval_settings, **settings)
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


RUNTIMES = ("llamacpp", "torch", "bnb", "torchao")
#: the library setting each PyTorch-library runtime uses (lesson 05's formats)
LIBRARY_MODES = {"bnb": ("bnb", "nf4", True), "torchao": ("torchao", "int8_weight_only", False)}


def bench_runtime(runtime: str, model=None, *, threads: int = 1, prompt_tokens: int = 128,
                  gen_tokens: int = 128, repeats: int = 3, data: str = "pydoc",
                  with_llama_bench: bool = True) -> dict:
    """The record of ``edgellm bench-runtime``: load, time to first token, prefill and decode
    tokens/s of ``model`` (a GGUF file for ``llamacpp``, a model name or folder for ``torch``)
    on the same prompt ids (:mod:`edgellm.deploy.runtime`), its size and the process's peak RSS,
    then the machine's read bandwidth at the same thread count and the decode bound it gives
    (``decode_bound_tokens_per_s``, ``fraction_of_bound``) and the compute bound on prefill
    (``prefill_bound_tokens_per_s``); for ``llamacpp`` also llama.cpp's own ``llama-bench`` on
    the same file and thread count (``llama_bench``)."""
    from edgellm.deploy.export import gguf_decode_bytes
    from edgellm.deploy.roofline import bytes_per_token, decode_bound, measure
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
        if runtime == "llamacpp":
            tok = load_tokenizer(DEFAULT_MODEL, quiet=True)  # the tokenizer of the prompt
            ids = prompt_ids(tok, prompt_tokens, data=data)
            res = bench_llamacpp(model, ids, gen_tokens=gen_tokens, threads=threads,
                                 repeats=repeats)
            size = Path(model).stat().st_size
            decode = gguf_decode_bytes(model, position=position)
            read, n_weights = decode["bytes_per_token"], decode["n_weights"]
            if with_llama_bench:
                lb = llama_bench(model, threads=threads, prompt_tokens=prompt_tokens,
                                 gen_tokens=gen_tokens, repeats=repeats)
        else:
            from edgellm.measure import memory_report

            t0 = time.perf_counter()
            m, tok = load_model(model or DEFAULT_MODEL, quiet=True)
            # the weights a token multiplies (counted before packing): the tied embedding once,
            # as the output matrix; an untied input embedding is a lookup, not a matmul
            n_weights = sum(p.numel() for p in m.parameters())
            if not m.config.tie_word_embeddings:
                n_weights -= m.get_input_embeddings().weight.numel()
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
            embed = m.get_input_embeddings().weight
            mem = memory_report(m)
            params = {"linears": mem["memory_bytes_linears"], "other": mem["memory_bytes_other"],
                      "embedding": mem["memory_bytes_embedding"]}
            if m.config.tie_word_embeddings:
                params["lm_head (tied)"] = params["embedding"]
            name = "embedding"
            cfg = m.config
            kv = (2 * cfg.num_hidden_layers * (cfg.num_key_value_heads or cfg.num_attention_heads)
                  * (cfg.hidden_size // cfg.num_attention_heads) * embed.element_size())
            size = mem["memory_bytes"]
            read = bytes_per_token(params, rows={name: embed.shape[0]},
                                   kv_bytes_per_position=kv, position=position)
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


def llamacpp_model(gguf, *, ctx: int = 512, threads: int = 1):
    """``(model, tokenizer)`` for the course's evaluation of a GGUF file by llama.cpp: a
    :class:`~edgellm.deploy.llamacpp.LlamaCppLM` and the default model's tokenizer, after
    checking that llama.cpp tokenizes a sample text to the same ids (else the tokens scored
    would not be the file's)."""
    from edgellm.deploy.llamacpp import LlamaCppError, LlamaCppLM, llamacpp_tokenize
    from edgellm.models import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL, quiet=True)
    sample = "def join(a, *p):\n    \"\"\"Join two or more pathname components.\"\"\"\n"
    try:
        theirs = llamacpp_tokenize(gguf, sample)
    except (ValueError, RuntimeError) as e:
        raise LlamaCppError(f"llama.cpp could not read {gguf} ({e}); is it a complete GGUF "
                            "file?") from None
    if theirs != tok(sample, add_special_tokens=False)["input_ids"]:
        raise LlamaCppError(f"{gguf}: its tokenizer is not {DEFAULT_MODEL}'s; evaluate it with "
                            "its own tokenizer (not supported here)")
    return LlamaCppLM(gguf, n_ctx=ctx, threads=threads), tok


def merged(model, adapter):
    """``model`` with the peft ``adapter`` merged into its weights (``W + s B A``)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def eval_task_llamacpp(model_name: str | None = None, *, adapter, task: str = "funcname",
                       merge: bool = False, max_examples: int | None = None,
                       batch_size: int = 32, threads: int = 1, progress: bool = False) -> dict:
    """An adapter on ``task``, generated greedily by Hugging Face + peft and by llama.cpp from
    the same prompt token ids: llama.cpp runs the base model's F32 GGUF with the adapter as a
    GGUF LoRA (or, with ``merge``, the merged model's F32 GGUF).  Keys: ``accuracy`` (llama.cpp),
    ``accuracy_torch`` (HF + peft), ``token_agreement`` (the fraction of prompts whose generated
    tokens are identical), ``first_divergence`` (where the others part)."""
    from peft import PeftModel

    from edgellm.deploy.export import adapter_to_gguf, model_to_gguf
    from edgellm.deploy.llamacpp import llamacpp_greedy
    from edgellm.lora.apply import check_adapter_base
    from edgellm.lora.chat import TRAIN_STYLE, Prompting, generate_batched, prompt_ids
    from edgellm.lora.task import load_task, score
    from edgellm.measure import peak_rss_bytes
    from edgellm.models import DEFAULT_MODEL, load_model
    from edgellm.records import record

    model_name = model_name or DEFAULT_MODEL
    t0 = time.perf_counter()
    the_task = load_task(task)
    items = the_task.subset("test", max_examples)
    model, tok = load_model(model_name, quiet=not progress)
    meta = check_adapter_base(model, adapter)
    style = meta.get("train_prompt_style", TRAIN_STYLE)
    prompting = Prompting.from_style(style, the_task.split("train"),
                                     instruction=the_task.instruction)
    rows = [prompt_ids(tok, prompting, it.prompt) for it in items]
    with tempfile.TemporaryDirectory(prefix="edgellm-gguf-") as tmp:
        base_gguf = lora_gguf = None
        if not merge:                 # the base before peft wraps it
            base_gguf = model_to_gguf(model, tok, Path(tmp) / "base-f32.gguf")
        model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        t1 = time.perf_counter()
        ours = generate_batched(model, tok, prompting, [it.prompt for it in items],
                                batch_size=batch_size, progress=progress, ids=True)
        torch_seconds = time.perf_counter() - t1
        if merge:
            base_gguf = model_to_gguf(model.merge_and_unload(), tok, Path(tmp) / "merged-f32.gguf")
        else:
            lora_gguf = adapter_to_gguf(adapter, model.get_base_model(), tok,
                                        Path(tmp) / "adapter-f32.gguf")
        sizes = {"size_bytes": base_gguf.stat().st_size,
                 "adapter_gguf_bytes": None if lora_gguf is None else lora_gguf.stat().st_size}
        del model
        t1 = time.perf_counter()
        theirs = llamacpp_greedy(base_gguf, rows, eos=tok.eos_token_id, lora=lora_gguf,
                                 threads=threads, progress=progress)
        llama_seconds = time.perf_counter() - t1
    dec = [tok.decode(x, skip_special_tokens=True) for x in theirs]
    rec = score(dec, items, dotted_names=the_task.dotted_names)
    correct = rec.pop("correct")
    ref = score([tok.decode(x, skip_special_tokens=True) for x in ours], items,
                dotted_names=the_task.dotted_names)
    ref_correct = ref.pop("correct")
    diverge = [first_difference(a, b) for a, b in zip(ours, theirs, strict=True)]
    parted = [d for d in diverge if d is not None]
    n = len(items)
    rec.update({
        "model": model_name, "adapter": str(adapter), "task": task,
        "task_sha256": the_task.sha256, "runtime": "llamacpp", "merge": merge,
        "gguf_type": "F32", "prompt_style": style, "decoding": "free",
        "accuracy_torch": ref["accuracy"], "accuracy_torch_se": ref["accuracy_se"],
        "token_agreement": 1 - len(parted) / n, "n_diverged": len(parted),
        "first_divergence": sorted(parted),
        "answer_changed": sum(a != b for a, b in zip(correct, ref_correct, strict=True)),
        "diverged_examples": [
            {"prompt": it.prompt, "answer": it.answer, "torch": tok.decode(a),
             "llamacpp": tok.decode(b), "first_divergence": d}
            for it, a, b, d in zip(items, ours, theirs, diverge, strict=True) if d is not None][:8],
        "threads": threads, "torch_seconds": torch_seconds, "llamacpp_seconds": llama_seconds,
        **sizes, "peak_rss_bytes": peak_rss_bytes(), "seconds": time.perf_counter() - t0})
    return record(rec, protocol="greedy-exact-match", data=task)


LLAMACPP_METHODS = ("lora", "qlora", "pissa", "loftq")   # saved as a plain LoRA in peft's format
SUMMARY_KEYS = ("accuracy", "accuracy_se", "format_valid", "accuracy_torch", "accuracy_torch_se",
                "token_agreement", "n_diverged", "first_divergence", "answer_changed",
                "diverged_examples", "size_bytes", "adapter_gguf_bytes", "gguf_type", "threads",
                "torch_seconds", "llamacpp_seconds")


def finetune_on_device(model_name: str | None = None, *, out=None, threads: int = 1,
                       **kwargs) -> dict:
    """:func:`edgellm.lora.apply.finetune`, then the saved adapter in llama.cpp twice (as a GGUF
    LoRA on the base's GGUF: ``llamacpp``; merged into the weights: ``llamacpp_merged``), each
    compared with HF + peft by :func:`eval_task_llamacpp` on the same test items."""
    from edgellm.lora.apply import finetune

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgellm-adapter-") as tmp:
        folder = out if out is not None else Path(tmp) / "adapter"
        rec = finetune(model_name, out=folder, **kwargs)
        for key, merge in (("llamacpp", False), ("llamacpp_merged", True)):
            ev = eval_task_llamacpp(model_name, adapter=folder, task=kwargs.get("task", "funcname"),
                                    merge=merge, max_examples=kwargs.get("max_examples"),
                                    threads=threads, progress=kwargs.get("progress", False))
            rec[key] = {k: ev[k] for k in SUMMARY_KEYS}
    if out is None:
        rec.pop("out", None)
    rec["seconds"] = time.perf_counter() - t0     # training, evaluations, exports, llama.cpp
    return rec


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first generated token where ``a`` and ``b`` differ (a length difference
    counts at the shorter one's end); ``None`` when they are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
