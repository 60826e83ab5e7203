"""QA-LoRA (Xu et al. 2023): an adapter that can be merged into an integer base without leaving
its grid.

On an asymmetric INT-b base with groups of ``g`` inputs, ``w = q · scale + offset`` per group.
A plain LoRA adds ``s B A``, different in every column, so the merged weight lies off the grid
and re-quantizing it loses part of the update (as with NF4 in lesson 10).  QA-LoRA feeds ``A``
the *mean of each group of g inputs* (``A`` is ``r × in/g``), so ``s B A`` is constant across the
columns of a group: merging it only moves each group's ``offset``,

    offset' = offset + s (B A) / g        codes and scales unchanged,

and the merged model is exactly on an INT-b grid (up to the fp16 rounding of the new offsets).
NF4 has no offset, so QA-LoRA cannot apply to QLoRA's base.

:class:`QALoRALinear` with ``pooled=False`` is the comparison: a plain LoRA on the same INT4
base, whose merge must re-quantize (``int4-lora``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.lora.layers import LoRAError, LoRALinear


class QALoRALinear(LoRALinear):
    """A frozen INT-``bits`` base (asymmetric, groups of ``group_size``: our RTN) plus an adapter:
    group-pooled (QA-LoRA, ``A`` is ``rank × in/g``) or plain (``pooled=False``)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, *,
                 group_size: int = 64, bits: int = 4, pooled: bool = True, dropout: float = 0.0):
        from edgellm.quant.rtn import quantize

        n_groups = base.in_features // group_size
        if pooled and rank > n_groups:
            raise LoRAError(f"rank={rank}: a QA-LoRA adapter sees {n_groups} group means "
                            f"({base.in_features} inputs / groups of {group_size}); use a rank "
                            f"≤ {n_groups} or smaller groups")
        qt = quantize(base.weight.detach(), bits, group_size, sym=False)
        with torch.no_grad():
            base.weight.copy_(qt.dequantize())          # the INT4 base, held in fp32 for matmul
        super().__init__(base, rank, alpha, dropout=dropout)
        self.qt, self.group_size, self.pooled = qt, group_size, pooled
        if pooled:
            self.lora_A = nn.Parameter(torch.empty(rank, n_groups, dtype=base.weight.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` → ``(..., in/g)``: the mean of each group of ``g`` inputs."""
        return x.unflatten(-1, (-1, self.group_size)).mean(-1)

    def delta_weight(self) -> torch.Tensor:
        d = (self.lora_B @ self.lora_A) * self.scaling           # (out, in/g) or (out, in)
        return d.repeat_interleave(self.group_size, dim=1) / self.group_size if self.pooled else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = self.dropout(x)
        a = self.pool(a) if self.pooled else a
        return y + F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged_on_grid(self, offset_dtype: torch.dtype = torch.float16):
        """The merged weight as an INT-``bits`` :class:`~edgellm.quant.qtensor.QTensor` and
        ``changed_codes`` (the fraction of integer codes that differ from the base's).
        QA-LoRA: the same codes and scales, offsets moved and stored in ``offset_dtype`` (fp16,
        as the base stores them: a shift far below an offset's fp16 spacing is rounded away;
        fp32 costs 16 more bits per group).  Plain: RTN re-quantization of ``deq + s B A``."""
        from dataclasses import replace

        from edgellm.quant.qtensor import dtype_bits
        from edgellm.quant.rtn import quantize

        qt = self.qt
        if self.pooled:
            shift = (self.lora_B @ self.lora_A) * self.scaling / self.group_size   # (out, G)
            new = replace(qt, offset=(qt.offset + shift).to(offset_dtype).float(),
                          offset_bits=dtype_bits(offset_dtype))
        else:
            new = quantize(qt.dequantize() + self.delta_weight(), qt.bits, qt.group_size,
                           sym=False)
        changed = float((new.codes != qt.codes).float().mean())
        return new, changed


def apply_qalora(model, *, rank: int = 8, alpha: float | None = None, targets: str = "all",
                 pooled: bool = True, group_size: int = 64, bits: int = 4, dropout: float = 0.0,
                 seed: int = 0) -> dict[str, QALoRALinear]:
    """Every decoder linear to INT-``bits`` asymmetric groups of ``group_size`` (RTN); the
    ``targets`` get a :class:`QALoRALinear` (the others keep their quantized weight only)."""
    from edgellm.lora.layers import target_linears
    from edgellm.models import linear_layers
    from edgellm.quant.rtn import fake_quantize

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    targeted = target_linears(model, targets)
    out = {}
    for name, lin in linear_layers(model).items():
        if name in targeted:
            out[name] = QALoRALinear(lin, rank, alpha, group_size=group_size, bits=bits,
                                     pooled=pooled, dropout=dropout)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, out[name])
        else:
            with torch.no_grad():
                lin.weight.copy_(fake_quantize(lin.weight, bits, group_size, sym=False))
    return out
