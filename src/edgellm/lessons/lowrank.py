"""Lesson 08's shared pieces: the singular values of one layer's weights."""

from __future__ import annotations

import torch

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")


@torch.no_grad()
def layer_spectra(model, layer: int = 0, roles=ROLES) -> dict[str, tuple[tuple[int, int], torch.Tensor]]:
    """``{role: ((out, in), σ)}``: the singular values (float64, descending) of each linear of
    decoder ``layer`` named by ``roles`` (e.g. ``"mlp.down_proj"``)."""
    from edgellm.models import layer_linears

    lins = layer_linears(model, layer)
    out = {}
    for role in roles:
        W = lins[f"model.layers.{layer}.{role}"].weight.detach()
        out[role] = (tuple(W.shape), torch.linalg.svdvals(W).double())
    return out
