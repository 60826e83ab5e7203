"""Bit packing: store b-bit codes (b = 1…8) densely in bytes, and unpack them bit-exactly.

Codes are written as one little-endian bit stream: code ``i`` occupies bits ``i*b … i*b+b-1``
(bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``).  So 4-bit codes go two per byte
(first code in the low nibble), 2-bit codes four per byte, and 3-bit codes eight per three bytes,
some straddling a byte boundary.  ``n`` codes take ``ceil(n * b / 8)`` bytes, which is what
:attr:`QTensor.size_bytes` counts.  Signed codes are stored offset by ``2**(b-1)``.
"""

from __future__ import annotations

import math

import torch

from edgellm.quant.qtensor import QuantError


def packed_nbytes(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes * bits / 8)


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise QuantError(f"can pack 1–8-bit codes, not bits={bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in 0 … 2**bits-1) into a uint8 tensor of
    ``ceil(numel * bits / 8)`` bytes (flattened order)."""
    _check(bits)
    c = codes.reshape(-1).to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2 ** bits):
        raise QuantError(f"codes must lie in 0…{2 ** bits - 1} to pack into {bits} bits "
                         f"(got {int(c.min())}…{int(c.max())}); offset signed codes first")
    n = c.numel()
    # 8 codes of b bits are exactly b bytes: build one 64-bit word per 8 codes, then cut it
    c = torch.cat([c, c.new_zeros((-n) % 8)]).reshape(-1, 8)  # (words, 8)
    word = torch.zeros(len(c), dtype=torch.int64)
    for k in range(8):
        word |= c[:, k] << (k * bits)  # code k at bits k*b … k*b+b-1 of the word
    shifts = 8 * torch.arange(bits, dtype=torch.int64)
    packed = ((word.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8)  # (words, b) little endian
    return packed.reshape(-1)[: packed_nbytes(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as int32 (values 0 … 2**bits-1)."""
    _check(bits)
    if packed.numel() < packed_nbytes(n, bits):
        raise QuantError(f"{packed.numel()} bytes cannot hold {n} codes of {bits} bits")
    p = packed.reshape(-1)[: packed_nbytes(n, bits)].to(torch.int64)
    p = torch.cat([p, p.new_zeros((-p.numel()) % bits)]).reshape(-1, bits)  # (words, b)
    word = torch.zeros(len(p), dtype=torch.int64)
    for j in range(bits):
        word |= p[:, j] << (8 * j)
    shifts = bits * torch.arange(8, dtype=torch.int64)
    codes = (word.unsqueeze(1) >> shifts) & (2 ** bits - 1)  # (words, 8)
    return codes.reshape(-1)[:n].to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack signed (offset by ``2**(bits-1)``) or unsigned codes."""
    c = codes.to(torch.int32)
    return pack_bits(c + 2 ** (bits - 1) if signed else c, bits)


def unpack_codes(packed: torch.Tensor, bits: int, n: int, signed: bool) -> torch.Tensor:
    c = unpack_bits(packed, bits, n)
    return c - 2 ** (bits - 1) if signed else c
