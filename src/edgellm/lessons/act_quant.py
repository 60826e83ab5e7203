"""Lesson 04's recorded results (activations, outliers, KV cache): loading, table, plots, widget.

The sweeps ``results/04_*.json`` hold records of ``edgellm quantize ... --eval --json``:
naive W8A8 and SmoothQuant over α (``04_w8a8``), LLM.int8() with and without the outlier
decomposition (``04_llm_int8``), KV-cache int8/int4 (``04_kv``), rotation vs SmoothQuant at
W4A8/W4A4 (``04_rotate``) and learnable weight clipping vs min/max (``04_lwc``).  A sweep whose
records are not there yet is reported, not failed on: :func:`load_sweeps` returns an empty list
for it and :func:`not_recorded` says how to produce it.

:func:`smoothing_ranges` is the pure function behind the lesson's α widget: the per-channel
activation and weight ranges of one linear layer before and after SmoothQuant's smoothing.

:func:`outlier_probe` holds what several sections of the lesson share (the activation statistics
of the default model, the layer with the largest down_proj input and that layer's inputs), computed
once per process so that each section can ask for it after a kernel restart.
"""

from __future__ import annotations

import functools

from edgellm.quant.qtensor import QuantError

SWEEPS = ("04_w8a8", "04_llm_int8", "04_kv", "04_rotate", "04_lwc")


# --------------------------------------------------------------------------------------------
# loading


def not_recorded(name: str) -> str:
    """The message shown for a sweep without records."""
    return f"{name}: not recorded yet — run `edgellm results --run {name}`"


def load_sweeps(names=SWEEPS, *, verbose: bool = True) -> dict[str, list[dict]]:
    """``{sweep name: records}`` for lesson 04's sweeps; a missing file or a sweep still being
    measured gives ``[]`` (and, with ``verbose``, prints :func:`not_recorded`)."""
    from edgellm.results import load_records

    out = {}
    for n in names:
        try:
            recs = load_records(n)
        except FileNotFoundError:
            recs = []
        if not recs and verbose:
            print(not_recorded(n))
        out[n] = recs
    return out


# --------------------------------------------------------------------------------------------
# the activations every section looks at


def lin_name(i: int, kind: str) -> str:
    """Module name of decoder layer ``i``'s linear ``kind``: ``lin_name(3, "down_proj")`` is
    ``"model.layers.3.mlp.down_proj"``, ``lin_name(3, "q_proj")`` ``"model.layers.3.self_attn.q_proj"``."""
    block = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{i}.{block}.{kind}"


def layer_inputs(model, layer: int, ids) -> dict:
    """Inputs of decoder layer ``layer``'s down_proj and q_proj for ``ids`` (n, T):
    ``{"down": (n·T, intermediate_size), "q": (n·T, hidden_size)}``, captured by forward hooks."""
    import torch

    captured = {}
    block = model.model.layers[layer]
    hooks = [m.register_forward_hook(
                 lambda mod, a, o, key=key: captured.__setitem__(key, a[0].detach().reshape(-1, a[0].shape[-1])))
             for key, m in (("down", block.mlp.down_proj), ("q", block.self_attn.q_proj))]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


@functools.cache
def outlier_probe(n_samples: int, seq_len: int) -> dict:
    """The default model's activations on ``get_calibration(n_samples=…, seq_len=…)``, computed once
    per process (the sections of lesson 04 share it; treat it as read-only):

    ``stats``     :func:`edgellm.quant.actstats.collect_activation_stats` (``quantiles=()``)
    ``k_down``    the decoder layer whose down_proj input has the largest max|x|
    ``captured``  :func:`layer_inputs` of layer ``k_down`` for the first calibration sample
    """
    import edgellm
    from edgellm.quant.actstats import collect_activation_stats

    model, tok = edgellm.load_model(quiet=True)
    calib = edgellm.get_calibration(n_samples=n_samples, seq_len=seq_len, tokenizer=tok)
    stats = collect_activation_stats(model, calib, quantiles=())
    k_down = max(range(model.config.num_hidden_layers),
                 key=lambda i: float(stats["inputs"][lin_name(i, "down_proj")]["absmax"].max()))
    return {"stats": stats, "k_down": k_down, "captured": layer_inputs(model, k_down, calib[:1])}


# --------------------------------------------------------------------------------------------
# labels and the table


def _g(group_size) -> str:
    return "" if group_size is None else f" g{group_size}"


