"""Activation statistics: what the linear layers' inputs look like, and where the outliers are.

Forward hooks on the decoder's linear layers record, per *input channel* ``j``, the largest
``|x_j|`` and percentiles of ``|x_j|`` over the calibration tokens; hooks on the decoder layers'
outputs (the residual stream) look for *massive activations*.  The pure functions take recorded
tensors; :func:`collect_activation_stats` runs the model and applies them.

Two kinds of outliers matter for quantization:

*Outlier features* (Dettmers et al., 2022, "LLM.int8()")
    a few hidden-state channels whose values reach magnitudes ≥ 6 while almost everything else
    stays below 1.  The paper calls such a feature dimension *systematic* when the magnitude is
    ≥ 6, it occurs in at least 25 % of the transformer layers, and in at least 6 % of the tokens
    (sequence positions) — :func:`systematic_outliers` applies that criterion to the inputs of
    the attention and MLP blocks (q/k/v and gate/up, which live in the residual-stream basis).
    Per-tensor or per-token scales must stretch to cover them, wasting the int8 grid on every
    other channel: SmoothQuant and LLM.int8() exist because of them.

*Massive activations* (Sun et al., 2024, "Massive Activations in Large Language Models")
    individual scalar values of the residual stream, at a handful of fixed channels and mostly on
    the first token (or a delimiter), that are thousands of times larger than the median
    magnitude (e.g. > 100 and > 1000 × median).  They act as fixed attention biases;
    :func:`massive_activations` reports their layer, token and channel.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.calib import capture_inputs

QUANTILES = (0.5, 0.99, 0.999)


def _qname(q: float) -> str:
    """0.5 -> 'p50', 0.99 -> 'p99', 0.999 -> 'p99.9'."""
    return "p" + f"{100 * q:.6g}"


def channel_stats(X: torch.Tensor, quantiles=QUANTILES, threshold: float = 6.0) -> dict:
    """Per-input-channel statistics of ``X`` (..., C) (all leading dims are tokens).

    Returns ``absmax`` (C,), one (C,) tensor of ``|x|`` percentiles per quantile (keys
    ``p50``, ``p99``, ``p99.9``), ``n_over`` (C,) int64 = tokens with ``|x| ≥ threshold``, and
    ``n`` = tokens.
    """
    A = X.detach().reshape(-1, X.shape[-1]).float().abs()  # (n, C)
    out = {"absmax": A.amax(0), "n_over": (A >= threshold).sum(0), "n": A.shape[0]}
    if quantiles:
        qs = torch.quantile(A, torch.tensor(quantiles, dtype=torch.float32), dim=0)  # (Q, C)
        out.update({_qname(q): qs[i] for i, q in enumerate(quantiles)})
    return out


def outlier_channels(absmax: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Indices of the channels whose largest magnitude reaches ``threshold`` (LLM.int8: 6.0)."""
    return torch.nonzero(absmax >= threshold).flatten()


def systematic_outliers(inputs: dict[str, dict], threshold: float = 6.0, *,
                        layer_frac: float = 0.25, token_frac: float = 0.06,
                        sites: tuple[str, ...] = ("q_proj", "gate_proj")) -> dict:
    """LLM.int8()'s systematic outlier features among the residual-stream inputs.

    ``inputs`` maps linear names (``model.layers.{i}.self_attn.q_proj`` …) to
    :func:`channel_stats`-like dicts with ``n_over`` and ``n``.  A channel is an outlier at a
    site when at least ``token_frac`` of the tokens reach ``|x| ≥ threshold``; it is an outlier
    in decoder layer ``i`` when it is one at any of the layer's ``sites`` (the attention input
    and the MLP input); it is *systematic* when that holds in at least ``layer_frac`` of the
    layers.  Returns ``{"channels": [...], "layer_count": {channel: n_layers}, "n_layers": L,
    "per_site": {name: [channels]}}``.
    """
    per_site, by_layer = {}, {}
    for name, st in inputs.items():
        if not name.endswith(sites):
            continue
        frac = st["n_over"].float() / max(st["n"], 1)
        chans = torch.nonzero(frac >= token_frac).flatten().tolist()
        per_site[name] = chans
        layer = _layer_index(name)
        by_layer.setdefault(layer, set()).update(chans)
    n_layers = len(by_layer)
    count: dict[int, int] = {}
    for chans in by_layer.values():
        for c in chans:
            count[c] = count.get(c, 0) + 1
    systematic = sorted(c for c, n in count.items() if n >= layer_frac * n_layers)
    return {"channels": systematic, "layer_count": dict(sorted(count.items())),
            "n_layers": n_layers, "per_site": per_site, "threshold": threshold,
            "layer_frac": layer_frac, "token_frac": token_frac}


