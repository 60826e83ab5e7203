"""Views for the lesson: a mask viewer on a real weight matrix and PPL over a recorded sweep.

The widget is a thin view: :func:`mask_for` and :func:`sweep_points` are the pure functions
(tested directly); :func:`sparsity_widget` only wires them to sliders.
"""

from __future__ import annotations

import torch

from .magnitude import magnitude_scores
from .masks import PruneError, select_mask
from .wanda import wanda_scores


def mask_for(W: torch.Tensor, method: str = "magnitude", sparsity: float = 0.5,
             pattern: str = "unstructured", x_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (out, in) of ``W`` for a scoring ``method`` (magnitude | wanda) and a
    ``pattern`` (unstructured | 2:4 | 4:8; the N:M patterns ignore ``sparsity``)."""
    if method == "magnitude":
        S = magnitude_scores(W)
    elif method == "wanda":
        if x_norm is None:
            raise PruneError("method='wanda' needs x_norm, the input norms of the layer")
        S = wanda_scores(W, x_norm)
    else:
        raise PruneError(f"method={method!r}: the viewer shows 'magnitude' or 'wanda'")
    nm = None if pattern == "unstructured" else tuple(int(t) for t in pattern.split(":"))
    return select_mask(S, sparsity, nm)


def sweep_points(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """``{label: [(sparsity, ppl), ...]}`` from ``edgellm prune`` records (N:M records get their
    own labels such as ``wanda 2:4``), sorted by sparsity; plus ``dense`` from ``ppl_base``."""
    out: dict[str, list] = {}
    for r in records:
        if r.get("ppl") is None or r.get("structured"):
            continue
        label = r["method"] + (f" {r['nm']}" if r.get("nm") else "")
        out.setdefault(label, []).append((float(r["sparsity"]), float(r["ppl"])))
        out.setdefault("dense", [(0.0, float(r["ppl_base"]))])
    return {k: sorted(v) for k, v in out.items()}


def plot_sweep(records: list[dict], *, live: dict | None = None, ax=None):
    """PPL (log scale) against sparsity for each method; ``live`` {"sparsity", "ppl", "label"}
    marks a point recomputed now."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.5))
    for label, pts in sweep_points(records).items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        style = "o" if (":" in label or label == "dense") else "o-"
        ax.plot(xs, ys, style, label=label)
    if live:
        ax.plot([live["sparsity"]], [live["ppl"]], "k*", ms=14,
                label=live.get("label", "recomputed now"))
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder linears")
    ax.set_ylabel("perplexity (pydoc test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def sparsity_widget(W: torch.Tensor, x_norm: torch.Tensor, records: list[dict], *,
                    rows: int = 32, cols: int = 64):
    """Sliders for method, pattern and sparsity: the mask of a ``rows × cols`` corner of ``W``
    (white = kept) next to the recorded PPL-vs-sparsity curves with the chosen sparsity marked."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    method = w.Dropdown(options=["magnitude", "wanda"], value="wanda", description="scores")
    pattern = w.Dropdown(options=["unstructured", "2:4", "4:8"], description="pattern")
    sparsity = w.FloatSlider(value=0.5, min=0.0, max=0.9, step=0.05, description="sparsity")
    out = w.Output()

    def show(*_):
        m = mask_for(W, method.value, sparsity.value, pattern.value, x_norm)
        s = 1 - m.float().mean().item()
        with out:
            out.clear_output(wait=True)
            fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
            a.imshow(m[:rows, :cols].float(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            a.set_title(f"{method.value}, {pattern.value}: {s:.0%} pruned (corner {rows}×{cols})")
            a.set_xlabel("input channel")
            a.set_ylabel("output row")
            plot_sweep(records, ax=b)
            b.axvline(s, color="k", lw=0.8, ls="--")
            plt.show()

    for c in (method, pattern, sparsity):
        c.observe(show, "value")
    show()
    display(w.VBox([w.HBox([method, pattern]), sparsity, out]))
