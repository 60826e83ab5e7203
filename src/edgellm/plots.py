"""Plot helpers the lessons share (matplotlib; each returns the Figure and draws nothing global)."""

from __future__ import annotations


def _fig(figsize=(7, 3.5)):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def plot_params_by_module(groups: dict[str, int], *, bytes_per_param: float = 4.0):
    """Horizontal bars: parameters (and bytes at ``bytes_per_param``) of each module kind."""
    fig, ax = _fig((7, 2.6))
    names = list(groups)
    counts = [groups[n] / 1e6 for n in names]
    bars = ax.barh(names, counts, color="tab:blue")
    total = sum(groups.values())
    for bar, n in zip(bars, names, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {groups[n] / 1e6:.2f} M  ({100 * groups[n] / total:.1f} %, "
                f"{groups[n] * bytes_per_param / 2**20:.0f} MiB)", va="center", fontsize=9)
    ax.set_xlabel("parameters (millions)")
    ax.set_xlim(0, max(counts) * 1.6)
    ax.invert_yaxis()
    ax.set_title(f"Where the parameters are: {total / 1e6:.1f} M in all")
    return fig


def plot_device_budget(rows: list[dict]):
    """Memory needed per format against each device's budget (log scale), from ``device_budget``."""
    import matplotlib
    import numpy as np

    from .widgets import format_bytes

    fig, ax = _fig((8, 3.6))
    formats = list(dict.fromkeys(r["format"] for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    cell = {(r["device"], r["format"]): r for r in rows}
    x = np.arange(len(formats))
    need = [cell[(devices[0], f)]["need_bytes"] for f in formats]
    ax.bar(x, need, width=0.5, color="tab:blue", label="model + overhead")
    for i, n in enumerate(need):
        ax.text(i, n, format_bytes(n), ha="center", va="bottom", fontsize=8)
    colors = matplotlib.colormaps["tab10"]
    for j, d in enumerate(devices):
        b = cell[(d, formats[0])]["budget_bytes"]
        ax.axhline(b, color=colors(j + 1), ls="--", lw=1.2, label=f"{d}: {format_bytes(b)} usable")
    ax.set_yscale("log")
    ax.set_xticks(x, formats)
    ax.set_ylabel("bytes")
    n = rows[0]["n_params"]
    ax.set_title(f"A {n / 1e9:.3g} B-parameter model: memory needed vs. device budgets")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_windows(n_tokens: int, protocol: str = "sliding", ctx: int = 512,
                 stride: int | None = None, *, max_windows: int = 8):
    """The first windows of a protocol: fed tokens in grey, scored tokens in colour; below, the
    context each scored token sees."""
    import matplotlib.pyplot as plt
    import torch

    from .metrics import windows
    from .widgets import context_per_token

    wins = windows(n_tokens, protocol, ctx, stride)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 3.8), layout="constrained",
                                  height_ratios=[1.3, 1])
    shown = wins[:max_windows]
    for i, w in enumerate(shown):
        ax.barh(i, w.end - w.start, left=w.start, color="0.85", height=0.7)
        ax.barh(i, w.n_scored, left=w.start + w.first + 1, color="tab:orange", height=0.7)
    ax.set_yticks(range(len(shown)), [f"window {i}" for i in range(len(shown))], fontsize=8)
    ax.invert_yaxis()
    end = shown[-1].end
    ax.set_xlim(0, end)
    extra = f", stride {stride or ctx // 2}" if protocol == "sliding" else ""
    ax.set_title(f"{protocol}: ctx {ctx}{extra} — grey fed, orange scored "
                 f"({len(wins)} windows over {n_tokens} tokens)", fontsize=10)
    c = context_per_token(n_tokens, protocol, ctx, stride)
    # token index of each scored token, in the same order as context_per_token
    pos = torch.cat([torch.arange(w.start + w.first + 1, w.end) for w in wins])
    keep = pos < end
    ax2.plot(pos[keep], c[keep], ".", ms=1.5, color="tab:orange")
    ax2.set_xlim(0, end)
    ax2.set_ylim(0, ctx * 1.05)
    ax2.set_xlabel("token position in the text")
    ax2.set_ylabel("context seen")
    ax2.set_title(f"mean context per scored token: {c.double().mean():.0f}", fontsize=9)
    return fig


def plot_ppl_vs_ctx(records: list[dict], *, live: dict | None = None):
    """Perplexity (with its standard error) against context length, from ``ppl`` records."""
    fig, ax = _fig((6.5, 3.5))
    recs = sorted(records, key=lambda r: r["ctx"])
    ctx = [r["ctx"] for r in recs]
    ppl = [r["ppl"] for r in recs]
    err = [r.get("ppl_stderr", 0) for r in recs]
    ax.errorbar(ctx, ppl, yerr=err, marker="o", capsize=3,
                label=f"recorded ({recs[0]['protocol']}, {recs[0].get('data', '')} "
                      f"{recs[0].get('split', '')})")
    if live is not None:
        ax.plot([live["ctx"]], [live["ppl"]], "r*", ms=12,
                label=f"recomputed now on {live['n_tokens']} tokens")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ctx, [str(c) for c in ctx])
    ax.set_xlabel("context length ctx (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Longer context, lower perplexity (same model, same text)")
    return fig
