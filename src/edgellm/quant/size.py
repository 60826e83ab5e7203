"""Size accounting: bits per weight (bpw) including scales and zero points, bytes of a model.

For ``n`` weights quantized to ``b`` bits in groups of ``g`` with an ``s``-bit scale and an
``o``-bit offset per group (``o = 0`` for symmetric formats)::

    bpw = b + (s + o) / g               e.g. INT4 g64 asym fp16: 4 + 32/64 = 4.5

QLoRA's double quantization stores NF4's fp32 block absmax (block 64) itself in 8 bits, with one
fp32 scale per 256 absmax values (plus one fp32 mean offset per tensor)::

    bpw = 4 + 8/64 + 32/(64·256) ≈ 4.127   instead of   4 + 32/64 = 4.5
"""

from __future__ import annotations

import math

import torch


def bpw(bits: int, group_size: int, scale_bits: int = 16, offset_bits: int = 0) -> float:
    """Bits per weight of a grouped format: ``bits + (scale_bits + offset_bits) / group_size``."""
    return bits + (scale_bits + offset_bits) / group_size


def nf4_bpw(blocksize: int = 64, double_quant: bool = True, dq_bits: int = 8,
            dq_blocksize: int = 256, absmax_bits: int = 32) -> float:
    """bpw of bitsandbytes NF4 with or without QLoRA's double quantization (per-tensor constant
    terms, the 256-entry code table and the mean offset, are left out of this asymptotic figure)."""
    if not double_quant:
        return 4 + absmax_bits / blocksize
    return 4 + dq_bits / blocksize + absmax_bits / (blocksize * dq_blocksize)


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True,
              dq_blocksize: int = 256) -> int:
    """Exact bytes bitsandbytes keeps for one NF4 tensor: packed codes, absmax (fp32, or uint8 +
    fp32 per ``dq_blocksize`` + one fp32 offset with double quantization)."""
    n_blocks = math.ceil(numel / blocksize)
    codes = math.ceil(numel / 2)
    if not double_quant:
        return codes + 4 * n_blocks
    return codes + n_blocks + 4 * math.ceil(n_blocks / dq_blocksize) + 4


def tensor_bytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    size = torch.finfo(dtype).bits // 8 if dtype is not None else t.element_size()
    return t.numel() * size


def model_size(model: torch.nn.Module, qtensors: dict,
               rest_dtype: torch.dtype | None = None) -> dict:
    """Bytes of a quantized model: packed linears + everything else (tied tensors once).

    ``qtensors`` maps linear names to :class:`edgellm.quant.qtensor.QTensor` (this module does
    not import it: QTensor computes its own ``bpw`` with :func:`bpw`).

    ``rest_dtype`` is how the unquantized tensors (embedding = lm_head, norms) are stored
    (None: their current dtype).  The embedding is NOT quantized; its bytes are reported apart.
    """
    quantized = {f"{name}.weight" for name in qtensors}
    seen, emb, other, n_rest = set(), 0, 0, 0
    for name, p in model.state_dict(keep_vars=True).items():
        if name in quantized or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        b = tensor_bytes(p, rest_dtype if p.is_floating_point() else None)
        n_rest += p.numel()
        if "embed" in name or "lm_head" in name:
            emb += b
        else:
            other += b
    lin = sum(q.size_bytes for q in qtensors.values())
    n_lin = sum(q.numel for q in qtensors.values())
    return {"size_bytes": lin + emb + other, "size_bytes_linears": lin,
            "size_bytes_embedding": emb, "size_bytes_other": other,
            "bpw": 8 * lin / n_lin if n_lin else None,
            "bpw_model": 8 * (lin + emb + other) / (n_lin + n_rest),
            "n_quantized": n_lin, "n_unquantized": n_rest, "embedding_quantized": False}
