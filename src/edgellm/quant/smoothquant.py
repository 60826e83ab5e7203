"""SmoothQuant (Xiao et al., 2023): move the activation outliers into the weights, then W8A8.

A linear layer computes ``Y = X Wᵀ``.  For any positive per-input-channel factors ``s`` (in,)::

    Y = (X diag(s)⁻¹) (W diag(s))ᵀ = X̂ Ŵᵀ

so channel ``j`` of the activations is divided by ``s_j`` and column ``j`` of the weight is
multiplied by it: the float function is unchanged.  SmoothQuant picks::

    s_j = max|X_j|^α / max|W_j|^(1−α)          (α = migration strength, 0 ≤ α ≤ 1)

α = 0 leaves the activations alone (and flattens the weights' columns); α = 1 divides every
activation channel by its own absmax (all channels reach 1; the weights take the outliers);
α = 0.5 splits the difficulty evenly (both then have ``max|X̂_j| = max|Ŵ_j| = √(max|X_j|·max|W_j|)``).

The division ``X diag(s)⁻¹`` costs nothing at run time when it is folded into whatever produces
``X`` — a Llama decoder layer offers four places (``sites``):

``"qkv"``      the inputs of q/k/v_proj are ``input_layernorm``'s output: divide its weight by s.
``"gate_up"``  the inputs of gate/up_proj are ``post_attention_layernorm``'s output: same.
``"down"``     down_proj's input is ``SiLU(gate(x)) ⊙ up(x)``: divide up_proj's output rows by s
               (the SiLU blocks the gate path; the product is linear in ``up``).
``"o"``        o_proj's input is the attention output, channel ``(h, d)`` for query head ``h``
               and dim ``d``, linear in the values: divide v_proj's output row ``(g, d)`` by
               ``s``.  With grouped-query attention one value row serves every query head of its
               group (here 9 query heads share 3 KV heads), so the factor must be one number per
               ``(g, d)`` used for all ``h`` in group ``g``: it is computed from the max over the
               group of the activation and weight absmax.

Left unsmoothed: the final ``norm`` and the tied ``lm_head`` (its input would need the shared
embedding matrix scaled too; the lm_head is not quantized in this course anyway).

The calibration is one forward pass that records every linear's per-channel input absmax
(:func:`edgellm.quant.actstats.input_absmax`).  Each fold only changes its own site's input, so
all factors can be taken from that single pass.  Then quantize as usual: per-channel symmetric
int8 weights (``apply_rtn(bits=8, group_size=None, sym=True)``) and per-token int8 activations
(:func:`edgellm.quant.actquant.apply_act_quant`).
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.models import (
    LINEAR_ROLES,
    decoder_layers,
    layer_prefix,
    linears_by_role,
    producer_pairs,
)
from edgellm.quant.qtensor import QuantError

SITES = ("qkv", "gate_up", "down", "o")
EPS = 1e-5  # floor of absmax values and factors: an all-zero channel does not give 0 or inf


def check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise QuantError(f"alpha={alpha} is outside [0, 1]; SmoothQuant's migration strength "
                         "takes 0 (activations untouched) … 1 (all outliers moved into the "
                         "weights); 0.5 is the usual choice")
    return a


def smooth_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5,
                   eps: float = EPS) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` (in,) float32, both absmax clamped to ``eps``."""
    alpha = check_alpha(alpha)
    if x_absmax.shape != w_absmax.shape:
        raise QuantError(f"x_absmax {tuple(x_absmax.shape)} and w_absmax "
                         f"{tuple(w_absmax.shape)} must both be (in_features,)")
    x = x_absmax.float().clamp_min(eps)
    w = w_absmax.float().clamp_min(eps)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp_min(eps)


def weight_absmax(*linears: nn.Linear) -> torch.Tensor:
    """Per input column ``max |W_ij|`` over the rows of all ``linears`` (they share the input)."""
    return torch.stack([lin.weight.detach().float().abs().amax(0) for lin in linears]).amax(0)


@torch.no_grad()
def _scale_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))  # W diag(s): column j times s_j


