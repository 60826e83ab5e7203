"""Lesson 10 (QLoRA): the memory of a 4-bit base by formula, an NF4 LoRA forward by hand, and
merging an adapter into a quantized base.

Merging ``W ← W + sBA`` is exact in fp32.  On a 4-bit base it is not: ``W`` is stored as NF4
codes, ``W + sBA`` is off the NF4 grid, so storing the merged weight in NF4 again rounds it
(:func:`merged_weights`).  Keeping the adapter unmerged, or the merged weight in a wider format,
avoids that.
"""

from __future__ import annotations

import torch

from edgellm.quant.backends.bitsandbytes import nf4_roundtrip  # noqa: F401  (re-exported)
from edgellm.quant.size import nf4_bytes


def base_memory(model, *, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Bytes of the frozen base in fp32 and with every decoder linear in NF4: ``linears_fp32``,
    ``linears_nf4``, ``rest`` (embedding = lm_head once, norms; fp32 in both), ``fp32``,
    ``nf4`` (totals), ``ratio`` and ``rest_share_nf4`` (the part of the NF4 base that stays fp32)."""
    from edgellm.models import linear_layers

    lin = {id(m.weight): m.weight.numel() for m in linear_layers(model).values()}
    seen, rest = set(), 0
    for p in model.parameters():
        if id(p) not in lin and id(p) not in seen:
            seen.add(id(p))
            rest += p.numel() * p.element_size()
    lin_fp32 = 4 * sum(lin.values())
    lin_nf4 = sum(nf4_bytes(n, blocksize, double_quant) for n in lin.values())
    out = {"linears_fp32": lin_fp32, "linears_nf4": lin_nf4, "rest": rest,
           "fp32": lin_fp32 + rest, "nf4": lin_nf4 + rest}
    out["ratio"] = out["fp32"] / out["nf4"]
    out["rest_share_nf4"] = rest / out["nf4"]
    return out


def base_memory_of_shape(*, vocab: int, hidden: int, layers: int, intermediate: int,
                         kv_dim: int | None = None, tied: bool = True, blocksize: int = 64,
                         fp16_rest: bool = True) -> dict:
    """:func:`base_memory` from a Llama-style shape alone (no weights): e.g. a 7B model
    (vocab 32,000, hidden 4,096, 32 layers, MLP 11,008, untied), its rest in fp16 as QLoRA keeps it
    on a GPU (``fp16_rest``)."""
    kv = hidden if kv_dim is None else kv_dim
    per_layer = [hidden * hidden, kv * hidden, kv * hidden, hidden * hidden,
                 3 * intermediate * hidden]
    n_lin = layers * sum(per_layer)
    emb = vocab * hidden * (1 if tied else 2)
    rest = (emb + (2 * layers + 1) * hidden) * (2 if fp16_rest else 4)
    lin_nf4 = layers * sum(nf4_bytes(n, blocksize) for n in per_layer[:4]) \
        + layers * 3 * nf4_bytes(intermediate * hidden, blocksize)
    lin_base = n_lin * (2 if fp16_rest else 4)
    out = {"linears_fp32": 4 * n_lin, "linears_base": lin_base, "linears_nf4": lin_nf4,
           "rest": rest, "base": lin_base + rest, "nf4": lin_nf4 + rest}
    out["ratio"] = out["base"] / out["nf4"]
    out["rest_share_nf4"] = rest / out["nf4"]
    return out


def nf4_lora_forward(x: torch.Tensor, packed, state, A: torch.Tensor, B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """QLoRA's forward by hand: ``x · deq(W)ᵀ + s · x Aᵀ Bᵀ`` with bitsandbytes' dequantize."""
    from bitsandbytes.functional import dequantize_4bit

    w = dequantize_4bit(packed, state)                      # (out, in) fp32, frozen
    return x @ w.T + scaling * (x @ A.T) @ B.T


def merged_weights(w_nf4: torch.Tensor, delta: torch.Tensor, *, blocksize: int = 64) -> dict:
    """The two ways to merge an adapter's ``delta`` (= sBA) into a base held as ``w_nf4`` (the
    dequantized NF4 weight): ``fp32`` (exact: what the unmerged model computes) and ``nf4``
    (merged, then stored in NF4 again: rounded), with ``requant_rel_err`` = ‖nf4 − fp32‖ / ‖delta‖
    (how much of the update the rounding destroys) and ``delta_rel`` = ‖delta‖ / ‖w‖."""
    exact = w_nf4 + delta
    requant = nf4_roundtrip(exact, blocksize=blocksize)
    d = float(delta.norm())
    return {"fp32": exact, "nf4": requant,
            "requant_rel_err": float((requant - exact).norm()) / d if d else float("nan"),
            "delta_rel": d / float(w_nf4.norm())}
