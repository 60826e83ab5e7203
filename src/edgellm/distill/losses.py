"""Distillation losses on logits: pure tensor functions, no model.

Logits are ``(B, T, V)`` or ``(N, V)`` float tensors; ``mask`` (optional) is a bool tensor of the
leading shape (``(B, T)`` or ``(N,)``) saying which positions are scored.  Every loss returns a
0-d tensor: the mean over scored positions of a per-position divergence summed over the
vocabulary.

    forward KL   T² · KL(p_T ‖ p_S)              mode covering   (Hinton et al., 2015)
    reverse KL   T² · KL(p_S ‖ p_T)              mode seeking    (MiniLLM, Gu et al., 2024)
    skew KL      KL(p_T ‖ α p_T + (1−α) p_S)     bounded         (DistiLLM, Ko et al., 2024)

with ``p = softmax(z / T)``.  The ``T²`` factor keeps the gradient's scale independent of the
temperature: ``∂ KL(p_T‖p_S) / ∂ z_S = (p_S − p_T) / T``, so ``T² · KL`` has gradient
``T · (p_S − p_T)`` per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgellm.errors import EdgeLLMError


class DistillError(EdgeLLMError, ValueError):
    """Distillation settings or inputs that cannot be used; the message says what to do."""


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0:
        raise DistillError(f"temperature={temperature} must be > 0 (1 is the plain softmax; "
                           "Hinton et al. use 1-20)")
    return t


def masked_mean(per_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_pos`` (leading shape) over the positions where ``mask`` is True."""
    if mask is None:
        return per_pos.mean()
    mask = mask.to(per_pos.device).bool()
    if mask.shape != per_pos.shape:
        raise DistillError(f"mask has shape {tuple(mask.shape)}, the logits' positions "
                           f"{tuple(per_pos.shape)}; give one bool per position")
    return (per_pos * mask).sum() / mask.sum().clamp(min=1)


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise DistillError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: white-box KD needs the same vocabulary and "
            "positions (use --loss seqkd for a teacher with another tokenizer)")


def forward_kl(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """``T² · KL(p_T ‖ p_S)`` per position, averaged over scored positions: a 0-d tensor."""
    _check_pair(student_logits, teacher_logits)
    T = check_temperature(temperature)
    log_s = F.log_softmax(student_logits.float() / T, dim=-1)  # (…, V)
    log_t = F.log_softmax(teacher_logits.float() / T, dim=-1)  # (…, V)
    # Σ p_T (log p_T − log p_S) in one fused op: fewer (…, V) temporaries kept for backward
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # (…,)
    return T * T * masked_mean(kl, mask)


def reverse_kl(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """``T² · KL(p_S ‖ p_T)``: the student is penalised for mass where the teacher has none."""
    _check_pair(student_logits, teacher_logits)
    T = check_temperature(temperature)
    log_s = F.log_softmax(student_logits.float() / T, dim=-1)  # (…, V)
    log_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)  # (…,)
    return T * T * masked_mean(kl, mask)


def skew_kl(student_logits, teacher_logits, *, alpha: float = 0.1, temperature: float = 1.0,
            mask=None):
    """``KL(p_T ‖ α p_T + (1−α) p_S)`` (DistiLLM's skew KL): bounded by ``−log α``, and equal to
    forward KL at ``α = 0``."""
    _check_pair(student_logits, teacher_logits)
    T = check_temperature(temperature)
    if not 0.0 <= alpha < 1.0:
        raise DistillError(f"alpha={alpha}: the skew weight must be in [0, 1)")
    log_s = F.log_softmax(student_logits.float() / T, dim=-1)  # (…, V)
    log_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    if alpha == 0.0:
        log_mix = log_s
    else:  # log(α p_T + (1−α) p_S) without leaving log space
        log_mix = torch.logaddexp(log_t + torch.log(torch.tensor(alpha)),
                                  log_s + torch.log1p(torch.tensor(-alpha)))
    kl = (log_t.exp() * (log_t - log_mix)).sum(-1)
    return masked_mean(kl, mask)


def topk_forward_kl(student_logits, topk_logprobs, topk_indices, *, temperature: float = 1.0,
                    mask=None):
    """Forward KL against a teacher kept as its top-k log-probs plus one tail bucket.

    ``topk_logprobs`` (…, k) the teacher's largest log-probabilities (at ``temperature``),
    ``topk_indices`` (…, k) their token ids.  The teacher's tail mass is ``1 − Σ_k p_T``; the
    student's tail is its mass outside the same k ids.  The divergence is the KL between these
    two (k+1)-outcome distributions, times ``T²``; it equals :func:`forward_kl` when k = V.
    """
    T = check_temperature(temperature)
    if topk_logprobs.shape != topk_indices.shape or \
            topk_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise DistillError(f"top-k log-probs {tuple(topk_logprobs.shape)}, indices "
                           f"{tuple(topk_indices.shape)} and student logits "
                           f"{tuple(student_logits.shape)} do not match")
    log_s = F.log_softmax(student_logits.float() / T, dim=-1)  # (…, V)
    log_s_k = log_s.gather(-1, topk_indices.long())  # (…, k) student log-probs on teacher's ids
    log_t_k = topk_logprobs.float()  # (…, k)
    t_k = log_t_k.exp()
    t_tail = (1.0 - t_k.sum(-1)).clamp(min=0.0)  # (…,) teacher mass outside the top k
    s_tail = (1.0 - log_s_k.exp().sum(-1)).clamp(min=1e-12)  # (…,) student mass outside them
    kl_k = (t_k * (log_t_k - log_s_k)).sum(-1)  # (…,)
    # 0·log 0 = 0: at k = V (or a teacher with no tail) the bucket adds nothing
    kl_tail = torch.xlogy(t_tail, t_tail) - t_tail * torch.log(s_tail)
    return T * T * masked_mean(kl_k + kl_tail, mask)


def hidden_loss(student_hidden, teacher_hidden, *, kind: str = "mse", mask=None):
    """Mean over the given pairs of a per-token distance between hidden states.

    ``student_hidden`` / ``teacher_hidden``: equally long lists of (B, T, C) tensors, already
    paired (student layer i ↔ the teacher layer it replaces) and already normalised if wanted.
    ``kind="mse"``: mean squared difference per channel; ``"cosine"``: ``1 − cos``.
    """
    if kind not in ("mse", "cosine"):
        raise DistillError(f"hidden kind {kind!r}: use mse or cosine")
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise DistillError(f"{len(student_hidden)} student and {len(teacher_hidden)} teacher "
                           "hidden states: give equally long, non-empty lists of pairs")
    total = 0.0
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        if kind == "mse":
            per = (hs.float() - ht.float()).square().mean(-1)  # (B, T)
        else:
            per = 1.0 - F.cosine_similarity(hs.float(), ht.float(), dim=-1)  # (B, T)
        total = total + masked_mean(per, mask)
    return total / len(student_hidden)


def ce_loss(student_logits, targets, *, mask=None):
    """Next-token cross-entropy: ``student_logits`` (B, T, V) predict ``targets`` (B, T) shifted
    by one (position t predicts token t+1); ``mask`` (B, T) marks the scored targets."""
    logits = student_logits[:, :-1].float()  # (B, T-1, V)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
                          reduction="none").view(targets.shape[0], -1)  # (B, T-1)
    return masked_mean(nll, None if mask is None else mask[:, 1:])


def entropy(logits, *, mask=None):
    """Mean entropy (nats) of ``softmax(logits)`` over scored positions."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(log_p.exp() * log_p).sum(-1), mask)
