"""Structured pruning: remove whole attention heads, MLP channels or decoder layers.

Unlike zeroing single weights, this makes every matrix genuinely smaller (fewer parameters,
smaller file, faster dense matmuls) and the result is an ordinary Hugging Face model that
``save_pretrained`` / ``from_pretrained`` handle.

Restriction (stated, not hidden): a Hugging Face ``LlamaConfig`` has one
``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` for all layers, so
heads and channels are removed *uniformly*: the same number in every layer (which ones differs
per layer, chosen by importance).  Layer removal has no such restriction.

Importance scores (all from a dense forward pass over calibration tokens; without calibration
every input channel is given unit energy, i.e. weights only):

* MLP channel ``j`` (input ``j`` of ``down_proj``, fed by ``silu(gate_j) · up_j``):
  ``I_j = E[h_j²] · ‖W_down[:, j]‖²``, the expected energy it adds to the residual stream
  (cross-channel correlations ignored, as in Wanda-style scores).
* Attention head ``h``: the same sum over its ``head_dim`` input channels of ``o_proj``.
* Decoder layer ``i``: block influence (Men et al., 2024, "ShortGPT")
  ``BI_i = 1 − E_t[cos(x_i,t , y_i,t)]`` between the layer's input and output hidden states:
  a layer that barely turns the residual stream is the cheapest to drop.

Grouped-query attention: SmolLM2 has 9 query heads sharing 3 KV heads (groups of 3 consecutive
query heads per KV head).  ``granularity="query"`` (the default) removes query heads *within*
each group, the same number from every group (all KV heads stay, so the KV cache does not
shrink); ``granularity="group"`` removes whole KV groups (a KV head with all its query heads,
which also shrinks the KV cache).
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.calib import capture_inputs, check_calibration
from edgellm.models import LINEAR_ROLES, decoder_layers, layer_prefix, linears_by_role
from edgellm.prune.masks import PruneError


def _forward(model, ids: torch.Tensor, batch_size: int) -> int:
    """Run the calibration batches through the model once (for its hooks); tokens seen."""
    for i in range(0, len(ids), batch_size):
        model(input_ids=ids[i:i + batch_size], use_cache=False, logits_to_keep=1)
    return ids.numel()


def _role_name(index: int, role: str) -> str:
    """Full module name of a linear by layer and role: ``model.layers.3.mlp.down_proj``."""
    return layer_prefix(index) + LINEAR_ROLES[role]


def _check_ratio(ratio: float, what: str) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise PruneError(f"ratio={ratio!r} is not a number; give the fraction of {what} to "
                         "remove, in [0, 1)") from None
    if not 0.0 <= r < 1.0:
        raise PruneError(f"ratio={ratio} is outside [0, 1): it is the fraction of {what} to "
                         "remove")
    return r


# --------------------------------------------------------------------------------------------
# calibration statistics of the dense model


@torch.no_grad()
def input_energy(model, calib=None, *, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """``E[x_j²]`` per input channel of every ``o_proj`` and ``down_proj``: ``{name: (in,)}``.

    One dense forward pass over ``calib`` (n_samples, seq_len) with hooks; with ``calib=None``
    every channel gets 1 (scores then depend on the weights only).
    """
    targets = {_role_name(i, role): linears_by_role(layer)[role]
               for i, layer in enumerate(decoder_layers(model)) for role in ("o_proj", "down_proj")}
    if calib is None:
        return {n: torch.ones(m.in_features) for n, m in targets.items()}
    ids = check_calibration(calib)
    sums = {n: torch.zeros(m.in_features) for n, m in targets.items()}

    def on_input(name, x):
        x = x.reshape(-1, x.shape[-1]).float()  # (B·T, in)
        sums[name] += x.square().sum(0)

    with capture_inputs(targets, on_input):
        n_tok = _forward(model, ids, batch_size)
    return {n: s / n_tok for n, s in sums.items()}


@torch.no_grad()
def block_influence(model, calib, *, batch_size: int = 4) -> torch.Tensor:
    """Block influence of every decoder layer, ``1 − mean cos(input, output)``: (n_layers,).

    ``calib`` (n_samples, seq_len) token ids; averaged over all calibration tokens.
    """
    ids = check_calibration(calib)
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, C) layer input
            y = output[0] if isinstance(output, tuple) else output  # (B, T, C) layer output
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            sums[index] += (1 - cos).double().sum()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)  # outputs too: own hook
               for i, layer in enumerate(layers)]
    try:
        n_tok = _forward(model, ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    return (sums / n_tok).float()


def channel_scores(W_down: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """``I_j = E[h_j²] · ‖W_down[:, j]‖²`` for each MLP channel: (intermediate,).

    ``W_down`` (hidden, intermediate); ``energy`` (intermediate,) mean square of its inputs.
    """
    return W_down.detach().float().square().sum(0) * energy.float()


def head_scores(W_o: torch.Tensor, energy: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Importance of each query head: the channel score summed over its ``head_dim`` inputs
    of ``o_proj``.  ``W_o`` (hidden, n_heads·head_dim) -> (n_heads,)."""
    per_channel = W_o.detach().float().square().sum(0) * energy.float()  # (n_heads·head_dim,)
    return per_channel.view(-1, head_dim).sum(1)


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores, in increasing index order (ties: lower index
    kept first, by a stable sort)."""
    order = torch.argsort(-scores, stable=True)[:n_keep]
    return order.sort().values


def _sliced_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new, smaller ``nn.Linear`` holding the selected output rows / input columns."""
    W = lin.weight.detach()
    if rows is not None:
        W = W[rows]
    if cols is not None:
        W = W[:, cols]
    bias = lin.bias is not None
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        new.weight.copy_(W)
        if bias:
            new.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    return new


