"""``QTensor``: a quantized weight matrix as integer codes plus per-group scales (and offsets).

This is the *simulated* side's bookkeeping: codes are kept one per int8/int16 element so they are
easy to inspect.  The real storage (codes bit-packed into bytes, scales in fp16) lives in
:mod:`edgellm.quant.pack` and :mod:`edgellm.quant.save`; ``size_bytes`` is what that storage takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgellm.errors import EdgeLLMError
from edgellm.quant.size import bpw


class QuantError(EdgeLLMError, ValueError):
    """Bad quantization input: unsupported bits, a group size that does not divide the rows,
    NaN/Inf weights, an empty calibration set."""


def dtype_bits(dtype: torch.dtype | None) -> int:
    """Bits of one stored scale/offset: 16 for fp16/bf16, 32 for fp32 (``None`` = fp32)."""
    if dtype is None:
        return 32
    return torch.finfo(dtype).bits


@dataclass
class QTensor:
    """A quantized ``(out_features, in_features)`` matrix.

    ``codes``  (out, in) int8/int16 integer codes (signed when ``sym``, 0 … 2**bits-1 otherwise)
    ``scale``  (out, n_groups) float32 (values representable in ``scale_dtype``)
    ``offset`` (out, n_groups) float32, zeros when ``sym`` (then not stored)
    ``w_hat = codes * scale + offset`` broadcast over each group of ``group_size`` columns.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int
    sym: bool = False
    fmt: str = "int"
    scale_bits: int = 16  # bits of each stored scale (16 = fp16)
    offset_bits: int | None = None  # bits of each stored offset; None: same as scale, 0 if sym
    levels: torch.Tensor | None = None  # lookup table (NF4, FP4, FP8, MXFP4): value = levels[code]

    @property
    def n_groups(self) -> int:
        """Number of (scale, offset) pairs per row (per tensor: a single one overall)."""
        return self.shape[1] // self.group_size if self.group_size <= self.shape[1] else 1

    @property
    def n_params(self) -> int:
        """Number of stored scales (= offsets when asymmetric)."""
        return self.scale.numel()

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def _offset_bits(self) -> int:
        if self.sym:
            return 0
        return self.scale_bits if self.offset_bits is None else self.offset_bits

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in) ``w_hat``."""
        out, n = self.shape
        q = self.codes if self.levels is None else self.levels[self.codes.long()]
        G = self.scale.shape[-1] if self.scale.dim() else 1
        q = q.reshape(self.scale.shape[0], G, -1).float()  # (out, G, g); per tensor: (1, 1, out*in)
        w = q * self.scale.unsqueeze(-1) + self.offset.unsqueeze(-1)
        return w.reshape(out, n)

    @property
    def bpw(self) -> float:
        """Bits per weight including the scales and offsets: ``bits + (s + o) / group_size``."""
        return bpw(self.bits, self.numel / self.n_params, self.scale_bits, self._offset_bits)

    @property
    def size_bytes(self) -> int:
        """Bytes of the packed storage: codes packed row-contiguously, then scales, offsets."""
        code_bytes = math.ceil(self.numel * self.bits / 8)
        return code_bytes + math.ceil(self.n_params * (self.scale_bits + self._offset_bits) / 8)

    def __repr__(self) -> str:
        kind = "sym" if self.sym else "asym"
        return (f"QTensor({self.fmt}{self.bits} {kind}, shape={self.shape}, "
                f"group_size={self.group_size}, bpw={self.bpw:.4g})")