def label(r: dict) -> str:
    """A short human label of one record: ``W8A8 naive``, ``SmoothQuant α=0.50 W8A8``,
    ``LLM.int8() t=6``, ``KV int4``, ``rotate W4A4``, ``LWC W3 g64``…"""
    m, bits = r.get("method", "?"), r.get("bits")
    a_bits, fmt = r.get("a_bits"), r.get("a_format") or "int"
    if m == "llm_int8":
        t = r.get("threshold")
        return "absmax int8 (no decomposition)" if t is None else f"LLM.int8() t={t:g}"
    w = f"W{bits}" + ("" if a_bits is None else f"A{a_bits}") + ("-FP8" if fmt == "fp8" else "")
    w += _g(r.get("group_size"))
    kv = r.get("kv_bits")
    if m == "smoothquant":
        text = f"SmoothQuant α={r.get('alpha', 0.5):.2f} {w}"
    elif m == "rotate":
        text = f"rotate {w}"
    elif m == "lwc":
        text = f"LWC {w}"
    elif m == "rtn" and kv is not None:
        text = f"KV int{kv}"
        return text + f" (weights W{bits}{_g(r.get('group_size'))})"
    else:
        text = f"{w} {'naive' if a_bits is not None else 'weight-only'}"
    return text + ("" if kv is None else f" KV{kv}")


def table(records: list[dict]) -> list[dict]:
    """One row per record (in the sweep's order)."""
    rows = []
    for r in records:
        rows.append({"label": label(r), "ppl": r.get("ppl"), "ppl_stderr": r.get("ppl_stderr"),
                     "ppl_base": r.get("ppl_base"), "delta_nll": r.get("delta_nll"),
                     "delta_nll_stderr": r.get("delta_nll_stderr"), "kl_mean": r.get("kl_mean"),
                     "top1": r.get("top1_agreement"), "n_tokens": r.get("n_tokens")})
    return rows


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    """The rows as fixed-width text (PPL, ΔNLL ± stderr, KL, top-1 agreement)."""
    head = f"{'setting':<36} {'PPL':>7} {'base':>7} {'ΔNLL ± se':>18} {'KL':>9} {'top1':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        dn = ("-" if r["delta_nll"] is None else
              f"{r['delta_nll']:+.4f} ± {_f(r['delta_nll_stderr'], '.4f')}")
        lines.append(f"{r['label']:<36} {_f(r['ppl'], '7.3f')} {_f(r['ppl_base'], '7.3f')} "
                     f"{dn:>18} {_f(r['kl_mean'], '9.2e')} {_f(r['top1'], '6.3f')}")
    return "\n".join(lines)


def find(records: list[dict], **match) -> dict | None:
    """The first record whose fields equal ``match`` (a missing field counts as None)."""
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


# --------------------------------------------------------------------------------------------
# SmoothQuant's α: the recorded curve, and the ranges one layer sees


def alpha_curve(records: list[dict], bits: int = 8, a_bits: int = 8) -> list[dict]:
    """SmoothQuant records at (bits, a_bits) sorted by α: ``{alpha, ppl, delta_nll, se, kl}``."""
    pts = [{"alpha": r["alpha"], "ppl": r.get("ppl"), "delta_nll": r.get("delta_nll"),
            "se": r.get("delta_nll_stderr"), "kl": r.get("kl_mean")}
           for r in records if r.get("method") == "smoothquant" and r.get("bits") == bits
           and r.get("a_bits") == a_bits and r.get("alpha") is not None]
    return sorted(pts, key=lambda p: p["alpha"])


