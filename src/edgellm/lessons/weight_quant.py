"""Comparing weight-quantization methods from recorded results (lesson 03's table, plot, widget).

Records come from ``edgellm quantize ... --eval --json`` (see ``results/03_*.json``).  Each holds
the method, bits, group size, bits per weight, perplexity of the quantized and the base model on
the same tokens, the paired ΔNLL (quantized − base, per token) with its standard error, and the
KL divergence to the base model.

Ordering two methods A and B from their records: both ΔNLLs are paired against the same base
tokens, so ``ΔNLL_A − ΔNLL_B`` is the mean per-token NLL difference between A and B.  Its exact
standard error needs the per-token values (:func:`paired_delta_nll`); from the records alone,
``√(se_A² + se_B²)`` is an upper bound when the two errors are positively correlated (they are:
both methods struggle on the same hard tokens), so a difference larger than twice that bound is
a safe "A below B".
"""

from __future__ import annotations

import math

from edgellm.metrics import mean_stderr, token_logprobs

METHOD_ORDER = ("rtn", "gptq", "awq", "imatrix", "rtn-mixed", "gptq-mixed", "gguf")


# lesson 03 sweeps that are experiments of their own, not rows of the methods table
SIDE_SWEEPS = ("03_awq_salient", "03_gptq_diag", "03_control")


def sweeps() -> list[str]:
    """Lesson 03's method/format sweeps: every ``results/03_*.json`` but :data:`SIDE_SWEEPS`."""
    from edgellm.results import sweep_names

    return [n for n in sweep_names() if n.startswith("03_") and n not in SIDE_SWEEPS]


def load_results(names=None) -> list[dict]:
    """All records of lesson 03's sweeps (missing or not yet run sweeps give no records)."""
    from edgellm.results import load_records

    out = []
    for n in sweeps() if names is None else names:
        try:
            out += load_records(n)
        except FileNotFoundError:
            pass
    return out


def group_label(group_size) -> str:
    return "channel" if group_size is None else f"g{group_size}"


def method_label(r: dict) -> str:
    """``rtn``, ``gptq``…; ``rtn-mixed`` for a mixed-precision record (one with a bpw budget);
    the llama.cpp type (``Q4_0``…) for a ``gguf`` record."""
    if r["method"] == "gguf":
        return r.get("type", "gguf")
    return r["method"] + ("-mixed" if r.get("bpw_budget") is not None else "")


def _order(label: str) -> int:
    return METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER)


def table(records: list[dict]) -> list[dict]:
    """One row per record, sorted by bits, granularity and method: the lesson's results table."""
    rows = []
    for r in records:
        rows.append({
            "method": method_label(r), "bits": r["bits"], "group": group_label(r.get("group_size")),
            "bpw": r.get("bpw"), "MB (linears)": r.get("size_bytes_linears", 0) / 1e6,
            "ppl": r.get("ppl"), "ppl_stderr": r.get("ppl_stderr"), "ppl_base": r.get("ppl_base"),
            "delta_ppl": r.get("delta_ppl"), "delta_nll": r.get("delta_nll"),
            "delta_nll_stderr": r.get("delta_nll_stderr"), "kl_mean": r.get("kl_mean"),
            "top1": r.get("top1_agreement"), "lossless": r.get("lossless", False),
            "seconds_quantize": r.get("seconds_quantize"),
        })

    def key(row):
        return (-(row["bits"] or 0), row["group"], _order(row["method"]), -row["bpw"])

    return sorted(rows, key=key)


