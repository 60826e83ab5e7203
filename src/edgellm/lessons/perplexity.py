"""Lesson 01 (perplexity): which tokens a protocol scores, with how much context, at what cost.

``context_per_token`` and ``window_ppl`` return plain numbers (tests call them); the plots and
the widget draw them.
"""

from __future__ import annotations

import torch

from edgellm.lessons.common import LessonError, new_figure


def context_per_token(n_tokens: int, protocol: str = "sliding", ctx: int = 512,
                      stride: int | None = None) -> torch.Tensor:
    """For each scored token, how many tokens of context the model saw: LongTensor (N_scored,).

    Follows :func:`edgellm.metrics.windows` exactly, so its length is the ``n_tokens`` a
    perplexity record reports.
    """
    from edgellm.metrics import windows

    parts = []
    for w in windows(n_tokens, protocol, ctx, stride):
        # position p of the window predicts token start+p+1 having seen p+1 tokens
        parts.append(torch.arange(w.first, w.end - w.start - 1) + 1)
    return torch.cat(parts)


def window_ppl(model, tokens: torch.Tensor, ctx: int = 256, stride: int | None = None, *,
               protocol: str = "sliding", batch_size: int = 4) -> dict:
    """Perplexity of ``model`` on 1-D ``tokens`` with one window setting, plus the cost.

    Returns the :func:`edgellm.metrics.perplexity` record with ``n_fed`` (tokens pushed through
    the model) and ``mean_context`` (average context of a scored token) added.
    """
    from edgellm.metrics import perplexity, windows

    if protocol == "sliding":
        stride = stride or ctx // 2
    if protocol == "sliding" and not 1 <= stride <= ctx:
        raise LessonError(f"stride={stride} must be between 1 and ctx={ctx}")
    rec = perplexity(model, tokens, protocol, ctx, stride=stride, batch_size=batch_size,
                     progress=False)
    wins = windows(len(tokens), protocol, ctx, stride)
    rec["n_fed"] = sum(w.end - w.start for w in wins)
    rec["mean_context"] = context_per_token(len(tokens), protocol, ctx, stride).double().mean().item()
    return rec


def plot_windows(n_tokens: int, protocol: str = "sliding", ctx: int = 512,
                 stride: int | None = None, *, max_windows: int = 8):
    """The first windows of a protocol: fed tokens in grey, scored tokens in colour; below, the
    context each scored token sees."""
    import matplotlib.pyplot as plt
    import torch

    from edgellm.metrics import windows
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
    fig, ax = new_figure((6.5, 3.5))
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


def context_stride_widget(model, tokens: torch.Tensor):
    """Pick ``ctx`` and ``stride``; press the button to measure sliding-window perplexity.

    Each press runs :func:`window_ppl` on ``tokens`` (keep them to a few thousand: the cost is
    printed as tokens fed through the model).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    ctx = W.Dropdown(options=[64, 128, 256, 512, 1024], value=256, description="ctx")
    frac = W.Dropdown(options=[("ctx (no overlap)", 1.0), ("ctx/2", 0.5), ("ctx/4", 0.25),
                               ("ctx/8", 0.125)], value=0.5, description="stride")
    button = W.Button(description="measure", button_style="primary")
    out = W.Output()
    history = []

    def run(*_):
        c = min(ctx.value, len(tokens))
        s = max(1, int(c * frac.value))
        with out:
            out.clear_output(wait=True)
            rec = window_ppl(model, tokens, c, s)
            history.append(rec)
            for r in history[-6:]:
                print(f"ctx={r['ctx']:5d} stride={r['stride']:5d}  ppl={r['ppl']:8.3f} ± "
                      f"{r['ppl_stderr']:.3f}  scored={r['n_tokens']}  fed={r['n_fed']}  "
                      f"mean context={r['mean_context']:.0f}  {r['seconds']:.1f} s")
            fig = plot_windows(len(tokens), "sliding", c, s)
            display(fig)
            plt.close(fig)

    button.on_click(run)
    return W.VBox([W.HBox([ctx, frac, button]), out])
