"""``LowRankLinear``: a linear layer stored as two thinner ones, swapped into a real model, and
the save / load of a factorized model (config + safetensors + the ranks as JSON).

``LowRankLinear(A, B, bias)`` computes ``y = (x Aᵀ) Bᵀ + bias``: first ``in → r`` (no bias),
then ``r → out`` with the original bias.  The model really is smaller (``r·(m + n)`` instead of
``m·n`` parameters per factorized layer) and really runs two smaller matmuls, so its speed is
measured like any other model's (:mod:`edgellm.measure`).  A plain Hugging Face
``from_pretrained`` would not know this module, so :func:`load_factorized` rebuilds the model
from its config, swaps the factorized modules in by the saved ranks, then loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from edgellm.lowrank.svd import LowRankError

RANKS_FILE = "lowrank.json"
WEIGHTS = "model.safetensors"


class LowRankLinear(nn.Module):
    """``W ≈ B A`` as two linears: ``first`` (in → r, weight ``A`` (r, in), no bias) and
    ``second`` (r → out, weight ``B`` (out, r), the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype)  # A (r, in)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype)  # B (out, r)

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> LowRankLinear:
        """A module computing ``x (B A)ᵀ + bias`` from ``B`` (out, r) and ``A`` (r, in)."""
        (m, r), (r2, n) = B.shape, A.shape
        if r != r2:
            raise LowRankError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not chain: B's "
                               "columns must equal A's rows")
        mod = cls(n, m, r, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            mod.first.weight.copy_(A)
            mod.second.weight.copy_(B)
            if bias is not None:
                mod.second.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.second(self.first(x))  # (..., r) in between

    def dense_weight(self) -> torch.Tensor:
        """``B @ A`` (out, in): the dense weight this module stands for."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.second.bias is not None}")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """The factorized layers of a model by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def ranks_of(model: nn.Module) -> dict[str, int]:
    """``{name: rank}`` of every :class:`LowRankLinear` in the model."""
    return {n: m.rank for n, m in lowrank_modules(model).items()}


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each storage once (the tied lm_head dropped), contiguous."""
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[k] = t.detach().contiguous()
    return out


def save_factorized(model: nn.Module, folder, tokenizer=None, *, meta: dict | None = None) -> Path:
    """Save a factorized model to ``folder``: ``config.json``, ``model.safetensors`` (every
    tensor once), ``lowrank.json`` (``{"ranks": {name: r}, ...meta}``) and the tokenizer.

    Written to a temporary folder beside it, then renamed: a failure leaves no partial folder.
    ``folder`` must not exist yet, or be empty.
    """
    from safetensors.torch import save_file

    from edgellm.records import write_folder

    folder = Path(folder).expanduser()
    with write_folder(folder) as tmp:
        model.config.save_pretrained(tmp)
        save_file(_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        info = {"ranks": ranks_of(model), **(meta or {})}
        (tmp / RANKS_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


def load_factorized(folder, *, dtype: torch.dtype = torch.float32):
    """Reload what :func:`save_factorized` wrote: ``(model, tokenizer or None, info)``.

    Builds the architecture from ``config.json``, swaps a :class:`LowRankLinear` of the saved
    rank in at every factorized name, loads the weights (strict: every tensor must match), and
    re-ties the embedding and lm_head.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder).expanduser()
    if not (folder / RANKS_FILE).is_file() or not (folder / WEIGHTS).is_file():
        raise LowRankError(f"{folder} is not a saved factorized model (needs {RANKS_FILE} and "
                           f"{WEIGHTS}); save one with edgellm lowrank --out DIR")
    info = json.loads((folder / RANKS_FILE).read_text())
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, r in info["ranks"].items():
        old = model.get_submodule(name)
        replace_module(model, name, LowRankLinear(old.in_features, old.out_features, int(r),
                                                  bias=old.bias is not None, dtype=dtype))
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise LowRankError(f"{folder}: weights do not match the saved ranks (missing "
                           f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    tok = None
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tok, info
