"""Wanda (Sun, Liu, Bair, Kolter, 2023): prune by weight magnitude times input activation norm.

For a linear layer ``y = W x`` fed calibration inputs ``X`` (n_tokens, in), the score of weight
``W_ij`` is

    S_ij = |W_ij| · ‖X_j‖₂

where ``‖X_j‖₂`` is the L2 norm of input channel ``j`` over all calibration tokens.  Weights are
compared within each output row (each row loses the same fraction), no weight is updated, and
there is no Hessian: one forward pass per layer gives everything.
"""

from __future__ import annotations

import torch

from edgellm.calib import collect_inputs, layer_linears, sequential
from edgellm.prune.layers import apply_mask, check_target, prunable_linears, sparsity_stats
from edgellm.prune.masks import PruneError, select_mask


def wanda_scores(W: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance ``|W| · ‖X_j‖`` (out, in) float32.

    ``W`` (out, in) weights, ``x_norm`` (in,) the L2 norm of each input channel over the
    calibration tokens, ``sqrt(Σ_t x_tj²)``.
    """
    if x_norm.shape != (W.shape[1],):
        raise PruneError(f"x_norm must have shape ({W.shape[1]},) = in_features of W "
                         f"{tuple(W.shape)}; got {tuple(x_norm.shape)}")
    return W.detach().float().abs() * x_norm.float().unsqueeze(0)  # (out, in) * (1, in)


def input_norms(X: torch.Tensor) -> torch.Tensor:
    """``‖X_j‖₂`` per input channel of inputs ``X`` (..., in): (in,) float32."""
    X2 = X.reshape(-1, X.shape[-1]).float()  # (n, in)
    return X2.square().sum(0).sqrt()


@torch.no_grad()
def wanda_prune(W: torch.Tensor, x_norm: torch.Tensor, sparsity: float = 0.5,
                nm: tuple[int, int] | None = None, *, per: str = "row"):
    """Prune one matrix; returns ``(pruned W, keep-mask)``."""
    mask = select_mask(wanda_scores(W, x_norm), sparsity, nm, per=per)
    return W * mask, mask


@torch.no_grad()
def apply_wanda(model, calib, sparsity: float | None = 0.5, nm: tuple[int, int] | None = None, *,
                per: str = "row", layer_sparsity: dict[int, float] | None = None,
                batch_size: int = 8, progress: bool = True) -> dict:
    """Wanda-prune the decoder's linears in place; return :func:`~edgellm.prune.layers.sparsity_stats`.

    ``calib`` (n_samples, seq_len) token ids.  Layers are pruned in order and each layer's
    input norms come from the outputs of the already pruned layers before it (as the reference
    implementation does); the linears inside one decoder layer all see the dense layer's inputs.
    ``layer_sparsity`` ``{decoder layer index: sparsity}`` overrides ``sparsity`` per layer
    (unstructured only; :mod:`edgellm.prune.sensitivity`).
    """
    linears_all = prunable_linears(model)
    sparsity, nm = check_target(sparsity, nm, linears_all)
    if layer_sparsity is not None:
        if nm is not None:
            raise PruneError("per-layer sparsity applies to unstructured pruning, not N:M")
        for s in layer_sparsity.values():
            check_target(s, None, linears_all)

    def prune_layer(index, layer, stream):
        linears = layer_linears(model, index)
        stats = collect_inputs(layer, linears, stream, xtx=False)
        s = sparsity if layer_sparsity is None else layer_sparsity.get(index, sparsity)
        for name, lin in linears.items():
            x_norm = stats[name].sq.sqrt()  # (in,) ‖X_j‖₂ over all calibration tokens
            apply_mask(lin, select_mask(wanda_scores(lin.weight, x_norm), s, nm, per=per))

    sequential(model, calib, prune_layer, batch_size=batch_size, progress=progress, desc="Wanda")
    return sparsity_stats(model, linears_all)