def _layer_index(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return -1


def massive_activations(h: torch.Tensor, abs_threshold: float = 100.0, ratio: float = 1000.0,
                        top_k: int = 10) -> dict:
    """Massive activations (Sun et al., 2024) in one hidden-state tensor ``h`` (B, T, C).

    A value is *massive* when ``|h| > abs_threshold`` and ``|h| > ratio × median(|h|)``.
    Returns ``max`` and ``median`` of ``|h|`` and ``entries``: up to ``top_k`` massive values
    as dicts ``{value, batch, token, channel}`` (largest first).
    """
    if h.dim() == 2:
        h = h.unsqueeze(0)
    A = h.detach().float().abs()
    median = float(A.flatten().median())
    flat = A.flatten()
    k = min(top_k, flat.numel())
    vals, idx = flat.topk(k)
    B, T, C = A.shape
    entries = []
    for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
        if v > abs_threshold and v > ratio * median:
            b, rem = divmod(i, T * C)
            t, c = divmod(rem, C)
            entries.append({"value": float(h.reshape(-1)[i]), "batch": b, "token": t,
                            "channel": c})
    return {"max": float(vals[0]) if k else 0.0, "median": median, "entries": entries}


class _SharedReduction:
    """Reduce each distinct input tensor once per forward pass, for linears fed by one tensor.

    Linears fed the same tensor (q/k/v, gate/up) share one record.  ``reduce(state, x) ->
    state`` is the reduction; ``self.records[name]`` its result.  Pass :meth:`on_input` to
    :func:`edgellm.calib.capture_inputs`; call :meth:`new_pass` before each batch.
    """

    def __init__(self, reduce):
        self.reduce, self.records, self.seen = reduce, {}, {}

    def on_input(self, name, x):
        key = id(x)
        if key not in self.seen:  # first linear to see this tensor in this pass
            self.seen[key] = (x, self.reduce(self.records.get(name), x))  # x kept: id unique
        self.records[name] = self.seen[key][1]

    def new_pass(self):
        self.seen.clear()


def _forward_batches(model, ids: torch.Tensor, batch_size: int, on_batch=None):
    base = getattr(model, "model", model)  # skip the lm_head: its logits are not needed
    for i in range(0, ids.shape[0], batch_size):
        if on_batch is not None:
            on_batch(i)
        base(input_ids=ids[i:i + batch_size], use_cache=False)


@torch.no_grad()
def input_absmax(model, calib, layers: dict[str, nn.Linear] | None = None, *,
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` (in_features,) float32 at each linear over ``calib`` ids.

    One forward pass of the model as it is; SmoothQuant's and static activation scales' input.
    """
    from edgellm.calib import check_calibration
    from edgellm.models import linear_layers

    ids = check_calibration(calib)
    layers = linear_layers(model) if layers is None else layers

    def reduce(state, x):
        m = x.detach().reshape(-1, x.shape[-1]).float().abs().amax(0)
        return m if state is None else torch.maximum(state, m)

    hooks = _SharedReduction(reduce)
    with capture_inputs(layers, hooks.on_input):
        _forward_batches(model, ids, batch_size, on_batch=lambda i: hooks.new_pass())
    return hooks.records


@torch.no_grad()
def collect_activation_stats(model, ids, *, layers: dict[str, nn.Linear] | None = None,
                             quantiles=QUANTILES, threshold: float = 6.0,
                             sample_rows: int = 512, hidden: bool = True,
                             massive_threshold: float = 100.0, massive_ratio: float = 1000.0,
                             batch_size: int = 8) -> dict:
    """Run ``ids`` (n, seq_len) through the model and summarise its activations.

    Returns a dict:

    ``inputs``  {linear name: {absmax (C,), n_over (C,), n, p50/p99/p99.9 (C,)}}: the absmax and
                the threshold counts over all tokens; the percentiles over the first
                ``sample_rows`` tokens (a sample keeps memory bounded: 210 linears).
                Linears sharing an input (q/k/v, gate/up) share one dict.
    ``outliers`` {linear name: channels with absmax ≥ ``threshold``}
    ``systematic`` :func:`systematic_outliers` of the inputs
    ``hidden``  {layer index: {absmax (C,), max, median, entries}} for each decoder layer's
                output (the residual stream), entries = massive activations with ``batch`` the
                sequence index in ``ids`` (the median is averaged over batches)
    ``threshold``, ``n_tokens``
    """
    from edgellm.calib import check_calibration
    from edgellm.models import decoder_layers, linear_layers

    ids = check_calibration(ids)
    layers = linear_layers(model) if layers is None else layers

    def reduce(state, x):
        A = x.detach().reshape(-1, x.shape[-1]).float().abs()  # (rows, C)
        if state is None:
            state = {"absmax": A.amax(0), "n_over": (A >= threshold).sum(0), "n": A.shape[0],
                     "sample": A[:sample_rows].clone()}
            return state
        state["absmax"] = torch.maximum(state["absmax"], A.amax(0))
        state["n_over"] += (A >= threshold).sum(0)
        state["n"] += A.shape[0]
        need = sample_rows - state["sample"].shape[0]
        if need > 0:
            state["sample"] = torch.cat([state["sample"], A[:need]])
        return state

    hooks = _SharedReduction(reduce)
    offset = [0]
    hid: dict[int, dict] = {}
    handles = []
    if hidden:
        def layer_hook(index):
            def fn(module, args, output):
                h = output[0] if isinstance(output, tuple) else output  # (B, T, C)
                m = massive_activations(h, massive_threshold, massive_ratio)
                for e in m["entries"]:
                    e["batch"] += offset[0]
                am = h.detach().float().abs().reshape(-1, h.shape[-1]).amax(0)
                rec = hid.get(index)
                if rec is None:
                    hid[index] = {"absmax": am, "max": m["max"], "medians": [m["median"]],
                                  "entries": m["entries"]}
                else:
                    rec["absmax"] = torch.maximum(rec["absmax"], am)
                    rec["max"] = max(rec["max"], m["max"])
                    rec["medians"].append(m["median"])
                    rec["entries"] = sorted(rec["entries"] + m["entries"],
                                            key=lambda e: -abs(e["value"]))[:10]
            return fn

        handles = [layer.register_forward_hook(layer_hook(i))
                   for i, layer in enumerate(decoder_layers(model))]

    def on_batch(i):
        hooks.new_pass()
        offset[0] = i

    try:
        with capture_inputs(layers, hooks.on_input):
            _forward_batches(model, ids, batch_size, on_batch=on_batch)
    finally:
        for h in handles:  # the decoder layers' outputs: not inputs, their own hooks
            h.remove()

    inputs, done = {}, {}
    for name, st in hooks.records.items():
        if id(st) not in done:
            res = {"absmax": st["absmax"], "n_over": st["n_over"], "n": st["n"]}
            if quantiles:
                qs = torch.quantile(st["sample"], torch.tensor(quantiles), dim=0)  # (Q, C)
                res.update({_qname(q): qs[i] for i, q in enumerate(quantiles)})
            done[id(st)] = res
        inputs[name] = done[id(st)]
    for rec in hid.values():
        rec["median"] = float(torch.tensor(rec.pop("medians")).mean())
    return {"inputs": inputs,
            "outliers": {n: outlier_channels(s["absmax"], threshold).tolist()
                         for n, s in inputs.items()},
            "systematic": systematic_outliers(inputs, threshold),
            "hidden": hid, "threshold": threshold, "n_tokens": int(ids.numel())}


def massive_summary(stats: dict) -> list[dict]:
    """The massive activations of :func:`collect_activation_stats` as flat rows
    ``{layer, value, batch, token, channel, ratio}`` (largest first)."""
    rows = []
    for layer, rec in stats["hidden"].items():
        for e in rec["entries"]:
            rows.append({"layer": layer, **e,
                         "ratio": abs(e["value"]) / max(rec["median"], 1e-12)})
    return sorted(rows, key=lambda r: -abs(r["value"]))
