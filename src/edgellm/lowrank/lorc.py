"""LoRC, low-rank compensation (Yao, Wu, Li, Youn, He, 2023, "ZeroQuant-V2: Exploring
Post-training Quantization in LLMs from Comprehensive Study to Low Rank Compensation").

Quantization leaves an error ``E = W − Q(W)`` (out, in).  LoRC stores a small rank-r
approximation of it beside the quantized weights,

    E = U Σ Vᵀ,   Û = U_r √Σ_r (out, r),   V̂ = V_r √Σ_r (in, r),   W ≈ Q(W) + Û V̂ᵀ,

so the remaining error is ``Σ_{i>r} σ_i(E)²`` (Eckart–Young on ``E``), falling with every rank
added.  The price in bits per weight, with the factors stored at ``factor_bits`` (fp16 here):

    bpw = bpw(Q) + factor_bits · r · (out + in) / (out · in)

e.g. INT3 g64 (3.5 bpw) + rank 8 on a 576×576 layer: 3.5 + 16·8·1152/331776 ≈ 3.94 bpw.  It
works on top of a quantizer's fake-quantized weights, given the weights it was asked to
approximate: :func:`apply_lorc` does a whole model, ``quantize_model(lorc_rank=K)`` /
``edgellm quantize --lorc-rank K`` after RTN, GPTQ, imatrix, GGUF types, rotation or smoothing
(not AWQ, which rescales weights and norms inside its search).  LoftQ (Li et al., 2023) alternates the same two steps (quantize, fit a low-rank error) to initialise LoRA
adapters for fine-tuning a quantized model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from edgellm.lowrank.svd import LowRankError, check_rank, svd


@torch.no_grad()
def lorc_factors(W: torch.Tensor, Q: torch.Tensor, rank: int,
                 name: str = "the quantization error"):
    """``(U, V)`` float32 with ``W ≈ Q + U @ V.T``: ``U`` (out, r), ``V`` (in, r), the best
    rank-``rank`` approximation of the quantization error ``E = W − Q``.  ``name`` (the layer)
    is what an impossible rank's error message names."""
    if W.shape != Q.shape or W.dim() != 2:
        raise LowRankError(f"W {tuple(W.shape)} and Q {tuple(Q.shape)} must be the same 2-D "
                           "(out, in) shape: Q is W after (fake) quantization")
    check_rank(*W.shape, rank, name)
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


@dataclass
class LoRCResult:
    """What :func:`apply_lorc` did: ``factors`` ``{name: (U, V)}`` and a JSON-ready ``info``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    info: dict


def check_lorc_rank(rank: int, shapes: dict[str, tuple[int, int]] | None = None) -> None:
    """A LoRC rank must be an integer ≥ 0 (0 = off) and below ``min(out, in)`` of every linear
    in ``shapes`` (``{name: (out, in)}``); the error names the first layer it does not fit."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise LowRankError(f"LoRC rank={rank!r} must be an integer ≥ 0 (0 = no LoRC; e.g. 16)")
    for name, (m, n) in (shapes or {}).items():
        if rank and rank >= min(m, n):
            limit = min(min(a, b) for a, b in shapes.values())
            raise LowRankError(
                f"LoRC rank {rank} ≥ min(out, in) = {min(m, n)} of {name} ({m}×{n}); the error "
                f"W − Q of that layer has no more than {min(m, n)} singular values. Use a rank "
                f"below {limit} (the smallest min(out, in) of this model's linears), e.g. 16")


@torch.no_grad()
def apply_lorc(model, reference_weights, rank: int, *, factor_bits: int = 16) -> LoRCResult:
    """LoRC on a (fake-)quantized ``model``: for each linear of ``reference_weights``, fit a
    rank-``rank`` approximation ``U Vᵀ`` of ``W − Q`` and add it to the weight (the model holds
    ``Q + U Vᵀ``; a real format keeps ``Q``'s codes and ``U``, ``V`` at ``factor_bits``).

    ``reference_weights``: the unquantized model, or ``{name: W}`` (out, in) per linear (the
    weights the quantizer was given, in the model's basis).  ``rank`` 0 changes nothing.
    ``info``: ``rank``, ``n_layers``, ``lorc_params``, ``lorc_bytes`` (the factors stored at
    ``factor_bits``), ``bpw_added`` (bits per weight the factors add over these linears),
    ``error_before`` / ``error_after`` (Σ of ‖·‖²_F over the layers), ``seconds_lorc``.
    """
    from edgellm.models import linear_layers

    t0 = time.perf_counter()
    if isinstance(reference_weights, torch.nn.Module):
        reference_weights = {n: m.weight for n, m in linear_layers(reference_weights).items()}
    lins = linear_layers(model)
    missing = [n for n in reference_weights if n not in lins]
    if missing:
        raise LowRankError(f"reference weights for {missing[:3]} have no linear in the model")
    check_lorc_rank(rank, {n: tuple(W.shape) for n, W in reference_weights.items()})
    factors, extra, total, before, after = {}, 0, 0, 0.0, 0.0
    for name, W in reference_weights.items():
        lin = lins[name]
        Q = lin.weight.detach().float()
        W = W.detach().float()
        err = float((W.double() - Q.double()).square().sum())
        before += err
        if rank:
            U, V = lorc_factors(W, Q, rank, name)  # (out, r), (in, r)
            lin.weight.copy_((Q + U @ V.T).to(lin.weight.dtype))
            factors[name] = (U, V)
            extra += U.numel() + V.numel()
            err = float((W.double() - lin.weight.double()).square().sum())
        after += err
        total += W.numel()
    info = {"rank": rank, "n_layers": len(reference_weights), "lorc_params": extra,
            "lorc_bytes": extra * factor_bits // 8, "factor_bits": factor_bits,
            "bpw_added": factor_bits * extra / max(total, 1), "error_before": before,
            "error_after": after, "seconds_lorc": time.perf_counter() - t0}
    return LoRCResult(factors, info)


def lorc_size(rec: dict, lorc: dict | None, n_params: int) -> dict:
    """``n_params``, ``bpw``, ``bpw_model`` and ``size_bytes`` of a quantized model with LoRC's
    factors (``lorc``: :func:`apply_lorc`'s info, ``None`` = no LoRC)
    counted beside the packed codes at their stored precision (bits per original weight);
    ``bpw_quant`` is the quantizer's own bpw.  ``rec`` holds :func:`edgellm.quant.size.model_size`'s keys."""
    if not lorc or not lorc["lorc_params"]:
        return {"n_params": n_params, "lorc_params": 0, "bpw_quant": rec["bpw"]}
    extra = lorc["lorc_bytes"]
    lin = rec["size_bytes_linears"] + extra
    size = rec["size_bytes"] + extra
    return {"n_params": n_params + lorc["lorc_params"], "lorc_params": lorc["lorc_params"],
            "bpw_quant": rec["bpw"], "bpw": 8 * lin / rec["n_quantized"],
            "bpw_model": 8 * size / (rec["n_quantized"] + rec["n_unquantized"]),
            "size_bytes": size, "size_bytes_linears": lin}
