"""Simulated activation quantization: the "A" of W8A8, W4A8, W4A4 and FP8 activations.

Weight-only quantization shrinks memory; quantizing the *inputs* of every linear layer as well
lets the matmul itself run in low precision (int8 × int8 → int32, or fp8 × fp8).  Activations
are harder than weights: they change with every token and a few channels carry outliers 10–100×
larger than the rest (see :mod:`edgellm.quant.actstats`).

For ``X`` (tokens, in_features) and ``b`` bits, symmetric integer fake quantization is::

    s = absmax / (2**(b-1) - 1)          q = clamp(round(X / s), -(2**(b-1) - 1), 2**(b-1) - 1)
    X_hat = q · s

with ``absmax`` taken per row (``granularity="token"``: one scale per token, computed on the fly
= *dynamic*) or over the whole tensor (``granularity="tensor"``).  A *static* scale is a single
per-tensor ``s`` measured once on calibration data and then fixed: cheaper at run time (no
reduction over the row before the matmul), but a token larger than anything seen in calibration
is clipped.  FP8 E4M3 (``fmt="fp8"``) scales ``absmax`` to the format's largest value 448 and
rounds through ``torch.float8_e4m3fn``; its relative (not absolute) rounding error is what makes
it forgiving of outliers.

:func:`apply_act_quant` wraps every decoder linear in an :class:`ActQuantLinear`, which
fake-quantizes the layer's input and multiplies by the layer's weight, itself fake-quantized
separately (``apply_rtn`` and friends overwrite it in place)::

    apply_rtn(model, bits=8, group_size=None, sym=True)   # W8: per-channel symmetric int8
    apply_act_quant(model, a_bits=8)                      # A8: dynamic per-token int8
    ...
    remove_act_quant(model)                               # back to plain nn.Linear

Integer-simulated results equal a real int8 GEMM up to float32 summation order (the products
of small integers and the per-row × per-column rescale are exact in float32 for 8 bits).
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.quant.modules import replace_module
from edgellm.quant.qtensor import QuantError

A_FORMATS = ("int", "fp8")
GRANULARITIES = ("token", "tensor")
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
_TINY = 1e-8  # scale floor: an all-zero row quantizes to zeros, not NaN


def check_act(bits: int, fmt: str = "int", granularity: str = "token") -> None:
    """Raise :class:`QuantError` unless (bits, fmt, granularity) is a supported combination.

    ``int`` takes 2–8 bits (or 16: a plain fp16 cast, no integer grid); ``fp8`` (E4M3) only 8.
    """
    if fmt not in A_FORMATS:
        raise QuantError(f"activation format {fmt!r} is not supported; use 'int' or 'fp8' (E4M3)")
    if fmt == "fp8" and bits != 8:
        raise QuantError(f"fp8 activations are 8-bit (E4M3); got a_bits={bits}: use a_bits=8 "
                         "with a_format='fp8', or a_format='int' for other widths")
    if fmt == "int" and not (bits == 16 or 2 <= bits <= 8):
        raise QuantError(f"a_bits={bits} is not supported; integer activations take 2–8 bits "
                         "(or 16 = fp16, i.e. no activation quantization)")
    if granularity not in GRANULARITIES:
        raise QuantError(f"granularity={granularity!r} is not supported; use 'token' "
                         "(one scale per row of X, dynamic) or 'tensor' (one scale for X)")


def act_qmax(bits: int = 8, fmt: str = "int") -> float:
    """Largest code magnitude: ``2**(bits-1) - 1`` for int, 448 for fp8 E4M3."""
    return FP8_MAX if fmt == "fp8" else float(2 ** (bits - 1) - 1)


def act_scale(x: torch.Tensor, bits: int = 8, fmt: str = "int",
              granularity: str = "token") -> torch.Tensor:
    """Symmetric absmax scale of ``x`` (..., in): (..., 1) per token or a 0-dim tensor."""
    x = x.float()
    absmax = x.abs().amax(dim=-1, keepdim=True) if granularity == "token" else x.abs().amax()
    return absmax.clamp_min(_TINY) / act_qmax(bits, fmt)


def quantize_act(x: torch.Tensor, bits: int = 8, fmt: str = "int", granularity: str = "token",
                 sym: bool = True, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Fake-quantize activations ``x`` (..., in_features); returns a tensor of ``x``'s dtype.

    ``granularity="token"``: one scale per row (per token); ``"tensor"``: one for all of ``x``.
    ``scale`` given (a float or 0-dim tensor, e.g. from calibration): *static* quantization with
    that per-tensor scale, values beyond ``scale · qmax`` are clipped.  ``scale=None``: *dynamic*,
    computed from ``x``.  ``sym=False`` (int only, dynamic only) uses a min/max grid with a zero
    point, ``2**bits`` levels.  ``bits=16`` with ``fmt="int"`` rounds through fp16.
    """
    check_act(bits, fmt, granularity)
    dtype = x.dtype
    if bits == 16:
        return x.half().to(dtype)
    xf = x.float()
    if not sym:
        if fmt != "int" or scale is not None:
            raise QuantError("asymmetric activation quantization (sym=False) is only available "
                             "for dynamic integer quantization (fmt='int', scale=None)")
        dims = dict(dim=-1, keepdim=True) if granularity == "token" else {}
        lo, hi = xf.amin(**dims), xf.amax(**dims)
        s = ((hi - lo) / (2 ** bits - 1)).clamp_min(_TINY)
        zero = torch.round(-lo / s)  # the code of 0.0: zero is exactly representable
        q = (torch.round(xf / s) + zero).clamp_(0, 2 ** bits - 1)
        return ((q - zero) * s).to(dtype)
    if scale is None:
        s = act_scale(xf, bits, fmt, granularity)
    else:
        s = torch.as_tensor(scale, dtype=torch.float32).clamp_min(_TINY)
    qmax = act_qmax(bits, fmt)
    y = (xf / s).clamp_(-qmax, qmax)  # static scales clip; dynamic ones never exceed qmax
    if fmt == "fp8":
        y = y.to(torch.float8_e4m3fn).float()  # round to the nearest E4M3 value (ties to even)
    else:
        y = torch.round(y)
    return (y * s).to(dtype)


