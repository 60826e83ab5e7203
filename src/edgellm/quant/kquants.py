"""llama.cpp's K-quants Q4_K and Q6_K: 256-weight super-blocks with quantized sub-block scales.

Q4_0 … Q5_1 (:mod:`edgellm.quant.gguf_formats`) spend a full fp16 scale (and minimum) on every
32 weights.  K-quants (llama.cpp, Kawrakow 2023) group 256 weights into a *super-block*, give
each small *sub-block* its own scale, and store those scales themselves quantized, against one
fp16 super-scale ``d`` (and ``dmin``):

====  =============================================  ==========================  ============
type  sub-blocks                                     per super-block              bits/weight
====  =============================================  ==========================  ============
Q4_K  8 × 32, codes 0…15, 6-bit scale ``sc`` and     ``d``, ``dmin`` fp16 (4 B),  144·8/256
      6-bit min ``m``: ``w = d·sc·q − dmin·m``        scales+mins 12 B, codes    = 4.5
                                                     128 B
Q6_K  16 × 16, codes −32…31, int8 scale ``sc``:      ``d`` fp16 (2 B), scales     210·8/256
      ``w = d·sc·q``                                 16 B, codes 128 + 64 B      = 6.5625
====  =============================================  ==========================  ============

A row must hold whole super-blocks: ``in_features % 256 == 0``.  In the default model only
``down_proj`` qualifies (1536 = 6·256); the 576-wide rows of every other linear do not, and
llama.cpp's quantizer falls back to a 32-block type for them.

Quantization follows llama.cpp's reference code (``quantize_row_q4_K_ref`` /
``quantize_row_q6_K_ref``): each sub-block is fitted first (Q4_K: a weighted least-squares
search over 21 candidate scales for ``scale`` and ``min``, weights ``rms(x) + |x|``;
Q6_K: 19 candidate scales, weights ``x²``), the sub-block scales are quantized to 6 / 8 bits
against the largest, and the codes are recomputed against the *quantized* scales.  Sums run in
float32 in the same order as the C loops, so our bytes equal llama.cpp's (tests compare them
with ``libggml``'s ``ggml_quantize_chunk`` and dequantize through ``gguf.quants``).
"""

from __future__ import annotations

import numpy as np
import torch

from edgellm.quant.qtensor import QuantError
from edgellm.quant.rtn import check_finite