# --------------------------------------------------------------------------------------------
# the three kinds


@torch.no_grad()
def prune_channels(model, calib=None, ratio: float = 0.2, *, multiple_of: int = 32,
                   batch_size: int = 4) -> dict:
    """Remove the least important MLP intermediate channels, the same number in every layer.

    ``ratio`` is the fraction of channels to remove; the kept count is rounded to a multiple
    of ``multiple_of`` (32 keeps llama.cpp blocks and g32/g64 quantization possible).
    Changes ``model`` in place (and ``config.intermediate_size``); returns a summary.
    """
    r = _check_ratio(ratio, "MLP channels")
    cfg = model.config
    inter = cfg.intermediate_size
    keep = int(round(inter * (1 - r) / multiple_of)) * multiple_of if multiple_of > 1 else \
        int(round(inter * (1 - r)))
    keep = min(keep, inter)
    if keep < 1:
        raise PruneError(f"ratio={ratio} would leave no MLP channel out of {inter}; use a "
                         "smaller ratio")
    energy = input_energy(model, calib, batch_size=batch_size)
    for i, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        e = energy[_role_name(i, "down_proj")]
        idx = _keep_top(channel_scores(mlp.down_proj.weight, e), keep)  # (keep,)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=idx)
        mlp.up_proj = _sliced_linear(mlp.up_proj, rows=idx)
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    cfg.intermediate_size = keep
    return {"structured": "channels", "ratio": r, "intermediate_size": keep,
            "intermediate_size_before": inter, "ratio_achieved": 1 - keep / inter}