class ActQuantLinear(nn.Linear):
    """An ``nn.Linear`` that fake-quantizes its input before ``x_hat @ W.T + b``.

    It shares ``weight`` and ``bias`` (the very same Parameters) with the layer it wraps, so
    weight quantizers that write ``lin.weight`` in place, :func:`edgellm.models.linear_layers`
    and size accounting see it as the original layer.  ``scale`` (a 0-dim float32 tensor) makes
    the activation quantization static per-tensor; ``None`` = dynamic at ``granularity``.
    """

    def __init__(self, lin: nn.Linear, a_bits: int = 8, a_format: str = "int",
                 granularity: str = "token", sym: bool = True,
                 scale: torch.Tensor | float | None = None):
        nn.Module.__init__(self)  # no fresh weight allocation: reuse lin's Parameters
        check_act(a_bits, a_format, granularity)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight
        self.register_parameter("bias", lin.bias)
        self.a_bits, self.a_format, self.granularity, self.sym = a_bits, a_format, granularity, sym
        self.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        self.__dict__["original"] = lin  # not a submodule: named_modules() stays unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x_hat = quantize_act(x, self.a_bits, self.a_format, self.granularity, self.sym,
                             self.scale)
        return nn.functional.linear(x_hat, self.weight, self.bias)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.scale is None else f"static scale={float(self.scale):.4g}"
        return (f"in={self.in_features}, out={self.out_features}, A: {self.a_format}"
                f"{self.a_bits} per-{self.granularity} {mode}")


@torch.no_grad()
def calibrate_act_absmax(model: nn.Module, calib, layers: dict[str, nn.Linear] | None = None, *,
                         batch_size: int = 8) -> dict[str, float]:
    """Largest |x| seen at each linear's input over the calibration ids (one forward pass)."""
    from edgellm.quant.actstats import input_absmax

    return {name: float(v.max()) for name, v in
            input_absmax(model, calib, layers=layers, batch_size=batch_size).items()}


def apply_act_quant(model: nn.Module, a_bits: int = 8, a_format: str = "int",
                    granularity: str = "token", static: bool = False, calib=None,
                    layers: dict[str, nn.Linear] | None = None, *, sym: bool = True,
                    batch_size: int = 8) -> dict:
    """Wrap the decoder linears (default :func:`edgellm.models.linear_layers`) in
    :class:`ActQuantLinear`; return an info dict.

    ``static=True`` measures one per-tensor scale per linear on ``calib`` ((n, seq_len) ids; a
    forward pass of the model as it is now) and forces ``granularity="tensor"``.  Layers already
    wrapped are re-wrapped with the new settings.  Undo with :func:`remove_act_quant`.
    """
    from edgellm.models import linear_layers

    if static:
        granularity = "tensor"
    check_act(a_bits, a_format, granularity)
    if static and calib is None:
        raise QuantError("static activation quantization measures its scales on calibration "
                         "data; pass calib=edgellm.get_calibration(tokenizer=tok) (or "
                         "--calib pydoc --n-samples N --seq-len L), or use static=False "
                         "(dynamic per-token scales)")
    if not sym and static:
        raise QuantError("static activation scales are symmetric; use sym=True")
    remove_act_quant(model)
    layers = linear_layers(model) if layers is None else layers
    scales = None
    if static and a_bits != 16:
        absmax = calibrate_act_absmax(model, calib, layers, batch_size=batch_size)
        qmax = act_qmax(a_bits, a_format)
        scales = {name: max(a, _TINY) / qmax for name, a in absmax.items()}
    for name, lin in layers.items():
        lin = lin.original if isinstance(lin, ActQuantLinear) else lin
        replace_module(model, name, ActQuantLinear(lin, a_bits, a_format, granularity, sym,
                                                   None if scales is None else scales[name]))
    info = {"a_bits": a_bits, "a_format": a_format, "granularity": granularity,
            "static": static, "a_sym": sym, "n_act_quantized": len(layers)}
    if scales is not None:
        info["act_scales"] = scales
    return info


def remove_act_quant(model: nn.Module) -> int:
    """Put plain ``nn.Linear`` layers back (sharing the current weights); return how many."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantLinear)]
    for name, mod in wrapped:
        lin = mod.original
        lin.weight, lin.bias = mod.weight, mod.bias  # keep whatever was written meanwhile
        replace_module(model, name, lin)
    return len(wrapped)