QK_K = 256  # weights per super-block
KQUANT_TYPES = ("Q4_K", "Q6_K")
# bytes per super-block, straight from the C structs block_q4_K / block_q6_K
BLOCK_BYTES = {"Q4_K": 2 + 2 + 12 + QK_K // 2,              # d, dmin, scales+mins, 4-bit codes
               "Q6_K": QK_K // 2 + QK_K // 4 + QK_K // 16 + 2}  # ql, qh, int8 scales, d
KQUANT_BPW = {t: 8 * b / QK_K for t, b in BLOCK_BYTES.items()}  # 4.5 and 6.5625
# what llama.cpp's quantizer uses instead when a row does not hold whole super-blocks
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

_F = torch.float32


def _f(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=_F)  # a C float constant


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int`` (adds 1.5·2²³): round half to even."""
    return torch.round(x)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def check_kquant(W: torch.Tensor, qtype: str) -> None:
    if qtype not in KQUANT_TYPES:
        raise QuantError(f"unknown K-quant type {qtype!r}; supported: {', '.join(KQUANT_TYPES)}")
    if W.dim() != 2 or W.shape[1] % QK_K:
        n = W.shape[-1] if W.dim() else 0
        raise QuantError(f"{qtype} needs rows of whole {QK_K}-weight super-blocks; got shape "
                         f"{tuple(W.shape)} ({n} = {n // QK_K}·{QK_K} + {n % QK_K}); llama.cpp "
                         f"stores such rows as {FALLBACK.get(qtype, 'a 32-block type')}")
    check_finite(W)


# ------------------------------------------------------------------------------------------
# Q4_K


def _fit_min_scale(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0,
                   rdelta: float = 0.1, nstep: int = 20):
    """llama.cpp's ``make_qkx2_quants`` on rows of ``x`` (B, n) with weights ``w`` (B, n):
    ``x ≈ scale·L − the_min``; returns ``(scale (B,), the_min (B,), L (B, n) int64)``."""
    B, n = x.shape
    mn = x.amin(1).clamp(max=0)  # the grid always reaches 0
    mx = x.amax(1)
    sum_w, sum_x = w[:, 0].clone(), w[:, 0] * x[:, 0]
    for i in range(1, n):  # float32 sums in the C loop's order
        sum_w += w[:, i]
        sum_x += w[:, i] * x[:, i]
    flat = mx == mn
    rng = torch.where(flat, _f(1.0), mx - mn)
    iscale = _f(nmax) / rng
    scale = _f(1.0) / iscale
    xm = x - mn[:, None]  # (B, n)
    L = _nearest_int(iscale[:, None] * xm).clamp(0, nmax)
    diff = scale[:, None] * L + mn[:, None] - x
    best = torch.zeros(B, dtype=_F)
    for i in range(n):
        best += w[:, i] * (diff[:, i] * diff[:, i])
    for step in range(nstep + 1):
        # the C loop reads the *current* best min here, so the grid moves once a fit improves
        rng = torch.where(flat, _f(1.0), mx - mn)
        iscale = (_f(rmin) + _f(rdelta) * _f(step) + _f(nmax)) / rng
        La = _nearest_int(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        sum_l = torch.zeros(B, dtype=_F)
        sum_l2 = torch.zeros(B, dtype=_F)
        sum_xl = torch.zeros(B, dtype=_F)
        for i in range(n):
            wl = w[:, i] * La[:, i]
            sum_l += wl
            sum_l2 += wl * La[:, i]
            sum_xl += wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dz = torch.where(ok, D, _f(1.0))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dz
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dz
        pos = this_min > 0
        this_min = torch.where(pos, _f(0.0), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 == 0, _f(1.0), sum_l2),
                                 this_scale)
        diff = this_scale[:, None] * La + this_min[:, None] - x
        err = torch.zeros(B, dtype=_F)
        for i in range(n):
            err += w[:, i] * (diff[:, i] * diff[:, i])
        better = ok & (err < best)
        L = torch.where(better[:, None], La, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, _f(0.0), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -mn, L.long()


def quantize_q4_k(W: torch.Tensor) -> np.ndarray:
    """``W`` (out, in) → llama.cpp ``block_q4_K`` bytes, uint8 (out, in/256·144)."""
    check_kquant(W, "Q4_K")
    out, n = W.shape
    nb = out * n // QK_K
    x = W.detach().float().reshape(nb * 8, 32)  # (sub-blocks, 32)
    sum_x2 = torch.zeros(nb * 8, dtype=_F)
    for i in range(32):
        sum_x2 += x[:, i] * x[:, i]
    av_x = torch.sqrt(sum_x2 / _f(32))
    weights = av_x[:, None] + x.abs()  # (nb·8, 32)
    scales, mins, L = _fit_min_scale(x, weights)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    # the C loop starts from +0 and only takes larger values: never -0 (an all-zero block)
    max_scale = torch.where(scales.amax(1) > 0, scales.amax(1), _f(0.0))  # (nb,)
    max_min = torch.where(mins.amax(1) > 0, mins.amax(1), _f(0.0))
    inv_scale = torch.where(max_scale > 0, _f(63) / torch.where(max_scale > 0, max_scale,
                                                                   _f(1.0)), _f(0.0))
    inv_min = torch.where(max_min > 0, _f(63) / torch.where(max_min > 0, max_min, _f(1.0)),
                          _f(0.0))
    ls = _nearest_int(inv_scale[:, None] * scales).clamp(max=63).long()  # (nb, 8) 6-bit
    lm = _nearest_int(inv_min[:, None] * mins).clamp(max=63).long()
    d = _fp16(max_scale / _f(63))
    dmin = _fp16(max_min / _f(63))
    # codes again, against the quantized sub-block scale and min
    dj = d[:, None] * ls.float()  # (nb, 8)
    dm = dmin[:, None] * lm.float()
    L2 = _nearest_int((x.reshape(nb, 8, 32) + dm[..., None])
                      / torch.where(dj == 0, _f(1.0), dj)[..., None]).clamp(0, 15).long()
    L = torch.where((dj != 0)[..., None], L2, L)  # a zero scale keeps the fitted codes
    return _pack_q4_k(d, dmin, ls, lm, L).reshape(out, -1)


def _pack_q4_k(d, dmin, ls, lm, L) -> np.ndarray:
    nb = d.shape[0]
    sc = torch.zeros(nb, 12, dtype=torch.long)
    # sub-blocks 0-3: 6 bits in bytes 0-3 (scale) and 4-7 (min); 4-7: low 4 bits in bytes 8-11,
    # their top 2 bits in the spare top bits of bytes 0-3 (scale) and 4-7 (min)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    Lp = L.reshape(nb, 4, 2, 32)  # pairs of sub-blocks: (2k) low nibble, (2k+1) high nibble
    qs = (Lp[:, :, 0] | (Lp[:, :, 1] << 4)).reshape(nb, 128)
    head = torch.stack([d, dmin], 1).half().view(torch.uint8).reshape(nb, 4)
    return torch.cat([head, sc.to(torch.uint8), qs.to(torch.uint8)], 1).numpy()


def dequantize_q4_k(raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``block_q4_K`` bytes → float32 weights of ``shape``: ``w = d·sc·q − dmin·m``."""
    b = torch.as_tensor(np.ascontiguousarray(raw)).reshape(-1, BLOCK_BYTES["Q4_K"])
    nb = b.shape[0]
    d = b[:, 0:2].contiguous().view(torch.float16).float()  # (nb, 1)
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    s = b[:, 4:16].long()
    ls = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], 1)  # (nb, 8)
    lm = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    qs = b[:, 16:].long().reshape(nb, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], 2).reshape(nb, 8, 32).float()
    w = (d * ls.float())[..., None] * q - (dmin * lm.float())[..., None]
    return w.reshape(shape)


