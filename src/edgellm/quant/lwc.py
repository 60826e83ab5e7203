"""Learnable weight clipping (LWC, from OmniQuant: Shao et al., 2024).

Min/max RTN spends its grid on the extreme weights of each group; clipping the range a little
makes the steps finer for all the others.  AWQ searches one shrink ratio per group on a grid;
LWC *learns* two clipping strengths per group (or per output channel) by gradient descent:

    γ = sigmoid(a),  β = sigmoid(b)             (in (0, 1))
    hi = γ · max(w),  lo = β · min(w)           (asymmetric; symmetric: ±γ · max|w|)
    s = (hi − lo) / (2^bits − 1)
    Q(w) = clamp(⌊(w − lo) / s⌉, 0, 2^bits − 1) · s + lo

trained to minimise the layer's output reconstruction error on calibration inputs ``X``
(tokens, in):

    L(a, b) = ‖X Wᵀ − X Q(W)ᵀ‖² / n_tokens = tr(ΔW H ΔWᵀ) / 2,   H = 2 XᵀX / n,  ΔW = W − Q(W)

(:func:`edgellm.hessian.layer_error`; the ``/ 2`` undoes the factor of ``H``'s convention, so
the loss is the mean squared output error per token and Adam's steps are those of that loss).

``⌊·⌉`` has zero gradient almost everywhere, so its gradient is replaced by the identity (the
straight-through estimator, STE): gradients flow to ``a`` and ``b`` through ``s`` and ``lo``.
The error is computed from ``H`` (in, in), so a step costs ``out · in²`` whatever the number of
calibration tokens.  The paper's objective is the error of a whole transformer block with
LWC and learned equivalent transforms trained jointly; here each linear layer is trained alone
(like GPTQ's layer-wise objective), processing the decoder sequentially
(:mod:`edgellm.calib`).

The result is never worse than min/max on the objective: the best iterate is kept, and min/max
(``γ = β = 1``) is the starting reference.  The learned strengths are what a lesson needs to
reproduce the quantized model without training: :func:`save_clips` / :func:`load_clips` store
them (fp16 safetensors), and ``apply_lwc(model, clips=...)`` applies them.  ``clip_per`` chooses
one (γ, β) pair per group (the paper's choice) or per output channel (10× smaller to store).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgellm import hessian
from edgellm.calib import collect_inputs, in_model_order, layer_linears, sequential, single_thread
from edgellm.hessian import layer_error
from edgellm.quant.qtensor import QTensor, QuantError, dtype_bits
from edgellm.quant.result import QuantResult
from edgellm.quant.rtn import (
    check_bits,
    check_group_size,
    check_linears,
    code_range,
    quantize_codes,
)

CLIP_PER = ("group", "channel")
INIT_LOGIT = 4.0  # OmniQuant's initial logit: sigmoid(4) = 0.982


def _grouped(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out, n = W.shape
    g = n if group_size is None else group_size
    return W.float().reshape(out, n // g, g)  # (out, G, g)


def clip_params(Wg: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, bits: int,
                sym: bool, scale_dtype: torch.dtype | None = None):
    """``(scale, offset)`` (out, G, 1) of grouped weights ``Wg`` (out, G, g) clipped by ``γ, β``.

    ``gamma``/``beta`` broadcast to (out, G, 1) (values in (0, 1]; ``beta`` unused when
    ``sym``).  Differentiable; rounding through ``scale_dtype`` (fp16) is done with an STE.
    """
    if sym:
        absmax = Wg.abs().amax(-1, keepdim=True)
        scale = gamma * absmax / (2 ** (bits - 1) - 1)
        offset = torch.zeros_like(scale)
    else:
        hi = gamma * Wg.amax(-1, keepdim=True)
        lo = beta * Wg.amin(-1, keepdim=True)
        scale = (hi - lo) / (2 ** bits - 1)
        offset = lo
    if scale_dtype is not None:  # round the stored parameters, pass gradients straight through
        scale = scale + (scale.to(scale_dtype).float() - scale).detach()
        offset = offset + (offset.to(scale_dtype).float() - offset).detach()
    return scale.clamp(min=1e-8), offset


def fake_quant_ste(Wg: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                   sym: bool) -> torch.Tensor:
    """``clamp(round((w − offset)/scale)) · scale + offset`` with a straight-through round."""
    lo, hi = code_range(bits, sym)
    x = (Wg - offset) / scale
    q = x + (torch.round(x) - x).detach()  # forward: round; backward: identity
    return q.clamp(lo, hi) * scale + offset


def _shape_params(params: dict, out: int, G: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``gamma``, ``beta`` (out, G) or (out, 1) as (out, G|1, 1) float32."""
    gamma = params["gamma"].float().reshape(out, -1, 1)
    beta = params.get("beta")
    beta = None if beta is None else beta.float().reshape(out, -1, 1)
    if gamma.shape[1] not in (1, G):
        raise QuantError(f"clip parameters of shape {tuple(params['gamma'].shape)} do not match "
                         f"a weight with {out} rows and {G} groups")
    return gamma, beta


