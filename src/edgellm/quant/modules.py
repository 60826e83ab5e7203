"""Simulated ("fake") quantization as a module: ``QuantLinear`` swaps into a model and back.

Two ways to simulate a quantized model, both used in the course:

- in-place: ``apply_rtn(model)`` overwrites each weight with its dequantized value (fast, simple);
- swap-in:  :func:`swap_in` replaces each ``nn.Linear`` by a :class:`QuantLinear` that keeps only
  the integer codes and scales and dequantizes them on every forward pass, as a real low-bit
  kernel would; :func:`swap_out` puts the original layers back.

Both compute ``x @ w_hat.T + b`` with the same ``w_hat``, so their logits are identical (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.quant.qtensor import QTensor


class QuantLinear(nn.Module):
    """A linear layer whose weight is held as a :class:`QTensor` (codes + scales, no fp weight)."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.qt = qt
        self.in_features, self.out_features = qt.shape[1], qt.shape[0]
        self.register_buffer("codes", qt.codes)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("offset", qt.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, qt: QTensor | None = None, **quant_kwargs):
        """Wrap ``lin``; quantize its weight with RTN (``quant_kwargs``) unless ``qt`` is given."""
        if qt is None:
            from edgellm.quant.rtn import quantize

            qt = quantize(lin.weight, **quant_kwargs)
        return cls(qt, lin.bias)

    def weight_hat(self) -> torch.Tensor:
        """float32 (out, in) dequantized weight."""
        return self.qt.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return nn.functional.linear(x, self.weight_hat().to(x.dtype), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight_hat())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        kind = "sym" if self.qt.sym else "asym"
        return (f"in={self.in_features}, out={self.out_features}, {self.qt.fmt}{self.qt.bits} "
                f"{kind}, group_size={self.qt.group_size}, bpw={self.qt.bpw:.4g}")


def _parent(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule called ``name`` (dotted) is; return the old one."""
    parent, child = _parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def swap_in(model: nn.Module, qtensors: dict[str, QTensor]) -> dict[str, nn.Module]:
    """Replace each named linear by a :class:`QuantLinear`; return the originals for
    :func:`swap_out`."""
    originals = {}
    for name, qt in qtensors.items():
        lin = model.get_submodule(name)
        originals[name] = replace_module(model, name, QuantLinear(qt, lin.bias))
    return originals


def swap_out(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the original modules back (undo :func:`swap_in`)."""
    for name, mod in originals.items():
        replace_module(model, name, mod)
