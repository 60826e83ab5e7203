"""``LoRALinear`` from scratch (LoRA, Hu et al. 2021; rsLoRA, Kalajdzievski 2023).

A frozen linear ``W`` (out, in) plus a trainable low-rank update::

    y = x Wᵀ + b  +  s · dropout(x) Aᵀ Bᵀ        A (r, in), B (out, r),  s = α / r  (rsLoRA: α / √r)

``A`` starts Kaiming-uniform (as ``nn.Linear`` and peft), ``B`` at zero, so the adapted model
starts exactly at the base model.  ``merge()`` folds ``s · B A`` into ``W`` (no extra cost at
inference), ``unmerge()`` takes it out again.  The update is computed in the same order as
peft's ``lora.Linear`` so that both give identical numbers for identical ``A`` and ``B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.errors import EdgeLLMError
from edgellm.models import LINEAR_ROLES, linear_layers

TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": tuple(LINEAR_ROLES),
}


class LoRAError(EdgeLLMError, ValueError):
    """LoRA settings or adapters that cannot be used; the message says what to do."""


def lora_scaling(rank: int, alpha: float, *, rslora: bool = False) -> float:
    """``s`` = α / r (LoRA) or α / √r (rsLoRA, which keeps the update's scale stable as r grows)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """``base`` (an ``nn.Linear``, frozen) plus ``scaling · B A``; ``lora_A`` (r, in) and
    ``lora_B`` (out, r) are the only trainable parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, *,
                 dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        out_f, in_f = base.weight.shape
        if not isinstance(rank, int) or rank < 1:
            raise LoRAError(f"rank={rank} must be a positive integer (typical: 4 to 64)")
        if rank > min(out_f, in_f):
            raise LoRAError(f"rank={rank} is larger than this layer allows: W is {out_f}×{in_f}, "
                            f"so B A has rank at most {min(out_f, in_f)}; use a rank ≤ "
                            f"{min(out_f, in_f)}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"dropout={dropout} must be in [0, 1)")
        alpha = float(rank if alpha is None else alpha)
        self.base, self.rank, self.alpha, self.rslora = base, rank, alpha, rslora
        self.scaling = lora_scaling(rank, alpha, rslora=rslora)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, dtype=w.dtype, device=w.device))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=w.dtype, device=w.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear(in, r) and peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads layer.weight (shapes, dtype) still works
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` (out, in): what merging adds to ``W``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # x (..., in)
        y = self.base(x)                                     # (..., out)
        if self.merged:
            return y
        # same order as peft: B(A(dropout(x))) · s
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W + s·B A``: the adapter costs nothing at inference (call ``unmerge`` to train)."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W ← W − s·B A`` (exact up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:.4g}, merged={self.merged}")


def lora_layers(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


METHODS = ("lora", "qlora", "full", "dora", "pissa", "loftq", "qalora", "int4-lora")
INT4_METHODS = ("qalora", "int4-lora")        # our INT4 base, not saved in peft's format
MERGE_METHODS = ("qlora", "loftq", *INT4_METHODS)   # a 4-bit base the merge can leave


def check_lora_args(*, method: str = "lora", rank: int = 8, alpha: float | None = None,
                    targets: str = "all", dropout: float = 0.0) -> None:
    """Reject bad settings before any model is loaded (raises :class:`LoRAError`)."""
    if method not in METHODS:
        raise LoRAError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if targets not in TARGETS:
        raise LoRAError(f"unknown targets {targets!r}; use qv (q_proj, v_proj), attn (q, k, v, "
                        "o_proj) or all (attention and MLP linears)")
    if method != "full" and (not isinstance(rank, int) or rank < 1):
        raise LoRAError(f"rank={rank} must be a positive integer (typical: 4 to 64)")
    if alpha is not None and not alpha > 0:
        raise LoRAError(f"alpha={alpha} must be > 0 (default: alpha = rank, scaling 1)")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"dropout={dropout} must be in [0, 1)")


def target_linears(model, targets: str = "all") -> dict[str, torch.nn.Linear]:
    """The decoder linears ``targets`` names, by full module name."""
    if targets not in TARGETS:
        check_lora_args(targets=targets)
    roles = TARGETS[targets]
    return {n: m for n, m in linear_layers(model).items() if n.rsplit(".", 1)[-1] in roles}


def check_rank(model, rank: int, targets: str = "all") -> None:
    """``rank`` fits every targeted linear: 1 ≤ rank ≤ min(out, in)."""
    check_lora_args(rank=rank, targets=targets)
    layers = target_linears(model, targets)
    if not layers:
        raise LoRAError(f"the model has no {targets!r} linears ({', '.join(TARGETS[targets])})")
    name, small = min(layers.items(), key=lambda kv: min(kv[1].weight.shape))
    if rank > min(small.weight.shape):
        o, i = small.weight.shape
        raise LoRAError(f"rank={rank} is larger than {name} ({o}×{i}) allows: use a rank ≤ "
                        f"{min(o, i)}")
