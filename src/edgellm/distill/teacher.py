"""What the teacher costs: full-vocabulary logits or a cached top-k with a tail bucket.

A full teacher distribution is V floats per token (49,152 × 4 bytes ≈ 192 KiB for SmolLM2): a
40-step run of 4 × 256 tokens would need 7.5 GiB to cache.  Keeping the k largest
log-probabilities and their ids (k × (4 + 4) bytes, 512 bytes at k = 64) plus one bucket for the
rest of the mass costs a small, measurable KL error (:func:`truncation_kl`).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from edgellm.distill.losses import DistillError, check_temperature


def check_top_k(k: int, vocab_size: int) -> int:
    if not 0 < int(k) <= vocab_size:
        raise DistillError(f"top-k {k}: keep between 1 and the vocabulary size {vocab_size} "
                           "teacher log-probs per token (64 is the usual trade)")
    return int(k)


def bytes_per_token(vocab_size: int, k: int | None = None) -> int:
    """Teacher memory per token: ``V · 4`` for fp32 logits, ``k · (4 + 4)`` for top-k
    (fp32 log-prob + int32 id; the tail bucket is implied by the log-probs)."""
    return vocab_size * 4 if k is None else k * 8


def topk_of_logits(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """``(logprobs, indices)`` (…, k): the k largest teacher log-probs at ``temperature``
    (fp32) and their token ids (int32)."""
    T = check_temperature(temperature)
    check_top_k(k, teacher_logits.shape[-1])
    logp = F.log_softmax(teacher_logits.float() / T, dim=-1)  # (…, V)
    vals, idx = logp.topk(k, dim=-1)  # (…, k)
    return vals, idx.to(torch.int32)


@torch.no_grad()
def teacher_topk(teacher, batch: torch.Tensor, *, k: int = 64, temperature: float = 1.0):
    """The teacher's top-k log-probs and ids on ``batch`` (B, T) token ids: two (B, T, k)
    tensors (fp32, int32)."""
    logits = teacher(input_ids=batch, use_cache=False).logits  # (B, T, V)
    return topk_of_logits(logits, k, temperature=temperature)


def truncation_kl(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p ‖ p̂) (…,) between the full teacher distribution and its top-k + tail
    version p̂ (the top-k probabilities kept, the tail mass spread over the other ids in
    proportion to p): the information the cache throws away.

    With the tail spread proportionally the KL is exactly 0 (p̂ = p); what the top-k cache
    loses is the *shape* of the tail, so the error reported is KL(p ‖ p̃) with the tail spread
    *uniformly*, which is what a loss that only sees the bucket cannot tell apart.
    """
    T = check_temperature(temperature)
    V = teacher_logits.shape[-1]
    check_top_k(k, V)
    logp = F.log_softmax(teacher_logits.float() / T, dim=-1)  # (…, V)
    vals, idx = logp.topk(k, dim=-1)
    tail = (1.0 - vals.exp().sum(-1, keepdim=True)).clamp(min=0.0)  # (…, 1)
    if k == V:
        return torch.zeros(logp.shape[:-1])
    q = torch.log(tail / (V - k)).clamp(min=-1e4).expand_as(logp).clone()  # uniform tail
    q.scatter_(-1, idx, vals)
    return (logp.exp() * (logp - q)).sum(-1)


def step_times(student, teacher, batch: torch.Tensor, *, temperature: float = 1.0,
               top_k: int = 64, lr: float = 1e-4, repeats: int = 3) -> dict:
    """Seconds of one training step on ``batch`` (B, T), each the median of ``repeats``, in one
    run (on copies: the student is not changed):

    ``seconds_teacher_forward``  the teacher's forward (no grad)
    ``seconds_student_step``     a student step with cross-entropy (forward, backward, AdamW)
    ``seconds_kd_step``          a forward-KL step with the live teacher
    ``seconds_kd_step_topk``     a forward-KL step against the precomputed top-k (tail bucket)

    and the ratios the benchmark asks for: ``kd_overhead`` = kd step / (student step + teacher
    forward) (1 = no hidden cost), ``topk_speedup`` = kd step / top-k step, and its ceiling
    ``topk_speedup_ceiling`` = (student step + teacher forward) / student step.
    """
    from edgellm.distill.losses import forward_kl, topk_forward_kl

    model = copy.deepcopy(student)
    for name, p in model.named_parameters():
        p.requires_grad_(not ("embed" in name or "lm_head" in name))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    lp, idx = teacher_topk(teacher, batch, k=top_k, temperature=temperature)

    def step(loss_of):
        t0 = time.perf_counter()
        loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    def teacher_forward():
        t0 = time.perf_counter()
        with torch.no_grad():
            z = teacher(input_ids=batch, use_cache=False).logits
        return time.perf_counter() - t0, z

    def kd():
        _, z_t = teacher_forward()
        return forward_kl(model(input_ids=batch, use_cache=False).logits, z_t, temperature=temperature)

    runs = {"teacher": [], "student": [], "kd": [], "topk": []}
    for _ in range(repeats):  # interleaved, so a change of machine load hits all four alike
        runs["teacher"].append(teacher_forward()[0])
        runs["student"].append(step(lambda: model(input_ids=batch, labels=batch,
                                                  use_cache=False).loss))
        runs["kd"].append(step(kd))
        runs["topk"].append(step(lambda: topk_forward_kl(
            model(input_ids=batch, use_cache=False).logits, lp, idx, temperature=temperature)))
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    return {"seconds_teacher_forward": med["teacher"], "seconds_student_step": med["student"],
            "seconds_kd_step": med["kd"], "seconds_kd_step_topk": med["topk"],
            "kd_overhead": med["kd"] / (med["student"] + med["teacher"]),
            "topk_speedup": med["kd"] / med["topk"],
            "topk_speedup_ceiling": (med["student"] + med["teacher"]) / med["student"],
            "step_time_repeats": repeats, "step_time_batch": list(batch.shape)}
