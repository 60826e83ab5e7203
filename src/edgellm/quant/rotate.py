"""Rotating the residual stream (QuaRot, Ashkboos et al., 2024; SpinQuant, Liu et al., 2024).

A few channels of a Llama's residual stream carry activations 10–100× larger than the rest:
per-token activation quantization spends its whole range on them.  An orthogonal matrix ``Q``
(``Q Qᵀ = I``) mixes every channel into every other one, so an outlier's energy is spread over
all ``C`` channels, and it can be folded into the weights so the float model computes *exactly*
the same function (up to fp32 rounding).

Write the residual stream of a token as a row vector ``h`` (C,) and rotate it: ``h' = h Q``.

* RMSNorm commutes with ``Q`` once its per-channel weight is gone: ``‖h Q‖ = ‖h‖``, so
  ``n(h Q) = n(h) Q`` with ``n(h) = h / rms(h)``.  :func:`fuse_norms` first folds each norm's
  weight ``w`` into the linears reading it: ``(w ⊙ n) Wᵀ = n (W diag(w))ᵀ``, then sets ``w = 1``.
* a linear *reading* the stream (torch weight ``W`` (out, C), ``y = x Wᵀ``): it now receives
  ``x Q`` and must return the same ``y``: ``x Q W'ᵀ = x Wᵀ`` → ``W' = W Q``
  (q/k/v_proj, gate/up_proj, lm_head);
* a linear *writing* the stream (``W`` (C, in)): its output must come out rotated,
  ``z W'ᵀ = z Wᵀ Q`` → ``W' = Qᵀ W`` (o_proj, down_proj; a bias ``b`` becomes ``b Q``);
* the embedding's rows are stream vectors: ``E' = E Q``.

``Q`` is a normalised Hadamard matrix (entries ``±1/√C``: every output channel is an equal mix
of every input channel, the most even spread there is) or a random orthogonal matrix.  For
``C = 576 = 36 · 16`` (SmolLM2-135M) no Sylvester (power of 2) Hadamard matrix exists; it is
the Kronecker product of an order-36 Hadamard matrix (Paley's second construction with
``q = 17``) with the Sylvester matrix of order 16.

The rotation changes the tied embedding and lm_head differently once the final norm is fused
into lm_head (``W_lm = E diag(w) Q`` but ``E' = E Q``), so the model is **untied**: lm_head
gets its own weight (+28 M parameters in memory for SmolLM2-135M).  Only the online-free part of
QuaRot is implemented (no Hadamard inside attention or before ``down_proj``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgellm.calib import capture_inputs
from edgellm.models import decoder_layers, linears_by_role, producer_pairs
from edgellm.quant.qtensor import QuantError

KINDS = ("hadamard", "random")


# --------------------------------------------------------------------------------------------
# orthogonal matrices


def sylvester(n: int) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix (n, n) float64 of ±1, ``n = 2**k``."""
    if n < 1 or n & (n - 1):
        raise QuantError(f"a Sylvester Hadamard matrix needs a power of 2, got n={n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)  # [[H, H], [H, -H]]
    return H


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley2(q: int = 17) -> torch.Tensor:
    """Unnormalised Hadamard matrix of order ``2(q + 1)`` (Paley's construction II), float64 ±1.

    ``q`` a prime with ``q ≡ 1 (mod 4)``.  The Jacobsthal matrix ``J[i, j] = χ(j − i)`` (χ the
    quadratic character mod q: +1 on non-zero squares, −1 on non-squares, 0 at 0) is symmetric
    for such q; bordered as ``C = [[0, 1ᵀ], [1, J]]`` it satisfies ``C Cᵀ = q I``.  Replacing each
    0 of ``C`` by ``[[1, −1], [−1, −1]]`` and each ±1 by ``±[[1, 1], [1, −1]]`` gives the matrix.
    """
    if not _is_prime(q) or q % 4 != 1:
        raise QuantError(f"Paley construction II needs a prime q ≡ 1 (mod 4), got q={q}")
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)],
                       dtype=torch.float64)  # χ(a), a = 0 … q-1
    idx = torch.arange(q)
    J = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # J[i, j] = χ(j - i)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = J
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)  # for the zeros (diagonal)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # for the ±1 entries
    return torch.kron(torch.eye(q + 1, dtype=torch.float64), A) + torch.kron(C, B)