# ------------------------------------------------------------------------------------------
# Q6_K


def _fit_sym_scale(x: torch.Tensor, nmax: int = 32):
    """llama.cpp's ``make_qx_quants(n, nmax, x, L, rmse_type=1)``: ``x ≈ scale·(L − nmax)``
    with weights ``x²``, 19 candidate scales around ``-nmax/max``; returns ``(scale, L)``."""
    B, n = x.shape
    i = x.abs().argmax(1, keepdim=True)  # first index of the largest |x|
    mx = x.gather(1, i)[:, 0]  # signed
    zero = mx.abs() < 1e-15
    mxz = torch.where(zero, _f(1.0), mx)
    w = x * x

    def fit(iscale):
        q = _nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        slx = torch.zeros(B, dtype=_F)
        sl2 = torch.zeros(B, dtype=_F)
        for k in range(n):
            slx += w[:, k] * x[:, k] * q[:, k]
            sl2 += w[:, k] * q[:, k] * q[:, k]
        return q, slx, sl2

    q, sumlx, suml2 = fit(-_f(nmax) / mxz)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, _f(1.0)), _f(0.0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        qa, slx, sl2 = fit(-(_f(nmax) + _f(0.1) * _f(step)) / mxz)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        q = torch.where(better[:, None], qa, q)
        scale = torch.where(better, slx / torch.where(sl2 > 0, sl2, _f(1.0)), scale)
        best = torch.where(better, scale * slx, best)
    scale = torch.where(zero, _f(0.0), scale)
    L = torch.where(zero[:, None], torch.zeros_like(q), q + nmax)
    return scale, L.long()


def quantize_q6_k(W: torch.Tensor) -> np.ndarray:
    """``W`` (out, in) → llama.cpp ``block_q6_K`` bytes, uint8 (out, in/256·210)."""
    check_kquant(W, "Q6_K")
    out, n = W.shape
    nb = out * n // QK_K
    x = W.detach().float().reshape(nb * 16, 16)  # (sub-blocks, 16)
    scales, L = _fit_sym_scale(x)
    scales, L, x = scales.reshape(nb, 16), L.reshape(nb, 16, 16), x.reshape(nb, 16, 16)
    i = scales.abs().argmax(1, keepdim=True)  # the sub-block scale of largest magnitude
    max_scale = scales.gather(1, i)[:, 0]
    empty = max_scale.abs() < 1e-15
    iscale = _f(-128) / torch.where(empty, _f(1.0), max_scale)
    d = _fp16(_f(1.0) / iscale)  # (nb,)
    sc = _nearest_int(iscale[:, None] * scales).clamp(max=127).long()  # (nb, 16) int8
    dj = d[:, None] * sc.float()
    L2 = (_nearest_int(x / torch.where(dj == 0, _f(1.0), dj)[..., None]).clamp(-32, 31)
          + 32).long()
    L = torch.where((dj != 0)[..., None], L2, L)
    d = torch.where(empty, _f(0.0), d)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    L = torch.where(empty[:, None, None], torch.zeros_like(L), L)
    return _pack_q6_k(d, sc, L).reshape(out, -1)


def _pack_q6_k(d, sc, L) -> np.ndarray:
    nb = d.shape[0]
    # each half of 128 weights: four runs of 32 (a, b, c, e); low nibbles of a|c and b|e fill
    # 64 bytes of ql, the top 2 bits of all four one byte of qh per position
    Lh = L.reshape(nb, 2, 4, 32)
    lo, hi = Lh & 0xF, Lh >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    parts = [ql.reshape(nb, 128).to(torch.uint8), qh.reshape(nb, 64).to(torch.uint8),
             sc.to(torch.int8).view(torch.uint8), d.half().view(torch.uint8).reshape(nb, 2)]
    return torch.cat(parts, 1).numpy()


def dequantize_q6_k(raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``block_q6_K`` bytes → float32 weights of ``shape``: ``w = d·sc·(q − 32)``."""
    b = torch.as_tensor(np.ascontiguousarray(raw)).reshape(-1, BLOCK_BYTES["Q6_K"])
    nb = b.shape[0]
    ql = b[:, :128].long().reshape(nb, 2, 2, 32)
    qh = b[:, 128:192].long().reshape(nb, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # (nb, 16)
    d = b[:, 208:210].contiguous().view(torch.float16).float()  # (nb, 1)
    lo = torch.cat([ql & 0xF, ql >> 4], 2)  # (nb, 2, 4, 32): runs a, b, c, e
    hi = (qh >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3
    q = (lo | (hi << 4)).float() - 32  # (nb, 2, 4, 32)
    w = (d * sc).reshape(nb, 16, 1) * q.reshape(nb, 16, 16)
    return w.reshape(shape)


# ------------------------------------------------------------------------------------------
# entry points and references


def quantize_kquant(W: torch.Tensor, qtype: str = "Q4_K") -> np.ndarray:
    """``W`` (out, in) → the llama.cpp bytes of ``qtype`` (Q4_K or Q6_K), uint8 (out, bytes)."""
    check_kquant(W, qtype)
    return quantize_q4_k(W) if qtype == "Q4_K" else quantize_q6_k(W)


def dequantize_kquant(raw, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    if qtype not in KQUANT_TYPES:
        raise QuantError(f"unknown K-quant type {qtype!r}; supported: {', '.join(KQUANT_TYPES)}")
    return dequantize_q4_k(raw, shape) if qtype == "Q4_K" else dequantize_q6_k(raw, shape)


def fake_quantize_kquant(W: torch.Tensor, qtype: str = "Q4_K") -> torch.Tensor:
    """Quantize → dequantize: float32 (out, in) on the ``qtype`` grid."""
    return dequantize_kquant(quantize_kquant(W, qtype), qtype, tuple(W.shape))


def gguf_dequantize(raw: np.ndarray, qtype: str) -> torch.Tensor:
    """The ``gguf`` package's dequantizer on the same bytes (numpy, llama.cpp's rules)."""
    from gguf import GGMLQuantizationType, quants

    return torch.from_numpy(quants.dequantize(raw, getattr(GGMLQuantizationType, qtype))
                            .astype(np.float32))


def ggml_quantize(W: torch.Tensor, qtype: str) -> np.ndarray:
    """llama.cpp's own quantizer (``ggml_quantize_chunk`` in the ``libggml`` that
    llama-cpp-python ships; no importance matrix) on ``W`` (out, in): uint8 (out, bytes)."""
    import ctypes
    from pathlib import Path

    from gguf import GGMLQuantizationType, quants

    try:
        import llama_cpp
    except ImportError:  # pragma: no cover - the environment installs it
        raise QuantError("llama-cpp-python is not installed; run `make setup`") from None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    t = getattr(GGMLQuantizationType, qtype)
    x = np.ascontiguousarray(W.detach().float().numpy())
    out, n = x.shape
    block, size = quants.GGML_QUANT_SIZES[t]
    dst = np.zeros((out, n // block * size), dtype=np.uint8)
    fn(int(t), x.ctypes.data, dst.ctypes.data, 0, out, n, None)
    return dst
