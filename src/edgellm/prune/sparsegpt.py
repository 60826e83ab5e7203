"""SparseGPT (Frantar & Alistarh, 2023): prune with Optimal Brain Surgeon updates, column by column.

For one linear layer with weights ``W`` (out, in) and calibration inputs ``X`` (n, in) the
layer-wise loss is ``‖W Xᵀ − Ŵ Xᵀ‖²`` with Hessian ``H = 2 XᵀX / n`` (in, in), shared by every
row.  Removing weight ``w_c`` of a row (OBS, Hassibi & Stork 1993) costs

    ε_c = w_c² / [H⁻¹]_cc

and the best compensation moves the row's remaining weights by ``δ = −w_c / [H⁻¹]_cc · H⁻¹_{c,:}``.
SparseGPT makes this affordable the way GPTQ does quantization (and is GPTQ's loop with the
quantizer replaced by "set to zero if masked"):

1. columns are visited left to right; after column ``c`` only columns ``> c`` are updated, so the
   inverse Hessians of the shrinking column sets are the rows of one upper Cholesky factor of
   ``H⁻¹`` (``Hinv`` below);
2. lazy blocks of ``block_size`` columns: updates inside a block at once, the rest of the matrix
   once per block;
3. adaptive mask selection: the mask for each block of ``block_size`` columns is chosen when the
   block is reached, from the *updated* weights, by the OBS score ``w² / [Hinv]_cc²`` (over the
   whole block, all rows together, as the paper's implementation does); with N:M the mask is
   chosen per group of ``m`` columns, the ``m − n`` lowest scores of each row in the group.
"""

from __future__ import annotations

import torch

from edgellm.calib import collect_inputs, layer_linears, sequential
from edgellm.hessian import hinv_cholesky
from edgellm.prune.layers import apply_mask, check_target, prunable_linears, sparsity_stats
from edgellm.prune.masks import PruneError, check_nm, check_sparsity


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) marking the ``k`` lowest entries of ``scores`` (flattened);
    stable sort, so ties go to the lower index."""
    flat = scores.flatten()
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[torch.argsort(flat, stable=True)[:k]] = True
    return out.view_as(scores)


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, *, block_size: int = 128,
                    damp: float = 0.01):
    """SparseGPT on one matrix.

    ``W`` (out, in) weights; ``H`` (in, in) the Hessian ``2 XᵀX / n`` of its inputs.
    Unstructured: in every block of ``block_size`` columns exactly ``floor(sparsity · out ·
    block)`` weights are pruned (rows differ).  ``nm=(n, m)``: every row keeps ``n`` of each
    ``m`` consecutive inputs.  Returns ``(pruned W float32 (out, in), keep-mask bool (out, in))``.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise PruneError(f"W must be (out, in) and H (in, in); got W {tuple(W.shape)}, "
                         f"H {tuple(H.shape)}")
    n_out, n_in = W.shape
    if nm is not None:
        nm_n, nm_m = check_nm(*nm, n_in)
        if block_size % nm_m:
            raise PruneError(f"block_size={block_size} must be a multiple of M={nm_m}")
    else:
        sparsity = check_sparsity(sparsity)
    W = W.detach().float().clone()  # (out, in), updated in place as columns are pruned
    H = H.detach().float().clone()  # (in, in)
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = hinv_cholesky(H, damp)  # (in, in) upper

    prune = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (out, B) this block, updated immediately
        Q1 = torch.zeros_like(W1)  # the block after pruning
        Err1 = torch.zeros_like(W1)  # scaled errors, for the lazy update of the rest
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        d = Hinv1.diagonal()  # (B,) [Hinv]_cc
        mask1 = torch.zeros_like(W1, dtype=torch.bool)  # pruned in this block
        if nm is None:  # adaptive mask for the block, on its current (updated) weights
            score = W1.square() / d.square()  # (out, B) OBS error w²/[Hinv]_cc²
            mask1 = _lowest_k(score, int(sparsity * score.numel()))
        for i in range(i2 - i1):
            if nm is not None and (i % nm_m) == 0:
                score = W1[:, i:i + nm_m].square() / d[i:i + nm_m].square()  # (out, m)
                order = torch.argsort(score, dim=1, stable=True)[:, :nm_m - nm_n]
                mask1[:, i:i + nm_m].scatter_(1, order, True)
            w = W1[:, i]  # (out,)
            q = w.masked_fill(mask1[:, i], 0.0)  # the "quantizer": zero if pruned
            Q1[:, i] = q
            err = (w - q) / d[i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # OBS update in the block
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after the block
    return W, ~prune


@torch.no_grad()
def apply_sparsegpt(model, calib, sparsity: float | None = 0.5, nm: tuple[int, int] | None = None,
                    *, block_size: int = 128, damp: float = 0.01,
                    batch_size: int = 8, progress: bool = True) -> dict:
    """SparseGPT-prune the decoder's linears in place; return the sparsity stats.

    ``calib`` (n_samples, seq_len) token ids.  Sequential as in the paper: each decoder layer's
    Hessians come from the outputs of the already pruned layers before it; linears reading the
    same input (q/k/v; gate/up) share one Hessian.
    """
    linears_all = prunable_linears(model)
    sparsity, nm = check_target(sparsity, nm, linears_all)

    def prune_layer(index, layer, stream):
        linears = layer_linears(model, index)
        stats = collect_inputs(layer, linears, stream, xtx=True)
        for name, lin in linears.items():
            Wp, mask = sparsegpt_prune(lin.weight, stats[name].H, sparsity, nm,
                                       block_size=block_size, damp=damp)
            lin.weight.copy_(Wp.to(lin.weight.dtype))
            apply_mask(lin, mask)  # exact zeros where pruned

    sequential(model, calib, prune_layer, batch_size=batch_size, progress=progress,
               desc="SparseGPT")
    return sparsity_stats(model, linears_all)
