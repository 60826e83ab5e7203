"""Learned step size quantization (LSQ; Esser et al., ICLR 2020): the step ``s`` of each group
is a parameter trained with the weights.

    w_q = round_ste(clamp(w / s, −Q_N, Q_P)) · s          Q_N = 2^(b−1), Q_P = 2^(b−1) − 1

``∂w_q/∂s`` is ``−w/s + round(w/s)`` inside the range and ``∓Q`` outside, so ``s`` learns to trade
clipping error against rounding error: the trained counterpart of lesson 04's learnable clipping
(LWC, OmniQuant), which learns a clip strength per group post-training, block by block, with
the weights frozen.  The step's gradient is scaled by ``g = 1/sqrt(N·Q_P)`` (``N`` weights per
step) so it moves at the weights' pace (the paper's rule); the initial step is the paper's
``2·mean|w| / sqrt(Q_P)`` per group.
"""

from __future__ import annotations

import math

import torch

from edgellm.qat.fake import grad_scale, round_ste


def qrange(bits: int) -> tuple[int, int]:
    """``(Q_N, Q_P)``: the codes are ``−Q_N … Q_P`` (signed, full range)."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def init_step(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The initial step per (row, group): ``2·mean|w| / sqrt(Q_P)``, shape (out, n_groups)."""
    out, n = w.shape
    g = w.detach().float().reshape(out, n // group_size, group_size)
    return (2 * g.abs().mean(-1) / math.sqrt(qrange(bits)[1])).clamp(min=1e-8)


def lsq_quantize(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` (out, in) through LSQ with steps ``s`` (out, n_groups): differentiable in both."""
    out, n = w.shape
    qn, qp = qrange(bits)
    gsz = n // s.shape[1]
    step = grad_scale(s, 1.0 / math.sqrt(gsz * qp)).unsqueeze(-1)  # (out, G, 1)
    wg = w.reshape(out, n // gsz, gsz)
    return (round_ste((wg / step).clamp(-qn, qp)) * step).reshape(out, n)


@torch.no_grad()
def lsq_codes(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes (int8, −Q_N … Q_P) of ``w`` with steps ``s``."""
    out, n = w.shape
    qn, qp = qrange(bits)
    gsz = n // s.shape[1]
    q = (w.float().reshape(out, n // gsz, gsz) / s.unsqueeze(-1)).round().clamp(-qn, qp)
    return q.reshape(out, n).to(torch.int8)
