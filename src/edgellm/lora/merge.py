"""Merging a QLoRA adapter into its 4-bit base, and what it costs on the task.

A QLoRA model computes ``x · (deq(Q) + s B A)ᵀ``.  Merged in fp32 (``deq(Q) + s B A`` kept in
float) it computes the same thing exactly; merged and stored in NF4 again, every weight snaps
back to the NF4 grid, so part of the update is lost (``requant_rel_err`` = ‖NF4(merged) −
merged‖ / ‖s B A‖ per layer).  :func:`evaluate_merged` scores both merged models on the task,
each paired with the unmerged model on the same items.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def merge_qlora_into(peft_model, fp32_model, *, requantize: bool = False,
                     adapter: str = "default") -> list[float]:
    """Write ``deq(Q) + s B A`` of every adapted bitsandbytes layer of ``peft_model`` into the
    same-named linear of ``fp32_model`` (a float copy of the base), re-quantized to NF4 with
    ``requantize``.  Returns ``requant_rel_err`` per layer (0 without ``requantize``)."""
    from edgellm.quant.backends.bitsandbytes import bnb_dequantize, nf4_roundtrip

    errs = []
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        delta = module.get_delta_weight(adapter).float()
        merged = bnb_dequantize(module.base_layer).float() + delta
        if requantize:
            rounded = nf4_roundtrip(merged)
            errs.append(float((rounded - merged).norm() / delta.norm()))
            merged = rounded
        else:
            errs.append(0.0)
        target = fp32_model.get_submodule(name[len(prefix):] if name.startswith(prefix) else name)
        target.weight.copy_(merged.to(target.weight.dtype))
    if not errs:
        raise ValueError("no adapted layer found: pass a peft model with LoRA adapters")
    return errs


def paired(a: list[bool], b: list[bool]) -> dict:
    """Accuracy difference ``b − a`` on the same items with its paired standard error."""
    n = len(a)
    d = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return {"delta": mean, "delta_se": math.sqrt(var / n), "n_changed": sum(x != 0 for x in d)}


def evaluate_merged(peft_model, model_name: str, tokenizer, task, *, correct: list[bool],
                    style: str, max_examples=None, progress: bool = False) -> dict:
    """Both merged forms of a trained QLoRA ``peft_model`` scored on ``task``: ``{"fp32": …,
    "nf4": …}``, each with ``accuracy``, ``ppl`` and the paired difference from the unmerged
    model (whose per-item ``correct`` is given)."""
    from edgellm.lora.evaluate import evaluate_task
    from edgellm.models import load_model

    fp32, _ = load_model(model_name, quiet=True, device="cpu")
    out = {}
    for kind, requant in (("fp32", False), ("nf4", True)):
        errs = merge_qlora_into(peft_model, fp32, requantize=requant)
        ev = evaluate_task(fp32, tokenizer, task, style=style, max_examples=max_examples,
                           progress=progress)
        out[kind] = {"accuracy": ev["accuracy"], "accuracy_se": ev["accuracy_se"],
                     "format_valid": ev["format_valid"], "ppl": ev["ppl"],
                     "vs_unmerged": paired(correct, ev["correct"])}
        if requant:
            errs.sort()
            out[kind]["requant_rel_err_median"] = errs[len(errs) // 2]
    return out


@torch.no_grad()
def merge_int4(model, *, on_grid: bool, offset_dtype: torch.dtype = torch.float16) -> dict:
    """Merge every :class:`~edgellm.lora.qalora.QALoRALinear` of ``model`` in place: the exact
    float merge, or (``on_grid``) the merged weight as stored in INT4 (QA-LoRA: offsets moved,
    stored in ``offset_dtype``; plain LoRA: re-quantized).  Returns the median
    ``requant_rel_err`` and ``changed_codes``."""
    from edgellm.lora.qalora import QALoRALinear

    errs, changed = [], []
    for m in model.modules():
        if not isinstance(m, QALoRALinear) or m.merged:
            continue
        delta = m.delta_weight()
        exact = m.qt.dequantize() + delta
        if on_grid:
            qt, frac = m.merged_on_grid(offset_dtype)
            w = qt.dequantize()
            errs.append(float((w - exact).norm() / delta.norm()))
            changed.append(frac)
        else:
            w = exact
        m.base.weight.copy_(w)
        m.merged = True
    errs.sort()
    changed.sort()
    return {"requant_rel_err_median": errs[len(errs) // 2] if errs else 0.0,
            "changed_codes_median": changed[len(changed) // 2] if changed else 0.0}


def evaluate_merged_int4(model, tokenizer, task, *, correct: list[bool], style: str,
                         max_examples=None, progress: bool = False) -> dict:
    """An INT4-base adapter (``qalora`` / ``int4-lora``) merged exactly (``fp32``) and as stored
    in INT4 (``int4``: fp16 offsets; QA-LoRA also ``int4_offsets_fp32``), each scored on ``task``
    and paired with the unmerged model."""
    import copy

    from edgellm.lora.evaluate import evaluate_task
    from edgellm.lora.qalora import QALoRALinear

    kinds = [("fp32", False, None), ("int4", True, torch.float16)]
    if any(isinstance(m, QALoRALinear) and m.pooled for m in model.modules()):
        kinds.append(("int4_offsets_fp32", True, torch.float32))   # QA-LoRA's offsets unrounded
    out = {}
    for kind, grid, offset_dtype in kinds:
        m = copy.deepcopy(model)
        info = merge_int4(m, on_grid=grid, offset_dtype=offset_dtype or torch.float16)
        ev = evaluate_task(m, tokenizer, task, style=style, max_examples=max_examples,
                           progress=progress)
        del m
        out[kind] = {"accuracy": ev["accuracy"], "accuracy_se": ev["accuracy_se"],
                     "format_valid": ev["format_valid"], "ppl": ev["ppl"],
                     "vs_unmerged": paired(correct, ev["correct"]), **(info if grid else {})}
    return out