def format_table(rows: list[dict]) -> str:
    """The table as fixed-width text."""
    head = (f"{'method':<10} {'bits':>4} {'group':>7} {'bpw':>6} {'PPL ± se':>15} {'ΔPPL':>7} "
            f"{'ΔNLL ± se':>17} {'KL':>9} {'top1':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl = f"{r['ppl']:.3f} ± {r['ppl_stderr']:.3f}" if r["ppl"] is not None else "-"
        dn = (f"{r['delta_nll']:+.4f} ± {r['delta_nll_stderr']:.4f}"
              if r["delta_nll"] is not None else "-")
        kl = ("lossless" if r["lossless"] else
              f"{r['kl_mean']:.2e}" if r["kl_mean"] is not None else "-")
        lines.append(f"{r['method']:<10} {r['bits']:>4} {r['group']:>7} {r['bpw']:>6.3f} "
                     f"{ppl:>15} {r['delta_ppl']:>+7.3f} {dn:>17} {kl:>9} "
                     f"{r['top1'] if r['top1'] is None else format(r['top1'], '.3f'):>6}")
    return "\n".join(lines)


def select(records: list[dict], method: str, bits: int, group_size) -> dict | None:
    """The record of one (method, bits, group size), or None.  ``method`` is a
    :func:`method_label`: mixed-precision records are ``rtn-mixed``/``gptq-mixed`` (their
    ``bits`` is the starting width, not what every layer got), never plain ``rtn``."""
    for r in records:
        if method_label(r) == method and r["bits"] == bits and r.get("group_size") == group_size:
            return r
    return None


def settings(records: list[dict]) -> list[tuple]:
    """The (bits, group size) pairs that have an RTN record, most bits first."""
    pairs = {(r["bits"], r.get("group_size")) for r in records if method_label(r) == "rtn"}
    return sorted(pairs, key=lambda p: (-p[0], p[1] is not None, -(p[1] or 0)))


def ordering(records: list[dict], bits: int, group_size, baseline: str = "rtn",
             methods=("gptq", "awq", "imatrix")) -> list[dict]:
    """Each method's ΔNLL minus the baseline's at (bits, group size), with a conservative
    standard error √(se_m² + se_base²) and a verdict: ``below`` (difference < −2·se),
    ``above`` (> 2·se) or ``tie``."""
    base = select(records, baseline, bits, group_size)
    out = []
    if base is None:
        return out
    for m in methods:
        r = select(records, m, bits, group_size)
        if r is None:
            continue
        d = r["delta_nll"] - base["delta_nll"]
        se = math.hypot(r["delta_nll_stderr"], base["delta_nll_stderr"])
        verdict = "below" if d < -2 * se else "above" if d > 2 * se else "tie"
        out.append({"method": m, "baseline": baseline, "bits": bits,
                    "group": group_label(group_size), "diff_nll": d, "stderr_bound": se,
                    "verdict": verdict})
    return out


def layer_inputs(model, tok, layer: int = 0, *, n_samples: int = 16, seq_len: int = 256,
                 seed: int = 0):
    """``(stream, linears, stats)`` of one decoder layer of the unquantized ``model`` on pydoc
    calibration windows (:func:`edgellm.lessons.common.layer_stats`): ``stats`` hold ``H``,
    ``mean_sq`` and ``mean_abs``."""
    from edgellm.data import get_calibration
    from edgellm.lessons.common import layer_stats

    return layer_stats(model, get_calibration("pydoc", n_samples, seq_len, seed, tokenizer=tok),
                       layer)


def paired_delta_nll(model_a, model_b, tokens, protocol: str = "gptq", ctx: int = 512,
                     **kwargs) -> dict:
    """Exact paired ΔNLL = mean per-token NLL(A) − NLL(B) on the same tokens, with its standard
    error (the per-token differences' mean and stderr)."""
    r = token_logprobs(model_a, tokens, protocol, ctx, reference=model_b, progress=False,
                       **kwargs)
    m, se = mean_stderr(r["nll"] - r["nll_ref"])
    return {"delta_nll": m, "stderr": se, "n_tokens": r["nll"].numel()}


def describe(records: list[dict], method: str, bits: int, group_size) -> str:
    """What the widget shows for one choice: the record's numbers and its place vs RTN."""
    r = select(records, method, bits, group_size)
    label = f"{method} {bits}-bit {group_label(group_size)}"
    if r is None:
        have = sorted({(method_label(x), x['bits'], group_label(x.get('group_size')))
                       for x in records})
        return f"{label}: not recorded. Recorded: " + ", ".join(" ".join(map(str, h)) for h in have)
    text = (f"{label}: {r['bpw']:.3f} bits/weight, linears {r['size_bytes_linears'] / 1e6:.1f} MB\n"
            f"PPL {r['ppl']:.3f} ± {r['ppl_stderr']:.3f} (base {r['ppl_base']:.3f}), "
            f"ΔNLL {r['delta_nll']:+.4f} ± {r['delta_nll_stderr']:.4f}, KL {r['kl_mean']:.3g}, "
            f"top-1 agreement {r['top1_agreement']:.3f}")
    if r.get("lossless"):
        text += "\nlossless: every token's log-probability equals the base model's"
    if method != "rtn":
        o = ordering(records, bits, group_size, methods=(method,))
        if o:
            text += (f"\nvs RTN: ΔNLL difference {o[0]['diff_nll']:+.4f} "
                     f"(± ≤{o[0]['stderr_bound']:.4f}) → {o[0]['verdict']}")
    return text


def plot_tradeoff(records: list[dict], kl_floor: float = 1e-6):
    """ΔPPL (symmetric log scale) and KL (log scale, values below ``kl_floor`` drawn at the
    floor) against bits per weight, one marker per method; llama.cpp's block formats joined by a
    line and labelled; lossless points circled.  Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = {"rtn": "o", "gptq": "s", "awq": "^", "imatrix": "D", "rtn-mixed": "v",
               "gptq-mixed": "<", "gguf": "P"}
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault("gguf" if r["method"] == "gguf" else method_label(r), []).append(r)
    for m in sorted(by_label, key=_order):
        rs = sorted(by_label[m], key=lambda r: r["bpw"])
        x = [r["bpw"] for r in rs]
        kl = [max(r["kl_mean"], kl_floor) for r in rs]
        style = dict(marker=markers.get(m, "x"), label="llama.cpp (gguf)" if m == "gguf" else m)
        # the block formats as one curve, like the perplexity-against-size plot of llama.cpp's
        # k-quants pull request (#1684)
        if m == "gguf":
            ax1.plot(x, [r["delta_ppl"] for r in rs], color="k", lw=1, **style)
            ax2.plot(x, kl, color="k", lw=1, **style)
            for r, k in zip(rs, kl, strict=True):
                ax2.annotate(method_label(r), (r["bpw"], k), textcoords="offset points",
                             xytext=(4, -12), fontsize=8)
        else:
            ax1.scatter(x, [r["delta_ppl"] for r in rs], **style)
            ax2.scatter(x, kl, **style)
        for r in rs:
            if r.get("lossless"):
                for ax, y in ((ax1, r["delta_ppl"]), (ax2, kl_floor)):
                    ax.scatter([r["bpw"]], [y], s=250, facecolors="none", edgecolors="k")
                ax2.annotate("lossless", (r["bpw"], kl_floor), textcoords="offset points",
                             xytext=(8, 4))
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set_yscale("symlog", linthresh=0.1)
    ax1.set(xlabel="bits per weight (linears, scales included)",
            ylabel="ΔPPL vs base (symlog)", title="perplexity increase")
    ax2.set_yscale("log")
    ax2.axhline(kl_floor, color="grey", lw=0.8, ls=":")
    ax2.set(xlabel="bits per weight (linears, scales included)",
            ylabel=f"KL(base ‖ quantized), nats (floor {kl_floor:g})", title="KL divergence")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------
# llama.cpp block formats on real weights (K-quants next to the 32-blocks)

BLOCK_FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "Q8_0")


def format_errors(weights: dict, types=BLOCK_FORMATS, *, control_seed: int | None = 0) -> list[dict]:
    """Relative RMS error ``‖Ŵ − W‖ / ‖W‖`` of each llama.cpp type over ``weights``
    ``{name: W (out, in)}`` (rows of whole 256-weight super-blocks for the K-quants), pooled
    over the matrices, with its bits per weight.  With ``control_seed``, also on a Gaussian
    control of the same shapes and per-row standard deviations (weights that never sat on a
    4-bit grid).  The K-quants are quantized by llama.cpp's own ``libggml`` (fast) and
    dequantized by ours; :mod:`edgellm.quant.kquants` checks our quantizer gives the same bytes.
    """
    import torch

    from edgellm.quant.gguf_formats import TYPE_BPW, quantize_gguf
    from edgellm.quant.kquants import KQUANT_BPW, KQUANT_TYPES, dequantize_kquant, ggml_quantize

    def fake(W, t):
        if t in KQUANT_TYPES:
            return dequantize_kquant(ggml_quantize(W, t), t, tuple(W.shape))
        return quantize_gguf(W, t).dequantize()

    g = torch.Generator().manual_seed(control_seed or 0)
    controls = {n: torch.randn(W.shape, generator=g) * W.float().std(dim=1, keepdim=True)
                for n, W in weights.items()} if control_seed is not None else {}
    rows = []
    for t in types:
        row = {"type": t, "bpw": KQUANT_BPW.get(t, TYPE_BPW.get(t))}
        for key, mats in (("rel_rms", weights), ("rel_rms_control", controls)):
            if not mats:
                continue
            num = sum(float((fake(W.float(), t) - W.float()).square().sum()) for W in mats.values())
            den = sum(float(W.float().square().sum()) for W in mats.values())
            row[key] = (num / den) ** 0.5
        rows.append(row)
    return rows


def format_format_errors(rows: list[dict]) -> str:
    head = f"{'type':<6} {'bpw':>7} {'rel. RMS (model)':>17} {'rel. RMS (Gaussian)':>20}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: r["bpw"]):
        ctrl = f"{r['rel_rms_control']:>20.4f}" if "rel_rms_control" in r else f"{'-':>20}"
        lines.append(f"{r['type']:<6} {r['bpw']:>7.4f} {r['rel_rms']:>17.4f} {ctrl}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# AWQ's motivation: 1 % salient channels kept (results/03_awq_salient.json)


def salient_table(records: list[dict]) -> list[dict]:
    """One row per record of ``03_awq_salient``: which channels were kept, PPL, ΔNLL ± se and
    the difference to plain RTN with the conservative bound √(se² + se_rtn²)."""
    plain = next((r for r in records if r.get("keep_salient") is None), None)
    rows = []
    for r in records:
        by = r.get("salient_by") if r.get("keep_salient") is not None else "none"
        row = {"kept": by, "fraction": r.get("keep_salient") or 0.0, "ppl": r["ppl"],
               "ppl_base": r["ppl_base"], "delta_nll": r["delta_nll"],
               "delta_nll_stderr": r["delta_nll_stderr"], "n_tokens": r["n_tokens"],
               "bpw_extra": r.get("bpw_extra", 0.0)}
        if plain is not None and r is not plain:
            row["diff_vs_rtn"] = r["delta_nll"] - plain["delta_nll"]
            row["diff_bound"] = math.hypot(r["delta_nll_stderr"], plain["delta_nll_stderr"])
        rows.append(row)
    return rows


def format_salient_table(rows: list[dict]) -> str:
    head = (f"{'kept 1 % by':<12} {'PPL':>8} {'ΔNLL ± se':>18} {'vs RTN ± bound':>18} "
            f"{'+bpw':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = (f"{r['diff_vs_rtn']:+.3f} ± {r['diff_bound']:.3f}" if "diff_vs_rtn" in r
                else "-")
        lines.append(f"{r['kept']:<12} {r['ppl']:>8.2f} "
                     f"{r['delta_nll']:>+9.3f} ± {r['delta_nll_stderr']:.3f} {diff:>18} "
                     f"{r['bpw_extra']:>6.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the GPTQ diagnosis at layer level (results/03_gptq_diag.json, ``layer_level``)


def gptq_diag_summary(rows: list[dict], group_size=None, sym: bool = False) -> list[dict]:
    """Geometric means over the (layer, linear group) pairs of a layer-level diagnosis:
    each configuration's held-out error relative to RTN's (``heldout_vs_rtn``, < 1: better
    than RTN on text it never saw) and its held-out over calibration error (``overfit``,
    > 1: the calibration error flatters it).  One row per configuration, at one
    (group size, sym) setting."""
    sel = [r for r in rows if r["group_size"] == group_size and r["sym"] == sym]
    rtn = {(r["layer"], r["group"]): r for r in sel if r["method"] == "rtn"}
    configs: dict[tuple, list] = {}
    for r in sel:
        if r["method"] == "rtn":
            continue
        key = (r["method"], r["n_windows"], r.get("act_order"), r.get("damp"),
               r.get("group_params"))
        base = rtn[(r["layer"], r["group"])]
        configs.setdefault(key, []).append(
            (r["heldout"] / base["heldout"], r["heldout"] / max(r["calib"], 1e-30),
             r["calib"] / base[f"calib_{r['n_windows']}"]))
    out = []
    for (method, n, act_order, damp, conv), v in sorted(configs.items(), key=str):
        gm = [math.exp(sum(math.log(max(x[i], 1e-30)) for x in v) / len(v)) for i in range(3)]
        out.append({"method": method, "n_windows": n, "act_order": act_order, "damp": damp,
                    "group_params": conv, "heldout_vs_rtn": gm[0], "overfit": gm[1],
                    "calib_vs_rtn": gm[2], "n": len(v)})
    return out


def format_gptq_diag(summary: list[dict]) -> str:
    head = (f"{'method':<6} {'windows':>7} {'act_order':>9} {'damp':>5} {'groups from':>12} "
            f"{'calib/RTN':>9} {'held-out/RTN':>12} {'held-out/calib':>14}")
    lines = [head, "-" * len(head)]
    for r in summary:
        order = "-" if r["act_order"] is None else "yes" if r["act_order"] else "no"
        lines.append(f"{r['method']:<6} {r['n_windows']:>7} {order:>9} "
                     f"{r['damp'] if r['damp'] is not None else '-':>5} "
                     f"{r['group_params'] or '-':>12} {r['calib_vs_rtn']:>9.3f} "
                     f"{r['heldout_vs_rtn']:>12.3f} {r['overfit']:>14.3f}")
    return "\n".join(lines)