def hadamard_unnormalized(n: int) -> torch.Tensor:
    """±1 Hadamard matrix (n, n) float64 with ``H Hᵀ = n I``: ``n = 2**k`` or ``36 · 2**k``."""
    if n >= 1 and not n & (n - 1):
        return sylvester(n)
    if n % 36 == 0 and not (n // 36) & (n // 36 - 1):
        return torch.kron(paley2(17), sylvester(n // 36))
    raise QuantError(f"no Hadamard matrix of order {n} is built in: use a power of 2 or 36·2^k "
                     "(576 = 36·16 for SmolLM2), or kind='random'")


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``H / √n`` (n, n) float64 (``n = 2**k`` or ``36 · 2**k``)."""
    return hadamard_unnormalized(n) / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """Haar-random orthogonal (n, n) float64: QR of a Gaussian matrix, signs fixed by diag(R)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)  # column j times sign(R_jj)


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """The (n, n) float64 orthogonal ``Q`` of a kind (``hadamard`` or ``random``)."""
    if kind == "hadamard":
        return hadamard(n)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise QuantError(f"unknown rotation kind {kind!r}; use one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------
# folding into a model


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def untie_lm_head(model) -> bool:
    """Give ``lm_head`` its own copy of the weight if it shares the embedding's; True if it did."""
    emb = model.get_input_embeddings().weight
    head = model.lm_head
    if head.weight.data_ptr() != emb.data_ptr():
        return False
    head.weight = nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)
    model.config.tie_word_embeddings = False
    return True


def _readers(layer) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(norm, the linears reading its output) of one decoder layer: the producer → consumer
    pairs whose producer is an RMSNorm (q/k/v after ``input_layernorm``, gate/up after
    ``post_attention_layernorm``)."""
    lins = linears_by_role(layer)
    return [(p.producer, [lins[r] for r in p.consumers]) for p in producer_pairs(layer)
            if p.site in ("qkv", "gate_up")]


@torch.no_grad()
def fuse_norms(model) -> dict:
    """Fold every RMSNorm's weight into the linears reading it; set the norm weights to 1.

    ``W ← W · diag(w)`` (columns scaled) for q/k/v ← ``input_layernorm``, gate/up ←
    ``post_attention_layernorm`` and lm_head ← the final ``norm``.  lm_head is **untied** from
    the embedding first (it gets its own weight; the config's ``tie_word_embeddings`` is set to
    False).  The logits are unchanged up to fp32 rounding.  Returns
    ``{"untied_lm_head": bool, "n_norms": int}``.
    """
    untied = untie_lm_head(model)
    base = getattr(model, "model", model)
    pairs = [p for layer in decoder_layers(model) for p in _readers(layer)]
    pairs.append((base.norm, [model.lm_head]))
    for norm, linears in pairs:
        w = norm.weight.double()  # (C,)
        for lin in linears:
            _set(lin.weight, lin.weight.double() * w)  # (out, C) * (C,): scales the columns
        norm.weight.data.fill_(1.0)
    return {"untied_lm_head": untied, "n_norms": len(pairs)}


@torch.no_grad()
def apply_rotation(model, kind: str = "hadamard", seed: int = 0) -> dict:
    """Fuse the norms, then rotate the residual stream by an orthogonal ``Q`` (in place).

    ``E ← E Q`` (embedding rows); ``W ← W Q`` for the stream's readers (q, k, v, gate, up,
    lm_head); ``W ← Qᵀ W`` for its writers (o_proj, down_proj).  Computed in float64, stored
    back in the weights' dtype.  The float model's logits are unchanged up to fp32 rounding;
    lm_head is untied from the embedding (see :func:`fuse_norms`).  Returns
    ``{"kind", "seed", "hidden_size", "untied_lm_head", "n_norms"}``.
    """
    C = model.config.hidden_size
    Q = rotation_matrix(C, kind, seed)  # (C, C) float64
    info = {"kind": kind, "seed": seed if kind == "random" else None, "hidden_size": C}
    info.update(fuse_norms(model))
    emb = model.get_input_embeddings()
    _set(emb.weight, emb.weight.double() @ Q)  # (V, C) rows are stream vectors
    readers = [model.lm_head]
    writers = []
    for layer in decoder_layers(model):
        lins = linears_by_role(layer)
        readers += [lins[r] for r in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
        writers += [lins["o_proj"], lins["down_proj"]]  # they write into the residual stream
    for lin in readers:
        _set(lin.weight, lin.weight.double() @ Q)  # (out, C) @ (C, C)
    for lin in writers:
        _set(lin.weight, Q.T @ lin.weight.double())  # (C, C) @ (C, in)
        if lin.bias is not None:
            _set(lin.bias, lin.bias.double() @ Q)
    return info


# --------------------------------------------------------------------------------------------
# measuring outliers


@torch.no_grad()
def activation_outliers(model, ids: torch.Tensor, which=("q_proj", "gate_proj")) -> dict:
    """Outlier statistics of the inputs of ``which`` linears per decoder layer.

    ``ids`` (batch, seq) token ids.  For each layer and each name: ``max_over_rms`` =
    ``max|x| / rms(x)`` over all tokens and channels, the mean per token of
    ``max_token``: ``max_c |x_tc| / rms(x_t)`` (what per-token quantization suffers from), and
    the ``kurtosis`` ``E[x⁴] / E[x²]²`` of all entries (3 for a Gaussian).
    Returns ``{name: {"max_over_rms": [...], "max_token": [...], "kurtosis": [...]}}`` (lists
    over the layers).
    """
    out = {n: {"max_over_rms": [], "max_token": [], "kurtosis": []} for n in which}
    seen: dict[str, list[torch.Tensor]] = {}
    mods = {f"{i}.{n}": linears_by_role(layer)[n]
            for i, layer in enumerate(decoder_layers(model)) for n in which}
    with capture_inputs(mods, lambda key, x: seen.setdefault(key, []).append(x.detach().float())):
        model(input_ids=torch.as_tensor(ids).reshape(-1, ids.shape[-1]), use_cache=False)
    for i in range(len(decoder_layers(model))):
        for n in which:
            x = torch.cat(seen[f"{i}.{n}"]).reshape(-1, seen[f"{i}.{n}"][0].shape[-1]).double()
            x2 = x.square()
            rms_all = x2.mean().sqrt()
            out[n]["max_over_rms"].append((x.abs().max() / rms_all).item())
            per_tok = x.abs().amax(-1) / x2.mean(-1).sqrt().clamp(min=1e-12)  # (tokens,)
            out[n]["max_token"].append(per_tok.mean().item())
            out[n]["kurtosis"].append((x2.square().mean() / x2.mean().square()).item())
    return out