@torch.no_grad()
def prune_heads(model, calib=None, ratio: float = 1 / 3, *, granularity: str = "query",
                batch_size: int = 4) -> dict:
    """Remove attention heads, the same number in every layer, respecting GQA.

    ``granularity="query"``: remove ``round(ratio · group)`` query heads from every KV group
    (group = num_attention_heads / num_key_value_heads query heads sharing one KV head).
    ``granularity="group"``: remove ``round(ratio · n_kv)`` whole KV groups (a KV head with its
    query heads), ranked by the sum of their query heads' scores.
    Raises :class:`PruneError` when a layer would be left without heads.
    """
    r = _check_ratio(ratio, "attention heads")
    cfg = model.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    rep = n_q // n_kv  # query heads per KV head
    if granularity == "query":
        drop = int(round(r * rep))
        new_rep, new_kv = rep - drop, n_kv
    elif granularity == "group":
        drop = int(round(r * n_kv))
        new_rep, new_kv = rep, n_kv - drop
    else:
        raise PruneError(f"granularity={granularity!r}: use 'query' (query heads within each KV "
                         "group) or 'group' (whole KV groups)")
    if new_rep < 1 or new_kv < 1:
        raise PruneError(
            f"ratio={ratio} would leave zero heads ({granularity} granularity: {n_q} query heads "
            f"in {n_kv} KV groups of {rep}); use ratio < {1 - 0.5 / (rep if granularity == 'query' else n_kv):.2f}")
    if cfg.hidden_size % (new_rep * new_kv):
        raise PruneError(
            f"{new_rep * new_kv} query heads left, but Hugging Face's LlamaConfig requires "
            f"hidden_size={cfg.hidden_size} to be a multiple of num_attention_heads (even with an "
            "explicit head_dim), so the pruned model could not be reloaded; choose another ratio")
    energy = input_energy(model, calib, batch_size=batch_size)
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        s = head_scores(attn.o_proj.weight, energy[_role_name(i, "o_proj")], hd)
        s = s.view(n_kv, rep)  # (n_kv, rep) query heads grouped by their KV head
        if granularity == "query":
            kv_keep = torch.arange(n_kv)
            q_keep = torch.stack([g * rep + _keep_top(s[g], new_rep) for g in range(n_kv)])
        else:
            kv_keep = _keep_top(s.sum(1), new_kv)  # (new_kv,)
            q_keep = kv_keep.unsqueeze(1) * rep + torch.arange(rep)  # (new_kv, rep)
        q_heads = q_keep.flatten()  # query heads kept, grouped by KV head, in order
        q_rows = (q_heads.unsqueeze(1) * hd + torch.arange(hd)).flatten()  # (new_q·hd,)
        kv_rows = (kv_keep.unsqueeze(1) * hd + torch.arange(hd)).flatten()  # (new_kv·hd,)
        attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
        attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)
        if new_kv != n_kv:
            attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
            attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
        attn.num_key_value_groups = new_rep
        attn.head_dim = hd
    cfg.head_dim = hd  # explicit, so from_pretrained does not derive it from hidden / heads
    cfg.num_attention_heads = new_rep * new_kv
    cfg.num_key_value_heads = new_kv
    return {"structured": "heads", "ratio": r, "granularity": granularity,
            "num_attention_heads": new_rep * new_kv, "num_key_value_heads": new_kv,
            "num_attention_heads_before": n_q, "num_key_value_heads_before": n_kv,
            "ratio_achieved": 1 - new_rep * new_kv / n_q}


@torch.no_grad()
def drop_layers(model, layers_to_drop) -> dict:
    """Remove decoder layers by index, renumbering the rest (``self_attn.layer_idx``,
    ``config.num_hidden_layers`` and ``config.layer_types`` if present) so the KV cache works."""
    layers = decoder_layers(model)
    n = len(layers)
    drop = sorted({int(i) for i in layers_to_drop})
    if any(i < 0 or i >= n for i in drop):
        raise PruneError(f"layer indices {drop} out of range for {n} layers")
    if len(drop) >= n:
        raise PruneError(f"dropping {len(drop)} of {n} layers would leave none; drop fewer")
    kept = [i for i in range(n) if i not in drop]
    base = getattr(model, "model", model)
    base.layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(base.layers):
        layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by this
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    return {"structured": "layers", "dropped": drop, "kept": kept,
            "num_hidden_layers": len(kept), "num_hidden_layers_before": n}


@torch.no_grad()
def prune_layers(model, calib, ratio: float = 0.2, *, batch_size: int = 4) -> dict:
    """Drop the ``round(ratio · n_layers)`` layers of lowest block influence (ShortGPT)."""
    r = _check_ratio(ratio, "decoder layers")
    n = len(decoder_layers(model))
    k = int(round(r * n))
    if k >= n:
        raise PruneError(f"ratio={ratio} would remove all {n} layers; use a smaller ratio")
    if calib is None:
        raise PruneError("layer pruning ranks layers by block influence, which needs "
                         "calibration tokens: pass calib=edgellm.get_calibration(tokenizer=tok)")
    bi = block_influence(model, calib, batch_size=batch_size)
    drop = torch.argsort(bi, stable=True)[:k].tolist()  # lowest influence first
    info = drop_layers(model, drop)
    info.update(ratio=r, block_influence=[round(float(b), 6) for b in bi],
                ratio_achieved=k / n)
    return info


def apply_structured(model, calib=None, *, kind: str = "layers", ratio: float = 0.2,
                     granularity: str = "query", batch_size: int = 4) -> dict:
    """Prune ``model`` in place by ``kind`` in {"heads", "channels", "layers"}; return what was
    removed (``granularity`` applies to heads only)."""
    if kind == "heads":
        return prune_heads(model, calib, ratio, granularity=granularity, batch_size=batch_size)
    if kind == "channels":
        return prune_channels(model, calib, ratio, batch_size=batch_size)
    if kind == "layers":
        return prune_layers(model, calib, ratio, batch_size=batch_size)
    raise PruneError(f"structured={kind!r}: use one of heads, channels, layers")
