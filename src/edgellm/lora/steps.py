"""What a LoRA and a QLoRA training step cost against a forward pass, measured in one run.

The issue's goals compare, on the same chat-template batch:

* a LoRA step (forward, backward through the frozen base into ``A`` and ``B``, AdamW) with a
  no-grad forward pass of the base model, both computing logits only where the loss needs them
  (the answer span: ``logits_to_keep``, :func:`edgellm.lora.chat.answer_logits`); goal ≤ 3×;
* a QLoRA step (the same on a bitsandbytes NF4 base, dequantized in every forward and backward)
  with the LoRA step; goal ≤ 1.5×.

Runs are interleaved (forward, LoRA step, QLoRA step, again and again), so a change of machine
load hits all alike; each figure is the median of ``repeats``.
"""

from __future__ import annotations

import copy
import time

import torch


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def step_times(model, batch: dict, *, rank: int = 8, targets: str = "all", lr: float = 1e-3,
               repeats: int = 5, qlora: bool = True) -> dict:
    """Seconds of a no-grad forward, a LoRA step and (``qlora``) a QLoRA step on ``batch`` (a
    left-padded answer batch of :func:`edgellm.lora.chat.answer_batches`), on copies of
    ``model`` (it is not changed).  Returns the medians, ``lora_over_forward``,
    ``qlora_over_lora``, ``step_time_repeats`` and ``step_time_batch`` ([B, T])."""
    from edgellm.lora.apply import apply_lora, apply_qlora
    from edgellm.lora.chat import answer_logits, answer_loss

    base = copy.deepcopy(model).eval()
    lora = copy.deepcopy(model)
    apply_lora(lora, rank=rank, targets=targets)
    steppers = {"lora": lora}
    if qlora:
        steppers["qlora"] = apply_qlora(copy.deepcopy(model), rank=rank, targets=targets)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
            for k, m in steppers.items()}
    for m in steppers.values():
        m.train()

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            answer_logits(base, batch)
        return time.perf_counter() - t0

    def step(key: str) -> float:
        t0 = time.perf_counter()
        loss = answer_loss(steppers[key], batch)
        opts[key].zero_grad(set_to_none=True)
        loss.backward()
        opts[key].step()
        return time.perf_counter() - t0

    forward(), [step(k) for k in steppers]          # warm-up: allocator, bitsandbytes' kernels
    runs: dict[str, list[float]] = {"forward": [], **{k: [] for k in steppers}}
    for _ in range(repeats):
        runs["forward"].append(forward())
        for k in steppers:
            runs[k].append(step(k))
    med = {k: _median(v) for k, v in runs.items()}
    out = {"seconds_forward": med["forward"], "seconds_lora_step": med["lora"],
           "lora_over_forward": med["lora"] / med["forward"],
           "step_time_repeats": repeats, "step_time_batch": list(batch["input_ids"].shape),
           "rank": rank, "targets": targets}
    if qlora:
        out.update(seconds_qlora_step=med["qlora"], qlora_over_lora=med["qlora"] / med["lora"])
    return out
