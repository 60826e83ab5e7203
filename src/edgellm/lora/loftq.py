"""LoftQ initialisation (Li et al. 2023) for QLoRA, from scratch, on the CPU.

QLoRA starts from ``NF4(W)`` and an adapter that is zero, so training first has to win back the
quantization error ``W − NF4(W)``.  LoftQ starts the adapter *at* the best rank-r fit of that
error and picks the 4-bit base knowing the adapter will be there, alternating::

    Q_t  = NF4(W − s B_{t−1} A_{t−1})          (B_0 A_0 = 0: Q_1 = NF4(W), QLoRA's base)
    s B_t A_t = SVD_r(W − deq(Q_t))             (the top r singular triplets, split √σ each way)

so that ``deq(Q_T) + s B_T A_T`` is closer to ``W`` than ``NF4(W)`` alone.  peft's
``loftq_init`` moves each weight to a "cuda" or "xpu" device, so it cannot run on a CPU-only
machine; this is the same alternation with bitsandbytes' NF4 round trip on the CPU (blocks of 64
with double quantization, the format ``apply_qlora`` stores).
"""

from __future__ import annotations

import torch

from edgellm.quant.backends.bitsandbytes import nf4_roundtrip


def loftq(weight: torch.Tensor, rank: int, *, iters: int = 5, scaling: float = 1.0,
          blocksize: int = 64, double_quant: bool = True) -> dict:
    """LoftQ for one ``(out, in)`` weight.  Returns ``quant_input`` (the fp32 tensor whose NF4
    round trip is the base: store it with bitsandbytes to get ``deq(Q_T)``), ``base`` (that
    round trip), ``A`` ``(rank, in)`` and ``B`` ``(out, rank)`` with ``base + scaling·B A ≈ W``,
    and ``rel_err``: ‖W − (base + s B A)‖ / ‖W‖ after each iteration, ``rel_err_nf4`` the same
    for ``NF4(W)`` with no adapter (QLoRA's start)."""
    if iters < 1:
        raise ValueError(f"iters={iters} must be at least 1")
    w = weight.detach().float()
    norm = float(w.norm())
    low = torch.zeros_like(w)
    errs = []
    for _ in range(iters):
        quant_input = w - low
        base = nf4_roundtrip(quant_input, blocksize=blocksize, double_quant=double_quant)
        U, S, Vh = torch.linalg.svd((w - base).double(), full_matrices=False)
        root = S[:rank].sqrt()
        B = (U[:, :rank] * root).float()
        A = (root[:, None] * Vh[:rank]).float()
        low = B @ A
        errs.append(float((w - base - low).norm()) / norm)
    nf4_err = float((w - nf4_roundtrip(w, blocksize=blocksize, double_quant=double_quant)).norm())
    return {"quant_input": quant_input, "base": base, "A": A, "B": B / scaling,
            "rel_err": errs, "rel_err_nf4": nf4_err / norm}


@torch.no_grad()
def loftq_weights(model, *, rank: int, targets: str = "all", scaling: float = 1.0,
                  iters: int = 5) -> dict:
    """Run :func:`loftq` on every targeted linear of a float model and write ``quant_input``
    into its weight (so that storing the model in NF4 gives LoftQ's base).  Returns
    ``{name: {"A", "B", "rel_err", "rel_err_nf4"}}`` for :func:`set_initial_adapter`."""
    from edgellm.lora.layers import TARGETS
    from edgellm.models import linear_layers

    roles = TARGETS[targets]
    out = {}
    for name, lin in linear_layers(model).items():
        if name.rsplit(".", 1)[-1] not in roles:
            continue
        r = loftq(lin.weight, rank, iters=iters, scaling=scaling)
        lin.weight.copy_(r.pop("quant_input").to(lin.weight.dtype))
        del r["base"]
        out[name] = r
    return out


@torch.no_grad()
def set_initial_adapter(peft_model, inits: dict, adapter: str = "default") -> None:
    """Copy LoftQ's ``A`` and ``B`` into a peft model's adapters (``base_model.model.<name>``)."""
    for name, r in inits.items():
        layer = peft_model.get_submodule(f"base_model.model.{name}")
        layer.lora_A[adapter].weight.copy_(r["A"])
        layer.lora_B[adapter].weight.copy_(r["B"])
