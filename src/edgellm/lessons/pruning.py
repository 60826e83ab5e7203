"""Views for the lesson: a mask viewer on a real weight matrix and PPL over a recorded sweep.

The widget is a thin view: :func:`mask_for` and :func:`sweep_points` are the pure functions
(tested directly); :func:`sparsity_widget` only wires them to sliders.  :func:`plot_sweep`
draws perplexity against sparsity; :func:`structured_rows` and :func:`contextual_table` turn
recorded ``edgellm prune`` records into the lesson's tables.
"""

from __future__ import annotations

import torch

from edgellm.prune.magnitude import magnitude_scores
from edgellm.prune.masks import PruneError, select_mask
from edgellm.prune.wanda import wanda_scores


def print_table(rows: list[dict], cols: list[str]) -> None:
    """Print a small fixed-width table from a list of dicts (floats with 4 significant
    digits, ``None`` as ``-``)."""
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>12.4g}" if isinstance(v, float)
                         else f"{'-' if v is None else v!s:>12}")
        print(" | ".join(cells))


def lesson_setup():
    """``(model, tok, calib, EVAL)``: what every section of lesson 06 starts from.

    ``calib`` (n_samples, seq_len) pydoc train windows (32 × 512; FAST: 4 × 128), ``EVAL`` the
    keyword arguments of :func:`edgellm.metrics.evaluate_paired` (pydoc test, gptq protocol).
    """
    from edgellm.course import fast_or
    from edgellm.data import get_calibration
    from edgellm.models import load_model

    model, tok = load_model()
    calib = get_calibration("pydoc", n_samples=fast_or(32, 4), seq_len=fast_or(512, 128), seed=0,
                            tokenizer=tok)
    EVAL = dict(data="pydoc", split="test", protocol="gptq", ctx=fast_or(512, 256),
                max_tokens=fast_or(2048, 512))
    return model, tok, calib, EVAL


def layer0_inputs(model, calib, *, keep: bool = False):
    """``(lins, stats)``: layer 0's linears and their input statistics on ``calib``
    (``keep=True`` also keeps the raw inputs, ``stats[name].X``, and ``H``)."""
    from edgellm.lessons.common import layer_stats

    _, lins, stats = layer_stats(model, calib, 0, xtx=keep, keep=calib.shape[0] if keep else 0)
    return lins, stats


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
    own labels such as ``wanda 2:4``), sorted by sparsity; plus ``dense`` from ``ppl_base``.

    Only unstructured / N:M records calibrated and evaluated on the same corpus are used
    (structured and cross-domain records are skipped); a repeated point keeps the first record.
    """
    out: dict[str, dict] = {}
    for r in records:
        if r.get("ppl") is None or r.get("structured"):
            continue
        if r.get("calib") not in (None, r.get("data")):  # contextual (cross-domain) records
            continue
        label = r["method"] + (f" {r['nm']}" if r.get("nm") else "")
        out.setdefault(label, {}).setdefault(round(float(r["sparsity"]), 4), float(r["ppl"]))
        out.setdefault("dense", {0.0: float(r["ppl_base"])})
    return {k: sorted(v.items()) for k, v in out.items()}


def plot_sweep(records: list[dict], *, live: dict | None = None, ax=None):
    """PPL (log scale) against sparsity: one line per method (unstructured), its N:M points as
    separate markers in the same colour (square 2:4, triangle 4:8, ...), the dense model as a
    dashed line.  ``live`` {"sparsity", "ppl", "label"} marks a point recomputed now."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.8))
    pts = sweep_points(records)
    colours = {}
    markers = iter("s^DvP")
    nm_marker: dict[str, str] = {}
    for label in sorted(pts, key=lambda k: (":" in k, k)):  # lines first, then N:M points
        if label == "dense":
            ax.axhline(pts[label][0][1], color="gray", ls="--", lw=1,
                       label=f"dense ({pts[label][0][1]:.2f})")
            continue
        method, _, nm = label.partition(" ")
        xs, ys = [p[0] for p in pts[label]], [p[1] for p in pts[label]]
        if not nm:
            (line,) = ax.plot(xs, ys, "o-", label=label)
            colours[method] = line.get_color()
        else:
            if nm not in nm_marker:
                nm_marker[nm] = next(markers, "o")
            ax.plot(xs, ys, nm_marker[nm], ms=8, mfc="none", mew=1.8,
                    color=colours.get(method), label=label)
    if live:
        ax.plot([live["sparsity"]], [live["ppl"]], "k*", ms=14,
                label=live.get("label", "recomputed now"))
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder linears")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return ax


def speedup(r: dict) -> float:
    """Pruned over unpruned prefill speed of one ``edgellm prune`` record: the paired protocol's
    ``speedup`` (median of per-pair ratios) when recorded, else the ratio of the two tokens/s
    (committed records measured before it)."""
    if r.get("speedup") is not None:
        return r["speedup"]
    return r["prefill_tokens_per_s"] / r["prefill_tokens_per_s_base"]


