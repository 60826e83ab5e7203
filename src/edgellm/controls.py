"""Control models: the default model moved off the grid its weights came on.

Every weight of the default model's decoder linears sits on a llama.cpp Q4_1 grid: blocks of 32
consecutive weights of a row, each ``w = m + d·q`` with ``q ∈ {0, …, 15}``, ``m`` the block's
minimum and ``d = (max − min) / 15`` its step.  Any quantizer that can land on that grid again
(asymmetric 4-bit with groups of 32, or a multiple of it) looks lossless here, and finer formats
(Q5_1, 8-bit) cannot do better than the grid they start from.  A finding measured on these weights
may be a property of their provenance rather than of the method.

No small LLM with weights at 16-bit precision is reachable offline, so the control is built: each
weight gets a deterministic uniform dither of ±½ step of its own Q4_1 block,

    w' = w + d · (u − ½),   u ~ U(0, 1) i.i.d. from one seeded generator,

which spreads every grid point over the whole interval around it.  Asymmetric 4-bit g32 RTN on
the control then errs about as much as it does on Gaussian weights with the same group ranges
(the test asks for at least 80 %), while the model's function moves only by a quarter-step
perturbation (its own perplexity is recorded beside the default's).  The tied embedding
(Q8_0-sourced, 8-bit, a far finer grid) is left as it is.

This module is pure tensors and the registry of controls; :func:`edgellm.models.load_model`
builds a control on first use and caches it like the default model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Q41_BLOCK = 32  # weights per llama.cpp Q4_1 block, consecutive along a row (the input dim)
Q41_LEVELS = 15  # q in 0..15


@dataclass(frozen=True)
class Control:
    name: str
    base: str  # the registry model it is built from
    seed: int  # of the dither's generator
    block: int = Q41_BLOCK
    about: str = ""


CONTROLS = {
    "smollm2-135m-degrid": Control(
        name="smollm2-135m-degrid", base="smollm2-135m", seed=0,
        about="smollm2-135m with every decoder linear dithered by U(-1/2, 1/2) of its Q4_1 "
              "block's step (off the 4-bit grid); embedding unchanged"),
}


def _blocks(W: torch.Tensor, block: int) -> torch.Tensor:
    if W.dim() != 2 or W.shape[1] % block:
        raise ValueError(f"a weight of shape {tuple(W.shape)} does not split into rows of "
                         f"blocks of {block}")
    return W.reshape(W.shape[0], W.shape[1] // block, block)  # (out, in/block, block)


def grid_step(W: torch.Tensor, block: int = Q41_BLOCK) -> torch.Tensor:
    """``(out, in/block, 1)``: the Q4_1 step ``(max − min) / 15`` of each block of a row."""
    G = _blocks(W, block)
    return (G.amax(-1, keepdim=True) - G.amin(-1, keepdim=True)) / Q41_LEVELS


def grid_residual(W: torch.Tensor, block: int = Q41_BLOCK) -> float:
    """How far ``W`` is from a Q4_1 grid, in steps: the largest ``|q − round(q)|`` over all
    weights, ``q = (w − min) / d`` per block (0 on the grid, up to ½ off it)."""
    G = _blocks(W.double(), block)
    lo = G.amin(-1, keepdim=True)
    d = grid_step(W.double(), block).clamp_min(torch.finfo(torch.float64).tiny)
    q = (G - lo) / d
    return (q - q.round()).abs().max().item()


def degrid(W: torch.Tensor, *, generator: torch.Generator, block: int = Q41_BLOCK) -> torch.Tensor:
    """``W + d · (u − ½)``: each weight dithered uniformly within ±½ step of its block."""
    d = grid_step(W, block)  # (out, in/block, 1)
    u = torch.rand(_blocks(W, block).shape, generator=generator, dtype=torch.float64)
    return (_blocks(W, block) + (d.double() * (u - 0.5)).to(W.dtype)).reshape(W.shape)


@torch.no_grad()
def degrid_linears(linears: dict, *, seed: int, block: int = Q41_BLOCK) -> dict:
    """Dither every ``nn.Linear`` of ``{name: linear}`` in place, in sorted name order from one
    generator seeded with ``seed`` (so the result depends on nothing else); returns
    ``{"n_linears", "max_residual_before", "max_residual_after"}``."""
    g = torch.Generator().manual_seed(seed)
    before, after = 0.0, 0.0
    for name in sorted(linears):
        lin = linears[name]
        before = max(before, grid_residual(lin.weight, block))
        lin.weight.copy_(degrid(lin.weight, generator=g, block=block))
        after = max(after, grid_residual(lin.weight, block))
    return {"n_linears": len(linears), "max_residual_before": before,
            "max_residual_after": after}


def same_range_gaussian(W: torch.Tensor, *, generator: torch.Generator,
                        block: int = Q41_BLOCK) -> torch.Tensor:
    """Gaussian weights with the block ranges of ``W``: each block of i.i.d. N(0, 1) samples
    mapped affinely onto the block's [min, max] (the reference the control is compared with)."""
    G = _blocks(W, block)
    z = torch.randn(G.shape, generator=generator, dtype=torch.float64)
    z = (z - z.amin(-1, keepdim=True)) / (z.amax(-1, keepdim=True) - z.amin(-1, keepdim=True))
    lo, hi = G.amin(-1, keepdim=True).double(), G.amax(-1, keepdim=True).double()
    return (lo + z * (hi - lo)).to(W.dtype).reshape(W.shape)
