"""Q4_0, llama.cpp's 4-bit weight format, the two ways of packing its codes into bytes, and the
W4A32 matrix-vector product of decoding written with torch ops only.

The grid is llama.cpp's ``quantize_row_q4_0_ref`` (ggml-quants.c), followed to the bit so that
our codes are llama.cpp's: ``W`` (N, K) is cut into groups of 32 consecutive weights along K; in
each group the weight of largest magnitude, *with its sign*, is ``m`` and the scale is
``d = m / -8`` (stored as fp16);  codes ``q = min(15, trunc(w · (1/d) + 8.5))`` lie in 0..15 and
``w ≈ d · (q − 8)``.  The extreme weight lands on code 0 exactly (``−8·d = m``), so the
asymmetric 16th level (+7·d on the other side) goes where the largest weight is not.  The scale
is computed from the fp32 ``d`` and rounded to fp16 afterwards, as llama.cpp does; dequantizing
uses the fp16 scale.

Two layouts of the same codes, half a byte per weight (plus 2 bytes of scale per 32 weights:
4.5 bits per weight, 18 bytes per group, as llama.cpp's ``block_q4_0``):

* **row** (:func:`pack_rows`): byte ``j`` of a row holds ``q[2j]`` in the low nibble and
  ``q[2j+1]`` in the high one, the order a reader would write first.  Unpacking gives codes in
  the order (0, 1), (2, 3), ...: the even and odd columns of ``x`` must be gathered apart.
* **interleaved** (:func:`pack_interleaved`, llama.cpp's ``block_q4_0.qs``): within each group
  of 32, byte ``j`` holds ``q[j]`` low and ``q[j+16]`` high.  One 16-byte load then gives all 32
  codes in order with one mask (``& 0x0F``: codes 0..15) and one shift (``>> 4``: 16..31), next
  to 32 contiguous floats of ``x``: what a SIMD kernel wants.  AWQ's TinyChat (Lin et al., 2024)
  and MNN reorder their int4 weights offline for the same reason.

Decoding at batch 1 computes ``y = W x`` once per layer per token: every byte of the weights is
read once for 2 FLOPs per weight, so the speed is set by how fast the packed bytes stream from
DRAM, not by arithmetic (see :mod:`edgellm.deploy.roofline`).  The variants here and in
:mod:`edgellm.kernels.cpp` compute the same product; :func:`dense_reference` is what they must
equal.
"""

from __future__ import annotations

import torch

from edgellm.errors import EdgeLLMError

QK = 32  # weights per Q4_0 group (llama.cpp's QK4_0)


class KernelError(EdgeLLMError, ValueError):
    """A shape or setting no kernel can run (K not a multiple of 32, an unknown variant, ...)."""


def check_shape(n: int, k: int) -> None:
    """``(N, K)`` of a weight matrix in Q4_0: both positive, ``K`` a multiple of 32."""
    if n < 1 or k < 1:
        raise KernelError(f"shape {n}x{k}: give positive sizes N x K")
    if k % QK:
        lo, hi = k // QK * QK, (k // QK + 1) * QK
        raise KernelError(f"K={k} is not a multiple of {QK} (Q4_0 groups 32 weights along K); "
                          f"use {lo or hi} or {hi}")


