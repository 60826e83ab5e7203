"""AWQ's motivation experiment: keep 1 % of the input channels in full precision.

Lin et al. (AWQ, 2023, section 3.1) observe that a small fraction of a linear layer's *input
channels* matter far more than the rest, and that activations, not weights, tell which:
quantize every weight with RTN, then restore the top 1 % of input channels (columns ``W[:, j]``)
to their original values, chosen

``act``     by the mean activation magnitude ``E|x_j|`` on calibration data (AWQ's choice),
``weight``  by the mean weight magnitude of the column ``mean_i |W_ij|``,
``random``  uniformly at random (a fixed generator: the control).

Keeping columns in fp16 is not a deployable format (mixed-precision columns need a scatter in
the kernel); AWQ uses the observation to motivate *scaling* salient channels instead.  The
experiment only asks: which statistic finds the channels whose precision matters?
"""

from __future__ import annotations

import math

import torch

from edgellm.quant.qtensor import QuantError

SALIENT_BY = ("act", "weight", "random")


def check_salient(fraction: float | None, by: str = "act") -> None:
    """Reject a fraction outside (0, 0.5] or an unknown criterion (raises :class:`QuantError`)."""
    if by not in SALIENT_BY:
        raise QuantError(f"unknown salient-channel criterion {by!r}; use one of "
                         f"{', '.join(SALIENT_BY)}")
    if fraction is None:
        return
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 0.5):
        raise QuantError(f"keep_salient={fraction} must be a fraction in (0, 0.5] of the input "
                         "channels (AWQ keeps 0.01 = 1 %)")


def n_salient(in_features: int, fraction: float) -> int:
    """How many channels ``fraction`` keeps: at least one, rounded up."""
    return max(1, math.ceil(fraction * in_features))


def salient_channels(W: torch.Tensor, fraction: float, by: str = "act", *,
                     act_mag: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (k,) int64 of the ``fraction`` most salient input channels of ``W`` (out, in).

    ``act_mag`` (in,) is the mean ``|x|`` per input channel (needed for ``by="act"``);
    ``generator`` drives ``by="random"``.
    """
    check_salient(fraction, by)
    k = n_salient(W.shape[1], fraction)
    if by == "act":
        if act_mag is None or act_mag.shape != (W.shape[1],):
            raise QuantError("salient channels by activation need act_mag of shape "
                             f"({W.shape[1]},): the mean |x| per input channel")
        score = act_mag.float()
    elif by == "weight":
        score = W.detach().float().abs().mean(dim=0)  # (in,)
    else:
        return torch.randperm(W.shape[1], generator=generator)[:k]
    return torch.topk(score, k).indices


@torch.no_grad()
def mean_abs_inputs(model, calib, layers: dict, *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``E|x|`` (in,) float32 at each linear's input over the calibration ids (n, seq_len)."""
    from edgellm.calib import capture_inputs, check_calibration

    ids = check_calibration(calib)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def on_input(name, x):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (B·T, in)
        sums[name] = x2.abs().sum(0) + sums.get(name, 0)
        counts[name] = counts.get(name, 0) + x2.shape[0]

    base = getattr(model, "model", model)  # no lm_head: its logits are not needed
    with capture_inputs(layers, on_input):
        for i in range(0, ids.shape[0], batch_size):
            base(input_ids=ids[i:i + batch_size], use_cache=False)
    return {n: sums[n] / counts[n] for n in layers}


@torch.no_grad()
def restore_salient(layers: dict, originals: dict[str, torch.Tensor], fraction: float,
                    by: str = "act", *, act_mag: dict[str, torch.Tensor] | None = None,
                    seed: int = 0) -> dict:
    """Put the salient input columns of each (already quantized) linear back to ``originals``.

    Returns ``{"n_salient_channels": total kept, "bpw_extra": extra bits per weight if the
    kept columns were stored in fp16 next to the quantized ones}``.
    """
    check_salient(fraction, by)
    g = torch.Generator().manual_seed(seed)
    kept = 0
    n_weights = 0
    for name, lin in layers.items():
        W0 = originals[name]
        idx = salient_channels(W0, fraction, by, act_mag=None if act_mag is None
                               else act_mag.get(name), generator=g)
        lin.weight[:, idx] = W0[:, idx].to(lin.weight.dtype)
        kept += len(idx)
        n_weights += W0.numel()
        # every kept weight costs 16 bits instead of its code
    extra = 16 * sum(originals[n].shape[0] * n_salient(originals[n].shape[1], fraction)
                     for n in layers) / max(n_weights, 1)
    return {"n_salient_channels": kept, "bpw_extra": extra}
