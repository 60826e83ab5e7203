"""Lesson 12's tables, figures and widget: the served model under load, speculative decoding and
the kernels behind packed weights, read from the recorded sweeps (``results/12_*.json``)."""

from __future__ import annotations

import numpy as np

from edgellm.deploy.speculative import expected_speedup, expected_tokens_per_step

# --------------------------------------------------------------------------------------------
# serving


def server_name(rec: dict) -> str:
    """``llama-server ×8 slots`` / ``llama-cpp-python``: the engine and its slots."""
    if rec["engine"] == "llama-server":
        n = rec.get("parallel") or 1
        return f"llama-server, {n} slot{'s' if n > 1 else ''}"
    return rec["engine"]


def serving_rows(records: list[dict]) -> list[dict]:
    """One row per load test (engine, slots, clients) of ``results/12_serving.json``, with the
    in-process decode speed of the same file (``bench-runtime``) as ``in_process``."""
    ref = next((r["decode_tokens_per_s"] for r in records
                if r.get("decode_tokens_per_s") and "bench-runtime" in r.get("command", "")), None)
    rows = []
    for r in records:
        if r.get("tokens_per_s") is None or "clients" not in r:
            continue
        rows.append({"server": server_name(r), "clients": r["clients"],
                     "tokens_per_s": r["tokens_per_s"], "ttft_p50_s": r["ttft_p50_s"],
                     "ttft_p95_s": r["ttft_p95_s"], "itl_p50_s": r["itl_p50_s"],
                     "itl_p95_s": r["itl_p95_s"], "errors": r["errors"], "in_process": ref,
                     "cut_short": r.get("cut_short", 0),
                     "n_requests": r.get("n_requests", r["clients"] * r["requests"])})
    return sorted(rows, key=lambda x: (x["server"], x["clients"]))


def format_serving_table(rows: list[dict]) -> str:
    """Markdown: server, clients, total tokens/s, TTFT and inter-token latency p50/p95, streams
    ended early (before ``max_tokens``, without a stop), errors."""
    out = ["| server | clients | tokens/s (all clients) | TTFT p50 / p95 | ITL p50 / p95 | ended early "
           "| errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.1f} | "
                   f"{r['ttft_p50_s'] * 1e3:.0f} / {r['ttft_p95_s'] * 1e3:.0f} ms | "
                   f"{r['itl_p50_s'] * 1e3:.1f} / {r['itl_p95_s'] * 1e3:.1f} ms | "
                   f"{r['cut_short']} of {r['n_requests']} | {r['errors']} |")
    return "\n".join(out)


