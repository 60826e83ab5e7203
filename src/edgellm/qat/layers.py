"""The fake-quantized linear layer, and putting it into (``prepare``) and out of (``finalize``)
a model.

``prepare`` swaps every decoder linear for a :class:`FakeQuantLinear` that shares its weight
(no copy): the optimizer trains the fp32 latent weights, the forward pass sees ``q(w)``.  The
tied embedding / lm_head is not quantized and not trained (it stays fp32 here and is stored at
higher precision in every size we report, as BitNet does).  ``finalize`` rounds the latent
weights onto the grid for good, puts plain ``nn.Linear`` layers back (activation quantizers of
BitNet stay as forward pre-hooks) and returns the codes as :class:`edgellm.quant.qtensor.QTensor`
for packing and export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.qat.fake import QATError, absmax_act, quantize_weight, ste
from edgellm.quant.modules import replace_module


class FakeQuantLinear(nn.Module):
    """``y = x̂ · ŵᵀ + b`` with ``ŵ = ste(w, q(w), λ)`` and, when ``a_bits``, ``x̂ = ste(x,
    absmax(x), λ)`` per token; with ``lsq_bits`` the weight goes through LSQ (learned steps)."""

    def __init__(self, linear: nn.Linear, *, grid: str = "minmax", bits: int = 2,
                 group_size: int | None = 64, a_bits: int | None = None,
                 lsq_bits: int | None = None):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        self.grid, self.bits, self.group_size, self.a_bits = grid, bits, group_size, a_bits
        self.lam = 1.0
        self.lsq_bits = lsq_bits
        if lsq_bits:
            from edgellm.qat.lsq import init_step

            self.step = nn.Parameter(init_step(linear.weight, lsq_bits, group_size))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def quantized_weight(self) -> torch.Tensor:
        if self.lsq_bits:
            from edgellm.qat.lsq import lsq_quantize

            return self.weight + self.lam * (lsq_quantize(self.weight, self.step, self.lsq_bits)
                                             - self.weight)
        return ste(self.weight, quantize_weight(self.weight, grid=self.grid, bits=self.bits,
                                                group_size=self.group_size), self.lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits:
            x = ste(x, absmax_act(x, self.a_bits), self.lam)
        return F.linear(x, self.quantized_weight(), self.bias)


def prepare(model: nn.Module, *, grid: str = "minmax", bits: int = 2,
            group_size: int | None = 64, a_bits: int | None = None,
            lsq: bool = False) -> dict[str, FakeQuantLinear]:
    """Put a :class:`FakeQuantLinear` in place of every decoder linear; freeze the embedding
    (and the tied lm_head).  Returns the new layers by name."""
    from edgellm.models import linear_layers
    from edgellm.quant.rtn import check_group_size

    linears = linear_layers(model)
    if not linears:
        raise QATError("the model has no linear layers to quantize")
    if grid == "q4_0":
        group_size = 32
    if grid != "ternary":
        for lin in linears.values():
            check_group_size(lin.in_features, group_size)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, lin in linears.items():
        layer = FakeQuantLinear(lin, grid=grid, bits=bits, group_size=group_size, a_bits=a_bits,
                                lsq_bits=bits if lsq else None)
        replace_module(model, name, layer)
        layer.weight.requires_grad_(True)
        layers[name] = layer
    for name, p in model.named_parameters():  # norms train too; the embedding does not
        if "norm" in name:
            p.requires_grad_(True)
    return layers


def set_lambda(model: nn.Module, lam: float) -> None:
    """Set the quantization strength ``λ`` of every fake-quantized layer."""
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.lam = float(lam)


@torch.no_grad()
def finalize(model: nn.Module) -> dict:
    """Round every :class:`FakeQuantLinear`'s weight onto its grid, put a plain ``nn.Linear`` back
    (BitNet's activation quantizer stays as a forward pre-hook) and return ``{name: QTensor}``."""
    from edgellm.quant.qtensor import QTensor

    qts = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, FakeQuantLinear):
            continue
        w = m.weight
        if m.lsq_bits:
            from edgellm.qat.lsq import lsq_codes

            scale = m.step.detach().half().float().clamp(min=6e-8)  # stored fp16
            qt = QTensor(lsq_codes(w, scale, m.lsq_bits), scale, torch.zeros_like(scale),
                         tuple(w.shape), m.lsq_bits, m.group_size, True, "int", 16)
        elif m.grid == "q4_0":
            from dataclasses import replace

            from edgellm.quant.gguf_formats import quantize_gguf

            # llama.cpp's Q4_0 codes as a plain signed 4-bit integer tensor (codes −8 … 7, fp16
            # scale per 32): what `edgellm quantize --out` saves and the export writes as Q4_0
            qt = replace(quantize_gguf(w, "Q4_0"), fmt="int")
        elif m.grid == "ternary":
            from edgellm.qat.bitnet import absmean_ternary

            codes, gamma = absmean_ternary(w)
            scale = gamma.reshape(1, 1).expand(w.shape[0], 1).clone()
            qt = QTensor(codes, scale, torch.zeros_like(scale), tuple(w.shape), 2, w.shape[1],
                         True, "ternary", 32)
        else:
            from edgellm.quant.rtn import quantize

            qt = quantize(w, m.bits, m.group_size, sym=False)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        lin.weight = nn.Parameter(qt.dequantize(), requires_grad=False)
        if m.bias is not None:
            lin.bias = m.bias
        if m.a_bits:
            bits = m.a_bits
            lin.register_forward_pre_hook(lambda mod, args, b=bits: (absmax_act(args[0], b),))
        replace_module(model, name, lin)
        qts[name] = qt
    for p in model.parameters():
        p.requires_grad_(False)
    return qts