@torch.no_grad()
def _scale_rows(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.div_(s.to(lin.weight.dtype).unsqueeze(1))  # output row j divided by s_j
    if lin.bias is not None:
        lin.bias.div_(s.to(lin.bias.dtype))


def gqa_group_absmax(v: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """(n_heads·head_dim,) per-(head, dim) values → (n_kv_heads·head_dim,) max over each KV group.

    Query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)`` (Hugging Face ``repeat_kv``).
    """
    D = v.numel() // n_heads
    return v.reshape(n_kv_heads, n_heads // n_kv_heads, D).amax(1).reshape(-1)


def expand_gqa(t: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """(n_kv_heads·head_dim,) → (n_heads·head_dim,): each KV group's value for all its heads."""
    D = t.numel() // n_kv_heads
    return t.reshape(n_kv_heads, 1, D).expand(n_kv_heads, n_heads // n_kv_heads, D).reshape(-1)


@torch.no_grad()
def smooth_layer(layer: nn.Module, x_absmax: dict[str, torch.Tensor], alpha: float = 0.5, *,
                 sites=SITES, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """Fold the smoothing factors into one Llama decoder layer in place.

    ``x_absmax``: per-channel input absmax by short name (``q_proj``, ``gate_proj``,
    ``down_proj``, ``o_proj``).  Returns the factors by site (``o``: per (kv_head, dim)).
    """
    lins = linears_by_role(layer)
    pairs = {p.site: p for p in producer_pairs(layer)}
    out = {}
    for site in (x for x in SITES if x in sites):  # a fixed order: the result is bit-exact
        pair = pairs[site]
        cons = [lins[r] for r in pair.consumers]
        x_abs = x_absmax[pair.consumers[0]]  # consumers share their input
        if site == "o":  # v → o: one factor per value row (g, d), shared by its query heads
            xg = gqa_group_absmax(x_abs.float(), n_heads, n_kv_heads)  # (G·D,)
            wg = gqa_group_absmax(weight_absmax(*cons), n_heads, n_kv_heads)
            t = smooth_factors(xg, wg, alpha)
            _scale_rows(pair.producer, t)
            _scale_columns(cons[0], expand_gqa(t, n_heads, n_kv_heads))
            out[site] = t
            continue
        s = smooth_factors(x_abs, weight_absmax(*cons), alpha)
        if isinstance(pair.producer, nn.Linear):  # up → down: rows of up_proj
            _scale_rows(pair.producer, s)
        else:  # an RMSNorm: its per-channel weight
            pair.producer.weight.div_(s.to(pair.producer.weight.dtype))
        for lin in cons:
            _scale_columns(lin, s)
        out[site] = s
    return out


@torch.no_grad()
def apply_smoothquant(model: nn.Module, calib, alpha: float = 0.5, *, sites=SITES,
                      x_absmax: dict[str, torch.Tensor] | None = None, batch_size: int = 8,
                      progress: bool = False) -> dict:
    """Smooth every decoder layer of a Llama model in place (its float function is unchanged).

    ``calib`` (n, seq_len) token ids for the per-channel input absmax (or give ``x_absmax``
    {linear name: (in,)} directly).  Returns ``{"alpha", "sites", "factors": {layer: {site:
    s}}, "act_absmax_before", "act_absmax_after"}`` (the largest input absmax per site kind,
    over the layers, before and after).
    """
    from edgellm.quant.actstats import input_absmax

    alpha = check_alpha(alpha)
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise QuantError(f"unknown SmoothQuant sites {bad}; choose among {', '.join(SITES)}")
    if x_absmax is None:
        if calib is None:
            raise QuantError("SmoothQuant needs calibration data to measure the activation "
                             "absmax; pass calib=edgellm.get_calibration(tokenizer=tok) (or "
                             "--calib pydoc --n-samples N --seq-len L)")
        x_absmax = input_absmax(model, calib, batch_size=batch_size)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    factors, before, after = {}, {}, {}
    layers = list(enumerate(decoder_layers(model)))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="SmoothQuant", leave=False)
    short = {"qkv": "q_proj", "gate_up": "gate_proj", "down": "down_proj", "o": "o_proj"}
    for i, layer in layers:
        xa = {}
        for site in sites:
            name = short[site]  # the first linear reading the site's input
            xa[name] = x_absmax[layer_prefix(i) + LINEAR_ROLES[name]]
        f = smooth_layer(layer, xa, alpha, sites=sites, n_heads=n_heads, n_kv_heads=n_kv)
        factors[i] = f
        for site, s in f.items():
            x = xa[short[site]].float()
            if site == "o":
                s = expand_gqa(s, n_heads, n_kv)
            before[site] = max(before.get(site, 0.0), float(x.max()))
            after[site] = max(after.get(site, 0.0), float((x / s).max()))
    return {"alpha": alpha, "sites": list(sites), "factors": factors,
            "act_absmax_before": before, "act_absmax_after": after}