def structured_rows(records: list[dict]) -> list[dict]:
    """One row per structured ``edgellm prune`` record: what was removed, parameters, bytes,
    prefill tokens/s (pruned and unpruned; ``speed_protocol`` names how they were timed) and
    perplexity unpruned / after pruning / after recovery, with the fine-tuned unpruned control.

    ``ppl_pruned`` is the perplexity before recovery (``ppl_before_recovery`` when recovery
    ran, else ``ppl``); ``ppl_recovered`` is ``ppl`` after recovery (None without it).
    """
    rows = []
    for r in records:
        if not r.get("structured"):
            continue
        recovered = bool(r.get("recover_steps"))
        rows.append({
            "removed": f"{r['structured']} {r['ratio']:.0%}" + (
                f" ({r['granularity']})" if r["structured"] == "heads" and r.get("granularity")
                else ""),
            "n_params": r["n_params"], "params_%": 100 * r["n_params"] / r["n_params_base"],
            "size_bytes": r["size_bytes"],
            "prefill_tokens_per_s": r["prefill_tokens_per_s"],
            "prefill_tokens_per_s_base": r["prefill_tokens_per_s_base"],
            "speedup": speedup(r),
            "speed_protocol": (r.get("speed_protocol") or {}).get(
                "prefill_tokens_per_s", {}).get("name"),
            "ppl_base": r["ppl_base"],
            "ppl_pruned": r["ppl_before_recovery"] if recovered else r["ppl"],
            "ppl_recovered": r["ppl"] if recovered else None,
            "ppl_control": r.get("ppl_control"),
            "recover_steps": r.get("recover_steps", 0),
        })
    return sorted(rows, key=lambda x: (x["removed"].split()[0], -x["n_params"]))


def contextual_table(records: list[dict]) -> dict[str, dict[str, float]]:
    """``{calibration corpus: {evaluation corpus: ppl}}`` from records of the same pruning run
    calibrated on different corpora, plus the row ``"dense"`` (``ppl_base`` per evaluation
    corpus).  Raises :class:`PruneError` when a record has no perplexity."""
    table: dict[str, dict[str, float]] = {"dense": {}}
    for r in records:
        if r.get("command", "").startswith("edgellm kl"):  # mask against mask: mask_comparison
            continue
        if r.get("ppl") is None:
            raise PruneError(f"record {r.get('command', r)!r} has no perplexity; run it with --eval")
        table.setdefault(r["calib"], {})[r["data"]] = float(r["ppl"])
        table["dense"][r["data"]] = float(r["ppl_base"])
    return table


def mask_comparison(records: list[dict]) -> list[dict]:
    """The paired comparisons of two masks in a contextual sweep, one row per evaluation corpus:
    ``edgellm prune --calib B --baseline-calib A`` records (mask B minus mask A in one process)
    or ``edgellm kl --model MASK_B --reference MASK_A`` records.  Each row: ``data``,
    ``delta_nll`` (mean per-token NLL of mask B minus mask A on the same tokens, nats), its
    standard error, ``z`` = delta / se, the 95 % interval (±1.96 se), ``kl_mean`` between the
    two masks' predictions and ``n_tokens``."""
    rows = []
    for r in records:
        if r.get("delta_nll_vs_baseline") is not None:
            d, se = r["delta_nll_vs_baseline"], r["delta_nll_vs_baseline_stderr"]
            model, ref, kl = r["calib"], r["baseline_calib"], r.get("kl_mean_vs_baseline")
        elif r.get("command", "").startswith("edgellm kl"):
            d, se = r["delta_nll"], r["delta_nll_stderr"]
            model, ref, kl = r["model"], r["reference"], r["kl_mean"]
        else:
            continue
        rows.append({"data": r["data"], "model": model, "reference": ref,
                     "delta_nll": d, "delta_nll_stderr": se, "z": d / se,
                     "ci95": (d - 1.96 * se, d + 1.96 * se), "kl_mean": kl,
                     "n_tokens": r["n_tokens"]})
    return rows


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


def allocation_rows(allocated: list[dict], uniform: list[dict]) -> list[dict]:
    """One row per ``06_sensitivity`` record next to the uniform Wanda run at the same target
    sparsity and evaluation (``06_sparsity``): PPLs, each ΔNLL vs the dense model, their
    difference (allocated − uniform) with the conservative bound ``√(se_a² + se_u²)`` (both are
    paired against the same dense tokens; their errors are positively correlated, so the true
    standard error is smaller) and a verdict that needs the difference to exceed twice it."""
    import math

    rows = []
    for a in allocated:
        u = next((r for r in uniform if r["method"] == "wanda" and not r.get("nm")
                  and not r.get("structured") and r.get("sparsity_target") == a["sparsity_target"]
                  and r.get("n_tokens") == a["n_tokens"] and r.get("data") == a["data"]), None)
        sens = {int(k): v for k, v in a["sensitivity"].items()}
        order = sorted(sens, key=sens.get)
        row = {"sparsity": a["sparsity_target"], "spread": a["spread"], "ppl": a["ppl"],
               "delta_nll": a["delta_nll"], "delta_nll_stderr": a["delta_nll_stderr"],
               "least_sensitive": order[:3], "most_sensitive": order[-3:],
               "sparsity_achieved": a["sparsity"], "n_tokens": a["n_tokens"]}
        if u is not None:
            diff = a["delta_nll"] - u["delta_nll"]
            bound = math.hypot(a["delta_nll_stderr"], u["delta_nll_stderr"])
            row.update(ppl_uniform=u["ppl"], delta_nll_uniform=u["delta_nll"], diff=diff,
                       bound=bound, verdict=("allocation better" if diff < -2 * bound else
                                             "uniform better" if diff > 2 * bound else
                                             "not resolved"))
        rows.append(row)
    return rows