def quantize_with_clips(W: torch.Tensor, params: dict, bits: int = 4,
                        group_size: int | None = 64, sym: bool = False,
                        scale_dtype: torch.dtype | None = torch.float16) -> QTensor:
    """The :class:`QTensor` of ``W`` (out, in) with clipping strengths ``params``.

    ``params = {"gamma": (out, G) or (out, 1), "beta": same (asym only)}``; ``γ = β = 1`` is
    exactly RTN's min/max quantization.
    """
    check_bits(bits)
    out, n = W.shape
    check_group_size(n, group_size)
    Wg = _grouped(W, group_size)
    gamma, beta = _shape_params(params, out, Wg.shape[1])
    with torch.no_grad():
        scale, offset = clip_params(Wg, gamma, beta, bits, sym, scale_dtype)
        if scale_dtype is not None:
            scale = scale.to(scale_dtype).float()
        codes = quantize_codes(Wg, scale, offset, bits, sym)
    return QTensor(codes=codes.reshape(out, n), scale=scale.squeeze(-1),
                   offset=offset.squeeze(-1), shape=(out, n), bits=bits, group_size=n // Wg.shape[1],
                   sym=sym, fmt="int", scale_bits=dtype_bits(scale_dtype))


@dataclass
class LearnedClip:
    """What :func:`learn_clipping` learned for one weight.

    ``qtensor``     the quantized weight with the learned clipping
    ``params``      ``{"gamma", "beta"}`` float32 (out, G) or (out, 1); no ``beta`` when ``sym``
    ``err_minmax``  mean squared output error per token of plain min/max RTN
    ``err_lwc``     the same with the learned clipping (never above ``err_minmax``)
    ``losses``      the training loss at each step (the same error, before each update)
    """

    qtensor: QTensor
    params: dict
    err_minmax: float
    err_lwc: float
    losses: list = field(default_factory=list)


@single_thread()
def learn_clipping(W: torch.Tensor, X: torch.Tensor | None = None, *, bits: int = 4,
                   group_size: int | None = 64, sym: bool = False, steps: int = 40,
                   lr: float = 0.1, H: torch.Tensor | None = None, clip_per: str = "channel",
                   scale_dtype: torch.dtype | None = torch.float16) -> LearnedClip:
    """Learn the clipping strengths of one linear weight ``W`` (out, in).

    ``X`` (..., in) calibration inputs, or their ``H = 2 XᵀX / n`` (in, in).
    Adam on the logits ``a, b`` (initialised at 4: ``γ = β = 0.98``) for ``steps`` steps of
    learning rate ``lr`` on the mean squared output error per token,
    ``tr(ΔW H ΔWᵀ) / 2``.  Returns a :class:`LearnedClip`.
    """
    check_bits(bits)
    if W.dim() != 2:
        raise QuantError(f"expected a 2-D (out_features, in_features) weight, got shape "
                         f"{tuple(W.shape)}")
    if clip_per not in CLIP_PER:
        raise QuantError(f"clip_per={clip_per!r}: use one of {', '.join(CLIP_PER)}")
    out, n = W.shape
    check_group_size(n, group_size)
    if H is None:
        if X is None:
            raise QuantError("learn_clipping needs calibration inputs X (tokens, in) or "
                             "H = 2 XᵀX / n (in, in)")
        if X.shape[-1] != n:
            raise QuantError(f"X has {X.shape[-1]} features but W has in_features={n}")
        H = hessian.from_inputs(X)  # (in, in)
    H = H.float()
    W = W.detach().float()
    Wg = _grouped(W, group_size)  # (out, G, g)
    G = Wg.shape[1] if clip_per == "group" else 1
    a = torch.full((out, G, 1), INIT_LOGIT, requires_grad=True)
    b = None if sym else torch.full((out, G, 1), INIT_LOGIT, requires_grad=True)
    opt = torch.optim.Adam([a] + ([] if sym else [b]), lr=lr)

    def loss_of(gamma, beta):
        scale, offset = clip_params(Wg, gamma, beta, bits, sym, scale_dtype)
        return layer_error(W, fake_quant_ste(Wg, scale, offset, bits, sym).reshape(out, n), H=H)

    ones = torch.ones(out, G, 1)
    with torch.no_grad():
        err_minmax = loss_of(ones, None if sym else ones).item()
    best = (err_minmax, ones.clone(), None if sym else ones.clone())
    losses = []
    for _ in range(steps):
        gamma, beta = torch.sigmoid(a), None if sym else torch.sigmoid(b)
        loss = loss_of(gamma, beta)
        losses.append(loss.item())
        if losses[-1] < best[0]:
            best = (losses[-1], gamma.detach().clone(), None if sym else beta.detach().clone())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # the last update was never scored
        gamma, beta = torch.sigmoid(a), None if sym else torch.sigmoid(b)
        last = loss_of(gamma, beta).item()
        if last < best[0]:
            best = (last, gamma.clone(), None if sym else beta.clone())
    params = {"gamma": best[1].reshape(out, G)}
    if not sym:
        params["beta"] = best[2].reshape(out, G)
    # stored values are fp16: round them now so a reloaded cache gives the very same weights
    params = {k: v.half().float() for k, v in params.items()}
    qt = quantize_with_clips(W, params, bits, group_size, sym, scale_dtype)
    err_lwc = layer_error(W, qt.dequantize(), H=H).item()
    if err_lwc > err_minmax:  # fp16 rounding of the strengths undid a tiny gain: keep min/max
        params = {k: torch.ones_like(v) for k, v in params.items()}
        qt = quantize_with_clips(W, params, bits, group_size, sym, scale_dtype)
        err_lwc = err_minmax
    return LearnedClip(qt, params, err_minmax, err_lwc, losses)


