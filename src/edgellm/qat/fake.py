"""Fake quantization and the straight-through estimator (STE).

Quantization-aware training keeps fp32 "latent" weights ``w`` and uses their quantized values
``q(w)`` in the forward pass.  ``round`` has zero gradient almost everywhere, so the backward pass
pretends the quantizer is the identity (Bengio et al., 2013; Jacob et al., 2018):

    w_eff = w + λ · (q(w) − w).detach()          forward: (1−λ)·w + λ·q(w)     backward: ∂/∂w = 1

``λ`` = 1 is the plain STE; rising from 0 to 1 it ramps the quantization in, as published for
fine-tuning a pretrained model to 1.58 bits (Hugging Face, "Fine-tuning LLMs to 1.58bit", 2024).

The weight quantizers here are the course's own grids, so a model trained through them deploys
bit for bit: ``minmax`` is lesson 03's RTN grid (:func:`edgellm.quant.rtn.fake_quantize`, fp16
scale and offset per group), ``q4_0`` is llama.cpp's Q4_0 (:func:`edgellm.quant.gguf_formats.
quantize_gguf`), ``ternary`` BitNet b1.58's absmean (:mod:`edgellm.qat.bitnet`).
"""

from __future__ import annotations

import torch

from edgellm.errors import EdgeLLMError

#: the weight grids QAT trains through
GRIDS = ("minmax", "q4_0", "ternary")


class QATError(EdgeLLMError, ValueError):
    """QAT settings that cannot be used; the message says what to do."""


def ste(x: torch.Tensor, x_q: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``x + λ·(x_q − x).detach()``: the value of ``(1−λ)x + λ·x_q``, the gradient of ``x``."""
    return x + lam * (x_q - x).detach()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (LSQ's ``round_pass``)."""
    return x + (x.round() - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``g`` backward (LSQ's ``grad_scale``)."""
    return (x - x * g).detach() + x * g


@torch.no_grad()
def quantize_weight(w: torch.Tensor, *, grid: str = "minmax", bits: int = 2,
                    group_size: int | None = 64) -> torch.Tensor:
    """``q(w)``: ``w`` (out, in) rounded onto ``grid``, float32, no gradient."""
    if grid == "minmax":
        from edgellm.quant.rtn import fake_quantize

        return fake_quantize(w, bits, group_size, sym=False)
    if grid == "q4_0":
        from edgellm.quant.gguf_formats import quantize_gguf

        return quantize_gguf(w, "Q4_0").dequantize()
    if grid == "ternary":
        from edgellm.qat.bitnet import absmean_ternary

        codes, gamma = absmean_ternary(w)
        return codes.float() * gamma
    raise QATError(f"grid={grid!r}: use one of {', '.join(GRIDS)}")


def absmax_act(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token absmax quantization of activations ``x`` (..., d) to signed ``bits``, float32,
    no gradient: ``s = (2^(b−1) − 1)/max|x|``, ``round(x·s)`` clamped to the code range, ``/ s``
    (BitNet's activation quantizer)."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        s = qmax / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)  # (..., 1)
        return (x * s).round().clamp(-qmax - 1, qmax) / s
