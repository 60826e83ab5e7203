"""LoRC, low-rank compensation (Yao, Wu, Li, Youn, He, 2023, "ZeroQuant-V2: Exploring
Post-training Quantization in LLMs from Comprehensive Study to Low Rank Compensation").

Quantization leaves an error ``E = W − Q(W)`` (out, in).  LoRC stores a small rank-r
approximation of it beside the quantized weights,

    E = U Σ Vᵀ,   Û = U_r √Σ_r (out, r),   V̂ = V_r √Σ_r (in, r),   W ≈ Q(W) + Û V̂ᵀ,

so the remaining error is ``Σ_{i>r} σ_i(E)²`` (Eckart–Young on ``E``), falling with every rank
added.  The price in bits per weight, with the factors stored at ``factor_bits`` (fp16 here):

    bpw = bpw(Q) + factor_bits · r · (out + in) / (out · in)

e.g. INT3 g64 (3.5 bpw) + rank 8 on a 576×576 layer: 3.5 + 16·8·1152/331776 ≈ 3.94 bpw.  It
works on top of any quantizer's (fake-quantized) weights: RTN, GPTQ, AWQ…  LoftQ (Li et al.,
2023) alternates the same two steps (quantize, fit a low-rank error) to initialise LoRA
adapters for fine-tuning a quantized model.
"""

from __future__ import annotations

import torch

from edgellm.lowrank.svd import LowRankError, check_rank, svd


@torch.no_grad()
def lorc_factors(W: torch.Tensor, Q: torch.Tensor, rank: int):
    """``(U, V)`` float32 with ``W ≈ Q + U @ V.T``: ``U`` (out, r), ``V`` (in, r), the best
    rank-``rank`` approximation of the quantization error ``E = W − Q``."""
    if W.shape != Q.shape or W.dim() != 2:
        raise LowRankError(f"W {tuple(W.shape)} and Q {tuple(Q.shape)} must be the same 2-D "
                           "(out, in) shape: Q is W after (fake) quantization")
    check_rank(*W.shape, rank, "the quantization error")
    U, S, Vh = svd(W.double() - Q.double())  # E = U Σ Vᵀ
    s = S[:rank].sqrt()  # (r,)
    return (U[:, :rank] * s).float(), (Vh[:rank].T * s).float()


def lorc_error(W: torch.Tensor, Q: torch.Tensor, U: torch.Tensor | None = None,
               V: torch.Tensor | None = None) -> float:
    """``‖W − Q − U Vᵀ‖_F`` (or ``‖W − Q‖_F`` without factors)."""
    E = W.double() - Q.double()
    if U is not None:
        E = E - U.double() @ V.double().T
    return float(torch.linalg.matrix_norm(E))


def lorc_bpw(out_features: int, in_features: int, rank: int, base_bpw: float,
             factor_bits: int = 16) -> float:
    """Bits per weight of ``Q`` plus the two LoRC factors stored at ``factor_bits``:
    ``base_bpw + factor_bits · r · (out + in) / (out · in)``."""
    if rank < 0:
        raise LowRankError(f"rank={rank} must be ≥ 0")
    return base_bpw + factor_bits * rank * (out_features + in_features) / (
        out_features * in_features)