def quantize_q4_0(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (N, K) float → ``(codes, scales)``: codes (N, K) uint8 in 0..15, scales (N, K/32)
    float16, with ``w ≈ scale · (code − 8)``: llama.cpp's Q4_0 grid, bit for bit, as
    :func:`edgellm.quant.gguf_formats.quantize_gguf` computes it (its codes are −8..7)."""
    from edgellm.quant.gguf_formats import quantize_gguf

    N, K = W.shape
    check_shape(N, K)
    qt = quantize_gguf(W, "Q4_0")
    return (qt.codes.to(torch.int16) + 8).to(torch.uint8), qt.scale.to(torch.float16)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``codes`` (N, K) uint8, ``scales`` (N, K/32) fp16 → W (N, K) float32 = d·(q − 8)."""
    N, K = codes.shape
    q = codes.reshape(N, K // QK, QK).float() - 8                     # (N, G, 32)
    return (q * scales.float().unsqueeze(-1)).reshape(N, K)


def dense_reference(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dequantize(codes, scales) @ x`` in float64, returned as float32 (N,): what every
    variant must reproduce up to float32 rounding."""
    return (dequantize(codes, scales).double() @ x.double()).float()


# --------------------------------------------------------------------------------------------
# packing: two codes per byte


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` (N, K) uint8 → (N, K/2) uint8: byte j = ``q[2j] | q[2j+1] << 4``."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: (N, K/2) uint8 → codes (N, K) uint8."""
    N, H = packed.shape
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(N, 2 * H)


def pack_interleaved(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` (N, K) uint8 → (N, K/2) uint8 in llama.cpp's ``block_q4_0.qs`` order: in each
    group of 32, byte j = ``q[j] | q[j+16] << 4``."""
    N, K = codes.shape
    g = codes.reshape(N, K // QK, QK)                                  # (N, G, 32)
    return (g[..., :QK // 2] | (g[..., QK // 2:] << 4)).reshape(N, K // 2)


def unpack_interleaved(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_interleaved`: (N, K/2) uint8 → codes (N, K) uint8."""
    N, H = packed.shape
    g = packed.reshape(N, H // (QK // 2), QK // 2)                    # (N, G, 16)
    return torch.cat([g & 0x0F, g >> 4], dim=-1).reshape(N, 2 * H)


def q4_0_blocks(packed_interleaved: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The bytes of a llama.cpp Q4_0 tensor: per group, the fp16 scale (2 bytes, little-endian)
    then the 16 interleaved code bytes: (N, K/32 · 18) uint8."""
    N, H = packed_interleaved.shape
    d = scales.contiguous().view(torch.uint8).reshape(N, -1, 2)       # (N, G, 2)
    qs = packed_interleaved.reshape(N, H // (QK // 2), QK // 2)        # (N, G, 16)
    return torch.cat([d, qs], dim=-1).reshape(N, -1)


def packed_bytes(n: int, k: int) -> int:
    """Bytes a GEMV reads for a Q4_0 (N, K) matrix: codes, fp16 scales, ``x`` and ``y`` (fp32)."""
    return n * k // 2 + n * (k // QK) * 2 + k * 4 + n * 4


# --------------------------------------------------------------------------------------------
# W4A32 GEMV with torch ops: y (N,) = W x, x (K,) float32


def unpack_matmul(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Variant 1: unpack the row layout to a float32 W (N, K), then ``W @ x``: the whole matrix
    is written once more at 8× the packed size and read back, so this is the slow baseline."""
    return dequantize(unpack_rows(packed), scales) @ x


def torch_packed(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, *,
                 block_rows: int = 256) -> torch.Tensor:
    """Variant 2: the row layout read ``block_rows`` rows at a time with shifts and masks; only
    one block is ever expanded to floats (it stays in cache), never the whole W.

    Per group g: ``Σ_j d(q_j − 8) x_j = d (Σ_j q_j x_j − 8 s_g)`` with ``s_g = Σ_{j∈g} x_j``, so
    the −8 costs one multiply per group, not per weight."""
    N, H = packed.shape
    G = 2 * H // QK
    x_even = x[0::2].reshape(G, QK // 2)                               # (G, 16): low nibbles
    x_odd = x[1::2].reshape(G, QK // 2)                                # (G, 16): high nibbles
    s = x.reshape(G, QK).sum(-1)                                       # (G,)
    y = torch.empty(N, dtype=torch.float32)
    for r0 in range(0, N, block_rows):
        p = packed[r0:r0 + block_rows].reshape(-1, G, QK // 2)         # (R, G, 16) uint8
        dot = ((p & 0x0F).float() * x_even).sum(-1) + ((p >> 4).float() * x_odd).sum(-1)
        y[r0:r0 + block_rows] = ((dot - 8 * s) * scales[r0:r0 + block_rows].float()).sum(-1)
    return y