def apply_lwc(model, calib=None, *, bits: int = 4, group_size: int | None = 64,
              sym: bool = False, steps: int = 40, lr: float = 0.1, clips: dict | None = None,
              clip_per: str = "channel", scale_dtype: torch.dtype | None = torch.float16,
              layers=None, batch_size: int = 8, progress: bool = False) -> QuantResult:
    """LWC-quantize the decoder's linear layers in place; return a :class:`QuantResult`.

    With ``clips`` (``{name: {"gamma", "beta"}}``, e.g. from :func:`load_clips`) nothing is
    trained and no calibration set is needed.  Otherwise each decoder layer's inputs are
    collected on the already quantized model (:func:`edgellm.calib.sequential`) and
    every linear's clipping is learned from ``H = 2 XᵀX / n``.  The result's ``clips`` are
    the learned (or given) parameters, for :func:`save_clips`; its ``info`` holds ``errors``
    (per layer: ``err_minmax``, ``err_lwc``, ``reduction`` = 1 − lwc/minmax; when trained)
    and ``seconds``.
    """
    check_bits(bits)
    t0 = time.perf_counter()
    result: dict[str, QTensor] = {}
    if clips is not None:
        from edgellm.models import linear_layers

        lins = linear_layers(model)
        missing = [n for n in lins if n not in clips]
        if missing:
            raise QuantError(f"the clip cache has no entry for {len(missing)} layers (e.g. "
                             f"{missing[0]}); it was made for another model or layer set")
        check_linears(lins, group_size)
        with torch.no_grad():
            for name, lin in lins.items():
                qt = quantize_with_clips(lin.weight, clips[name], bits, group_size, sym,
                                         scale_dtype)
                lin.weight.copy_(qt.dequantize().to(lin.weight.dtype))
                result[name] = qt
        return QuantResult(result, {"seconds": time.perf_counter() - t0}, clips=clips)
    learned, errors = {}, {}

    def quantize_layer(index, layer, stream):
        linears = layer_linears(model, index)
        check_linears(linears, group_size)
        stats = collect_inputs(layer, linears, stream, xtx=True)
        for name, lin in linears.items():
            with torch.enable_grad():
                fit = learn_clipping(lin.weight, bits=bits, group_size=group_size, sym=sym,
                                     steps=steps, lr=lr, H=stats[name].H, clip_per=clip_per,
                                     scale_dtype=scale_dtype)
            lin.weight.copy_(fit.qtensor.dequantize().to(lin.weight.dtype))
            result[name], learned[name] = fit.qtensor, fit.params
            errors[name] = {"err_minmax": fit.err_minmax, "err_lwc": fit.err_lwc,
                            "reduction": 1 - fit.err_lwc / max(fit.err_minmax, 1e-30)}

    sequential(model, calib, quantize_layer, layers=layers, batch_size=batch_size,
               progress=progress, desc="LWC")
    return QuantResult(in_model_order(model, result),
                       {"errors": errors, "seconds": time.perf_counter() - t0}, clips=learned)


def save_clips(clips: dict, path, metadata: dict | None = None) -> Path:
    """Write ``{name: {"gamma", "beta"}}`` as fp16 safetensors (keys ``name.gamma``...)."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}.{k}": v.detach().to(torch.float16).contiguous()
            for name, p in clips.items() for k, v in p.items()}
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: never half a file
    save_file(flat, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def load_clips(path) -> dict:
    """Read :func:`save_clips`'s file back: ``{name: {"gamma", "beta"}}`` float32."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise QuantError(f"no clip cache at {path}; train one with res = apply_lwc(...) and "
                         "save_clips(res.clips, path)")
    clips: dict = {}
    for key, v in load_file(str(path)).items():
        name, k = key.rsplit(".", 1)
        clips.setdefault(name, {})[k] = v.float()
    return clips


def clips_metadata(path) -> dict:
    """The string metadata stored with a clip cache."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
