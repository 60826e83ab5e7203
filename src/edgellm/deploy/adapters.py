"""LoRA adapters on device: an adapter run by llama.cpp on a task
(``edgellm eval-task --runtime llamacpp``) and fine-tuning then deploying in one command
(``edgellm finetune --on-device``).

An adapter on device is the base model's GGUF plus a GGUF LoRA applied at run time (or the
adapter merged into the weights first).  :func:`eval_task_llamacpp` runs both the Hugging Face
model with the adapter (peft) and llama.cpp on the same prompt token ids, greedy, and reports the
task metric of each and how often their generated tokens agree, token for token.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


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
    model, tok = load_model(model_name, quiet=not progress, device="cpu")
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