def plot_alpha(records: list[dict], ax=None):
    """ΔNLL (± 2 stderr) of SmoothQuant W8A8 against α, with naive W8A8, W8A8-FP8 and the
    weight-only W8 as horizontal lines.  Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    pts = alpha_curve(records)
    if pts:
        ax.errorbar([p["alpha"] for p in pts], [p["delta_nll"] for p in pts],
                    yerr=[2 * (p["se"] or 0) for p in pts], marker="o", capsize=3,
                    label="SmoothQuant W8A8")
    refs = (("naive W8A8", dict(method="rtn", a_bits=8, a_format="int", kv_bits=None), "C3"),
            ("W8A8-FP8 activations", dict(method="rtn", a_bits=8, a_format="fp8"), "C2"),
            ("W8 weight-only", dict(method="rtn", bits=8, a_bits=None, kv_bits=None), "grey"))
    for name, match, color in refs:
        r = find(records, **match)
        if r is not None and r.get("delta_nll") is not None:
            ax.axhline(r["delta_nll"], color=color, ls="--", lw=1, label=name)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlim(-0.05, 1.05)
    ax.set(xlabel="migration strength α", ylabel="ΔNLL vs float (nats/token)",
           title="SmoothQuant W8A8: recorded α sweep")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return ax


def smoothing_ranges(x_absmax, w_absmax, alpha: float = 0.5) -> dict:
    """Per-channel ranges of one linear layer before and after smoothing with strength ``alpha``.

    ``x_absmax`` (in,) = ``max_t |X_tj|`` over calibration tokens, ``w_absmax`` (in,) =
    ``max_i |W_ij|`` (over the rows of every linear sharing the input).  Returns ``s`` (in,) =
    ``max|X_j|^α / max|W_j|^(1−α)``, ``x_before``/``x_after`` = ``x_absmax / s`` and
    ``w_before``/``w_after`` = ``w_absmax · s`` (all float32 (in,)), and the scalar summaries
    ``x_max_*``, ``w_max_*`` and ``x_ratio_*`` = max / median of the channel ranges (how much of
    a per-token int8 grid the largest channel takes from a typical one).
    """
    import torch

    from edgellm.quant.smoothquant import smooth_factors

    x = torch.as_tensor(x_absmax).float()
    w = torch.as_tensor(w_absmax).float()
    if x.dim() != 1 or x.shape != w.shape:
        raise QuantError(f"x_absmax {tuple(x.shape)} and w_absmax {tuple(w.shape)} must both be "
                         "(in_features,)")
    s = smooth_factors(x, w, alpha)
    xa, wa = x / s, w * s
    out = {"alpha": float(alpha), "s": s, "x_before": x, "x_after": xa, "w_before": w,
           "w_after": wa}
    for key, t in (("x_max_before", x), ("x_max_after", xa), ("w_max_before", w),
                   ("w_max_after", wa)):
        out[key] = float(t.max())
    out["x_ratio_before"] = float(x.max() / x.median().clamp_min(1e-12))
    out["x_ratio_after"] = float(xa.max() / xa.median().clamp_min(1e-12))
    out["w_ratio_before"] = float(w.max() / w.median().clamp_min(1e-12))
    out["w_ratio_after"] = float(wa.max() / wa.median().clamp_min(1e-12))
    return out


def describe_alpha(records: list[dict], alpha: float, ranges: dict | None = None) -> str:
    """The widget's text: one layer's ranges (if given) and the recorded W8A8 result at the
    recorded α nearest to ``alpha``, against naive W8A8."""
    lines = []
    if ranges is not None:
        lines.append(f"α={ranges['alpha']:.2f}: activation max {ranges['x_max_before']:.3g} → "
                     f"{ranges['x_max_after']:.3g} (max/median {ranges['x_ratio_before']:.1f} → "
                     f"{ranges['x_ratio_after']:.1f}); weight max {ranges['w_max_before']:.3g} → "
                     f"{ranges['w_max_after']:.3g} (max/median {ranges['w_ratio_before']:.1f} → "
                     f"{ranges['w_ratio_after']:.1f})")
    pts = alpha_curve(records)
    if not pts:
        lines.append("SmoothQuant W8A8: " + not_recorded("04_w8a8"))
        return "\n".join(lines)
    p = min(pts, key=lambda q: abs(q["alpha"] - alpha))
    text = (f"recorded SmoothQuant W8A8 at α={p['alpha']:.2f}: PPL {_f(p['ppl'], '.3f')}, "
            f"ΔNLL {_f(p['delta_nll'], '+.4f')} ± {_f(p['se'], '.4f')}")
    naive = find(records, method="rtn", a_bits=8, a_format="int", kv_bits=None)
    if naive is not None:
        text += f" (naive W8A8: PPL {naive['ppl']:.3f}, ΔNLL {naive['delta_nll']:+.4f})"
    lines.append(text)
    return "\n".join(lines)


def plot_ranges(ranges: dict, axes=None, title: str = ""):
    """Two panels: activation and weight per-channel absmax, before and after smoothing
    (log scale).  Returns the two axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, who in zip(axes, ("x", "w"), strict=True):
        ax.plot(ranges[f"{who}_before"].numpy(), lw=0.7, label="before")
        ax.plot(ranges[f"{who}_after"].numpy(), lw=0.7, label=f"after (α={ranges['alpha']:.2f})")
        ax.set_yscale("log")
        ax.set(xlabel="input channel j",
               ylabel="max |X_j|" if who == "x" else "max |W_j|",
               title=f"{title} {'activations' if who == 'x' else 'weights'}".strip())
        ax.legend(fontsize=8)
    return axes


# --------------------------------------------------------------------------------------------
# KV cache


def kv_memory(config, bits=(16, 8, 4), n_tokens: int = 1024, **kwargs) -> list[dict]:
    """KV-cache size for ``n_tokens`` at each width: ``{bits, bytes, MB, saved_MB, ratio}``
    (scales and offsets included, :func:`edgellm.quant.kv.kv_cache_bytes`)."""
    from edgellm.quant.kv import kv_cache_bytes

    base = kv_cache_bytes(config, n_tokens, 16)
    rows = []
    for b in bits:
        n = kv_cache_bytes(config, n_tokens, b, **kwargs)
        rows.append({"bits": b, "bytes": n, "MB": n / 1e6, "saved_MB": (base - n) / 1e6,
                     "ratio": base / n})
    return rows