def plot_serving(rows: list[dict]):
    """Total tokens/s and TTFT p95 against concurrent clients, one line per server setup."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for name in sorted({r["server"] for r in rows}):
        sel = [r for r in rows if r["server"] == name]
        c = [r["clients"] for r in sel]
        a.plot(c, [r["tokens_per_s"] for r in sel], "o-", label=name)
        b.plot(c, [r["ttft_p95_s"] for r in sel], "o-", label=name)
    ref = next((r["in_process"] for r in rows if r["in_process"]), None)
    if ref:
        a.axhline(ref, color="grey", ls=":", label="in process, 1 stream")
    a.set(xlabel="concurrent clients", ylabel="tokens/s, all clients", xscale="log", xticks=[1, 2, 4, 8],
          xticklabels=["1", "2", "4", "8"], title="throughput")
    b.set(xlabel="concurrent clients", ylabel="time to first token, p95 (s)", xscale="log",
          yscale="log", xticks=[1, 2, 4, 8], xticklabels=["1", "2", "4", "8"], title="latency")
    a.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# speculative decoding


def speculative_rows(records: list[dict]) -> list[dict]:
    """One row per ``edgellm speculative`` record: draft, γ, α, tokens per step (measured and by
    the formula), draft cost ratio, speedup (measured and predicted), identical, and
    ``step_cost``: the wall time of one speculative step (draft + verification) in plain decode
    steps, from the record's totals (prefill included in both), so that ``speedup =
    tokens_per_step / step_cost``."""
    rows = []
    for r in records:
        if "acceptance_rate" not in r:
            continue
        plain_step = r["seconds_plain"] / (r["n_prompts"] * r["new_tokens"])
        rows.append({"draft": r["draft"], "gamma": r["gamma"], "alpha": r["acceptance_rate"],
                     "step_cost": r["seconds_speculative"] / r["target_steps"] / plain_step,
                     "tokens_per_step": r["tokens_per_step"],
                     "expected": r["tokens_per_step_expected"], "cost_ratio": r["cost_ratio"],
                     "speedup": r["speedup"], "speedup_expected": r["speedup_expected"],
                     "identical": r["identical"], "threads": r["threads"]})
    return rows


def format_speculative_table(rows: list[dict]) -> str:
    out = ["| draft | γ | α (accepted / drafted) | tokens per target step (formula) | draft cost c "
           "| one step, in plain steps | speedup (formula) | identical to greedy |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['draft']} | {r['gamma']} | {r['alpha']:.3f} | {r['tokens_per_step']:.2f}"
                   f" ({r['expected']:.2f}) | {r['cost_ratio']:.2f} | {r['step_cost']:.2f} | "
                   f"{r['speedup']:.2f}× ({r['speedup_expected']:.2f}×) | "
                   f"{'yes' if r['identical'] else 'no'} |")
    return "\n".join(out)


def plot_speculative(rows: list[dict] = (), *, gamma: int = 4,
                     cost_ratios=(0.0, 0.1, 0.25, 0.5)):
    """Predicted speedup ``E[tokens/step] / (γ·c + 1)`` against α for several draft cost ratios
    ``c`` at draft length ``gamma``, with the measured runs (any γ) as points."""
    from edgellm.lessons.common import new_figure

    fig, ax = new_figure((7, 4))
    alpha = np.linspace(0, 0.99, 100)
    for c in cost_ratios:
        ax.plot(alpha, [expected_speedup(a, gamma, c) for a in alpha], label=f"c = {c:g}")
    for r in rows:
        ax.plot(r["alpha"], r["speedup"], "ko" if r["cost_ratio"] else "k^")
        ax.annotate(f"{r['draft']} γ={r['gamma']}", (r["alpha"], r["speedup"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xlabel="acceptance rate α", ylabel="speedup over plain decoding", yscale="log",
           title=f"when speculation pays (curves: γ = {gamma}; points: measured)")
    ax.legend(title="draft cost / target step", fontsize=8)
    return fig


def speculative_widget():
    """Sliders for α, γ and the draft's cost ratio c: expected tokens per step and speedup."""
    import ipywidgets as W
    from IPython.display import display

    a = W.FloatSlider(value=0.6, min=0.0, max=0.99, step=0.01, description="α")
    g = W.IntSlider(value=4, min=1, max=12, description="γ")
    c = W.FloatSlider(value=0.1, min=0.0, max=1.0, step=0.01, description="draft cost c")
    out = W.Output()

    def show(*_):
        out.clear_output()
        with out:
            e = expected_tokens_per_step(a.value, g.value)
            s = expected_speedup(a.value, g.value, c.value)
            best = max(range(1, 17), key=lambda k: expected_speedup(a.value, k, c.value))
            print(f"tokens per target step: {e:.2f} (at most {g.value + 1})")
            print(f"speedup: {s:.2f}× — {'pays' if s > 1 else 'slower than plain decoding'}")
            print(f"best γ at this α and c: {best} "
                  f"({expected_speedup(a.value, best, c.value):.2f}×)")

    for w in (a, g, c):
        w.observe(show, "value")
    show()
    display(W.VBox([a, g, c, out]))
    return a, g, c, out


# --------------------------------------------------------------------------------------------
# kernels


