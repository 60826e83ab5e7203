"""torchao on CPU: int8 weight-only and int8 dynamic-activation tensor subclasses.

:func:`apply_torchao` converts the decoder linears with torchao's ``quantize_`` (per-row int8
weight; for ``int8_dynamic`` also per-token int8 activations).  The tied embedding stays fp32.
"""

from __future__ import annotations

import torch

from edgellm.models import quiet_library_logs
from edgellm.quant.qtensor import QuantError

TORCHAO_MODES = ("int8_weight_only", "int8_dynamic")


def import_torchao():
    """``torchao.quantization`` (its expected CPU-only log lines dropped, see
    :func:`quiet_library_logs`)."""
    quiet_library_logs()
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise QuantError(f"torchao is not installed ({e}); pip install torchao") from None
    return tq


def check_torchao_mode(mode: str) -> None:
    if mode not in TORCHAO_MODES:
        raise QuantError(f"unknown torchao mode {mode!r}; use one of {', '.join(TORCHAO_MODES)}")


@torch.no_grad()
def apply_torchao(model: torch.nn.Module, mode: str = "int8_weight_only", *,
                  layers: dict | None = None) -> dict:
    """Quantize the decoder linears with torchao's ``quantize_`` (in place).

    ``int8_weight_only``: per-row symmetric int8 weight (an ``Int8Tensor`` subclass holding
    ``qdata``, ``scale``, ``zero_point``), dequantized inside the matmul.  ``int8_dynamic``: the
    same weight plus per-token int8 activations quantized at run time, int8 × int8 matmul.
    Returns ``{name: module}``; the tied embedding / lm_head is excluded by the filter.
    """
    from edgellm.models import linear_layers

    check_torchao_mode(mode)
    tq = import_torchao()
    layers = linear_layers(model) if layers is None else layers
    config = tq.Int8WeightOnlyConfig() if mode == "int8_weight_only" else \
        tq.Int8DynamicActivationInt8WeightConfig()
    names = set(layers)
    tq.quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    return {n: model.get_submodule(n) for n in layers}


def int8_symmetric_per_row(W: torch.Tensor) -> torch.Tensor:
    """torchao's symmetric per-row int8, from scratch: ``scale = absmax / 127.5`` (half of the
    255-wide int8 range), codes ``round(W · (1/scale))`` clamped to [-128, 127]; float32 W_hat."""
    s = W.detach().float().abs().amax(dim=1, keepdim=True) / 127.5  # (out, 1)
    return torch.round(W.float() * (1.0 / s)).clamp(-128, 127) * s


def torchao_dequantize(module: torch.nn.Module) -> torch.Tensor:
    """float32 weight (out, in) of a torchao-quantized linear."""
    w = module.weight
    if hasattr(w, "dequantize") and type(w) is not torch.nn.Parameter:
        return w.dequantize().float()
    raise QuantError(f"{type(module).__name__}.weight is not a torchao quantized tensor")
