"""BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs"): ternary weights, 8-bit activations.

weights, per tensor (absmean)
    ``γ = mean|W|``,  ``W_t = clamp(round(W / (γ + ε)), −1, 1)`` ∈ {−1, 0, +1},  ``Ŵ = γ·W_t``
activations, per token (absmax, 8 bits)
    ``x̂ = clamp(round(x · 127/max|x|), −128, 127) · max|x|/127``

``log2(3) ≈ 1.58`` bits of information per weight.  Stored, a ternary weight takes 2 bits (four
codes, one unused) or 1.6 bits packed five to a byte (``3^5 = 243 ≤ 256``, llama.cpp's TQ1_0
idea); the one scale per tensor is negligible.  The paper trains from scratch; fine-tuning a
pretrained model into it needs the quantization ramped in (``λ`` of :func:`edgellm.qat.fake.ste`).
"""

from __future__ import annotations

import torch

EPS = 1e-5


@torch.no_grad()
def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, γ)``: int8 codes in {−1, 0, +1} shaped like ``w`` and the 0-d scale ``mean|w|``."""
    gamma = w.float().abs().mean()
    return (w.float() / (gamma + EPS)).round().clamp(-1, 1).to(torch.int8), gamma


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes (any shape, values −1/0/+1) → uint8, five per byte: ``Σ (c_i+1)·3^i``."""
    flat = (codes.reshape(-1).to(torch.int64) + 1)
    if flat.numel() and (flat.min() < 0 or flat.max() > 2):
        raise ValueError("pack_ternary takes codes in {-1, 0, +1}")
    pad = (-flat.numel()) % 5
    flat = torch.cat([flat, torch.ones(pad, dtype=torch.int64)])  # pad with code 0 (digit 1)
    digits = flat.reshape(-1, 5)
    powers = torch.tensor([1, 3, 9, 27, 81])
    return (digits * powers).sum(-1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_ternary`: the first ``n`` codes, int8."""
    v = packed.to(torch.int64).unsqueeze(-1)  # (m, 1)
    digits = (v // torch.tensor([1, 3, 9, 27, 81])) % 3  # (m, 5)
    return (digits.reshape(-1)[:n] - 1).to(torch.int8)


def ternary_bytes(numel: int, *, packing: str = "base3", scale_bytes: int = 2) -> int:
    """Bytes of a ternary tensor of ``numel`` weights: ``base3`` (5 per byte) or ``2bit`` (4 per
    byte), plus its one scale (fp16)."""
    per_byte = {"base3": 5, "2bit": 4}[packing]
    return -(-numel // per_byte) + scale_bytes