def format_kernel_table(rec: dict) -> str:
    """Markdown of an ``edgellm kernels bench`` record: per shape and variant, GB/s of packed
    bytes, the fraction of the read-bandwidth bound, the error against the dense product."""
    out = [f"CPU: {rec.get('cpu')} ({rec.get('cpu_capability')}), {rec.get('threads')} thread(s), "
           f"bound {rec['bound_gbytes_per_s']:.1f} GB/s, last-level cache "
           f"{rec['llc_bytes'] / 2**20:.0f} MiB", "",
           "| shape N×K | variant | layout | µs per call | GB/s | of the bound | max abs err |",
           "|---|---|---|---|---|---|---|"]
    for r in rec["variants"]:
        out.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['name']}"
                   f"{' (' + r['path'] + ')' if r.get('path') else ''} | {r.get('layout', '')} | "
                   f"{r['seconds'] * 1e6:.0f} | {r['gbytes_per_s']:.2f} | "
                   f"{r['fraction_of_bound']:.0%} | {r['max_abs_err']:.1e} |")
    for name, why in (rec.get("skipped") or {}).items():
        out.append(f"\nskipped {name}: {why}")
    return "\n".join(out)


def plot_kernels(records: list[dict]):
    """GB/s of every variant, one panel per shape, one bar group per thread count, with each
    thread count's bandwidth bound as a dashed line."""
    import matplotlib.pyplot as plt

    shapes = sorted({tuple(r["shape"]) for rec in records for r in rec["variants"]})
    names = list(dict.fromkeys(r["name"] for rec in records for r in rec["variants"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.6), layout="constrained",
                             squeeze=False)
    width = 0.8 / max(1, len(records))
    for ax, shape in zip(axes[0], shapes, strict=True):
        for j, rec in enumerate(records):
            vals = {r["name"]: r["gbytes_per_s"] for r in rec["variants"]
                    if tuple(r["shape"]) == shape}
            xs = np.arange(len(names)) + j * width
            ax.bar(xs, [vals.get(n, 0) for n in names], width, label=f"{rec['threads']} thread(s)")
            ax.hlines(rec["bound_gbytes_per_s"], xs[0] - width / 2, xs[-1] + width / 2,
                      colors=f"C{j}", linestyles="--")
        ax.set_xticks(np.arange(len(names)) + width * (len(records) - 1) / 2, names,
                      rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="GB/s of packed bytes", yscale="log",
               title=f"W4A32 GEMV, {shape[0]}×{shape[1]} (dashed: read bound)")
    axes[0][0].legend(fontsize=8)
    return fig


def format_fusion_table(rec: dict) -> str:
    """Markdown of an ``edgellm kernels fusion`` record: µs per call and the error of each op."""
    out = ["| operation | tokens | µs per call | max abs err vs unfused |", "|---|---|---|---|"]
    for r in rec["rows"]:
        out.append(f"| {r['name']} | {r['tokens']} | {r['seconds'] * 1e6:.1f} | "
                   f"{r['max_abs_err']:.1e} |")
    for name, why in (rec.get("skipped") or {}).items():
        out.append(f"\nskipped {name}: {why[:200]}")
    return "\n".join(out)


def plot_sparsity(rec: dict):
    """Per layer: the share of |activation| mass in the top neurons (per token and for a fixed
    hot set), the near-zero fraction, the negative-gate fraction and the hot set's Jaccard overlap
    between two halves of the data, with uniform activations and random sets as references."""
    from edgellm.lessons.common import new_figure

    fig, ax = new_figure((8, 3.8))
    layers = [r["layer"] for r in rec["layers"]]
    for key, label in (("top_mass_per_token", "top-10 % mass, per token"),
                       ("top_mass_ranked", "top-10 % mass, fixed hot set"),
                       ("near_zero_fraction", "near zero (|a| < 1e-3 max)"),
                       ("gate_negative_fraction", "gate < 0 (ReLU would zero)"),
                       ("hot_jaccard", "hot set overlap (Jaccard)")):
        ax.plot(layers, [r[key] for r in rec["layers"]], "o-", ms=3, label=label)
    ax.axhline(rec["top"], color="grey", ls=":", label="uniform activations / random set")
    ax.axhline(rec["random_jaccard"], color="grey", ls="--", lw=0.8)
    ax.set(xlabel="layer", ylabel="fraction", ylim=(0, 1),
           title=f"MLP activations ({rec['hidden_act']}), {rec['tokens']} tokens")
    ax.legend(fontsize=7, ncol=2)
    return fig
