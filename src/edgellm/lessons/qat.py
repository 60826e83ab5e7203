"""Lesson 13's tables, figures and toys: quantization-aware training against post-training
quantization (``results/13_qat.json``), BitNet b1.58's curve (``results/13_bitnet.json``), and
the one-layer toy where the weights snap onto the grid."""

from __future__ import annotations

import math

import torch

from edgellm.lessons.distill import verdict


def _se(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else math.sqrt(a * a + b * b)


def qat_rows(records: list[dict]) -> list[dict]:
    """One row per ``edgellm qat`` record: perplexities of fp32, PTQ, QAT and the control, the
    paired ΔNLL of QAT against PTQ and against the control (± SE) with their verdicts, and the
    share of PTQ's loss QAT recovers."""
    rows = []
    for r in records:
        if r.get("ppl") is None:
            continue
        rows.append({
            "bits": r["bits"], "grid": r.get("grid"), "group_size": r.get("group_size"),
            "steps": r["steps"], "train_tokens": r["steps"] * r["batch_size"] * r["seq_len"],
            "ppl_base": r["ppl_base"], "ppl_ptq": r["ppl_ptq"], "ppl": r["ppl"],
            "ppl_control": r.get("ppl_control"), "ptq_method": r.get("ptq_method"),
            "delta_nll_ptq": r.get("delta_nll_ptq"), "delta_nll": r.get("delta_nll"),
            "vs_ptq": r.get("delta_nll_vs_ptq"), "vs_ptq_se": r.get("delta_nll_vs_ptq_stderr"),
            "vs_ptq_verdict": verdict(r.get("delta_nll_vs_ptq"),
                                      r.get("delta_nll_vs_ptq_stderr")),
            "vs_control": r.get("delta_nll_vs_control"),
            "vs_control_se": r.get("delta_nll_vs_control_stderr"),
            "vs_control_verdict": verdict(r.get("delta_nll_vs_control"),
                                          r.get("delta_nll_vs_control_stderr")),
            "recovered": r.get("ptq_loss_recovered"), "kl_mean": r.get("kl_mean"),
            "size_bytes": r.get("size_bytes"), "bpw": r.get("bpw"),
            "n_tokens": r.get("n_tokens"), "curve": r.get("curve") or []})
    return sorted(rows, key=lambda x: (x["bits"], x["grid"] or ""))


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def format_qat_table(rows: list[dict]) -> str:
    """Markdown: bits, PPL of fp32 / PTQ / control / QAT, ΔNLL QAT − PTQ and QAT − control with
    ± 2·SE verdicts, share of PTQ's ΔNLL recovered, size."""
    out = ["| bits, grid | fp32 | PTQ | control (fp32 FT → PTQ) | QAT | QAT − PTQ (ΔNLL) | "
           "QAT − control | PTQ's loss recovered | size |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grid = {"minmax": "min-max", "lsq": "LSQ", "ternary": "ternary", "q4_0": "Q4_0"}
        out.append(
            f"| {r['bits']}, {grid.get(r['grid'], r['grid'])} | {r['ppl_base']:.2f} | {r['ppl_ptq']:.1f} | "
            f"{_f(r['ppl_control'], '{:.1f}')} | {r['ppl']:.1f} | "
            f"{_f(r['vs_ptq'], '{:+.3f}')} ± {_f(r['vs_ptq_se'], '{:.3f}')} "
            f"({r['vs_ptq_verdict']}) | {_f(r['vs_control'], '{:+.3f}')} ± "
            f"{_f(r['vs_control_se'], '{:.3f}')} ({r['vs_control_verdict']}) | "
            f"{_f(r['recovered'], '{:.0%}')} | {r['size_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(out)


def plot_curve(rec: dict, ax=None):
    """Validation NLL against training tokens (QAT's curve), with the fp32 model's and PTQ's
    test NLL as horizontal lines (the curve is on validation tokens, the lines on test tokens:
    read levels, not exact gaps), and the ramp λ on a second axis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    pts = rec.get("curve") or []
    t = [p["tokens"] for p in pts]
    ax.plot(t, [p["nll"] for p in pts], "o-", label=f"QAT {rec['bits']}-bit (validation)")
    ax.axhline(math.log(rec["ppl_base"]), color="k", ls="--", lw=1, label="fp32 (test)")
    if rec.get("ppl_ptq"):
        ax.axhline(math.log(rec["ppl_ptq"]), color="C3", ls=":", lw=1, label="PTQ (test)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("NLL (nats / token)")
    ax.legend(fontsize=8)
    if pts and any(p["lam"] < 1 for p in pts):
        ax2 = ax.twinx()
        ax2.plot(t, [p["lam"] for p in pts], color="0.6", lw=1)
        ax2.set_ylabel("λ (quantization strength)", color="0.5")
        ax2.set_ylim(0, 1.05)
    return ax


# --------------------------------------------------------------------------------------------
# the toy: one linear layer learns a teacher through a 2-bit fake quantizer


def toy_snap(*, bits: int = 2, group_size: int = 16, steps: int = 400, lr: float = 3e-5,
             out: int = 16, n: int = 64, batch: int = 256, seed: int = 0,
             ste_on: bool = True, lsq: bool = False) -> dict:
    """Train ``W`` (out, n) so that ``x ↦ q(W)x`` matches a fixed teacher ``W*``: with the STE
    (``ste_on``) the gradient passes the rounding; without it (a plain ``round``) it is zero and
    nothing moves; ``lsq`` learns each group's step too (LSQ, symmetric grid).  Returns the loss
    per step, the fraction of codes that changed since the last step, the mean range (max − min)
    of the groups' latent weights, and the loss of PTQ (min-max rounding of ``W*`` itself)."""
    from edgellm.qat.fake import quantize_weight, ste
    from edgellm.qat.lsq import init_step, lsq_codes, lsq_quantize
    from edgellm.quant.rtn import quantize

    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(out, n, generator=g) / math.sqrt(n)
    # inputs with a few strong channels, as a transformer's are (lesson 04): rounding errors
    # on those columns cost much more, which PTQ's rounding ignores and training sees
    x = torch.randn(batch, n, generator=g) * torch.logspace(0, 1, n)[torch.randperm(n, generator=g)]
    y = x @ teacher.T
    w = teacher.clone().requires_grad_(True)
    step = init_step(teacher, bits, group_size).requires_grad_(True)
    opt = torch.optim.Adam([w, step] if lsq else [w], lr=lr)

    def fq(t):
        return quantize_weight(t.detach(), grid="minmax", bits=bits, group_size=group_size)

    def codes(t):
        if lsq:
            return lsq_codes(t.detach(), step.detach(), bits)
        return quantize(t.detach(), bits, group_size, sym=False).codes

    def spread(t):
        g = t.detach().reshape(out, -1, group_size)
        return (g.amax(-1) - g.amin(-1)).mean().item()

    ptq = ((x @ fq(teacher).T - y) ** 2).mean().item()
    losses, changed, ranges, prev = [], [], [], codes(w)
    for i in range(steps):
        for grp in opt.param_groups:  # cosine decay: the oscillation around the grid dies down
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        if lsq:
            wq = lsq_quantize(w, step, bits)
        else:
            wq = ste(w, fq(w)) if ste_on else fq(w) + 0 * w  # no STE: zero gradient
        loss = ((x @ wq.T - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        now = codes(w)
        changed.append((now != prev).float().mean().item())
        prev = now
        losses.append(loss.item())
        ranges.append(spread(w))
    return {"losses": losses, "changed": changed, "ranges": ranges, "ptq_loss": ptq,
            "final_loss": losses[-1], "best_loss": min(losses)}


def torch_q4_0_codes(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_0 codes (−8 … 7) of ``w`` (out, in) through PyTorch's own QAT operator
    ``torch.fake_quantize_per_channel_affine`` (each group of 32 a "channel", zero point 0, the
    group's fp32 scale ``d = signed max / −8``, as ggml computes the codes before storing ``d``
    in fp16): the production op, whose backward is the clipped straight-through estimator."""
    out, n = w.shape
    groups = w.detach().float().reshape(-1, 32)
    idx = groups.abs().argmax(-1, keepdim=True)
    d = groups.gather(-1, idx).squeeze(-1) / -8  # signed: the extreme value lands on code −8
    # PyTorch wants positive scales: flip each group whose d < 0, quantize with |d|, flip back
    sign = torch.where(d < 0, -1.0, 1.0).unsqueeze(-1)
    safe = torch.where(d == 0, torch.ones_like(d), d.abs())
    zp = torch.zeros(len(d), dtype=torch.int32)
    fq = torch.fake_quantize_per_channel_affine(groups * sign, safe, zp, 0, -8, 7) * sign
    return (fq / torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)).round() \
        .reshape(out, n).to(torch.int8)


# --------------------------------------------------------------------------------------------
# the widget: the Pareto plot with the budget's limits on sliders


def within(rows: list[dict], *, max_mib: float, max_ppl_ratio: float,
           min_tokens_per_s: float = 0.0) -> list[dict]:
    """The rows whose size, perplexity ratio and (when asked, measured) decode speed fit."""
    return [r for r in rows if r["size_bytes"] <= max_mib * 2**20
            and r["ppl_ratio"] <= max_ppl_ratio
            and (min_tokens_per_s <= 0 or (r["decode_tokens_per_s"] or 0) >= min_tokens_per_s)]


def pareto_widget(rows: list[dict] | None = None):
    """Sliders for a device's size (MiB), perplexity ratio and decode speed over
    :func:`edgellm.lessons.capstone.plot_pareto`: how many recorded results fit, and the
    smallest that does."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    from edgellm.lessons import capstone as C

    rows = C.pareto_rows() if rows is None else rows
    out = W.Output()
    size = W.FloatLogSlider(value=64, base=2, min=4, max=10, step=0.25, description="≤ MiB")
    ratio = W.FloatSlider(value=1.6, min=1.0, max=4.0, step=0.05, description="PPL ≤ ×")
    speed = W.FloatSlider(value=0, min=0, max=300, step=10, description="tok/s ≥")

    def draw(*_):
        fit = within(rows, max_mib=size.value, max_ppl_ratio=ratio.value,
                     min_tokens_per_s=speed.value)
        with out:
            out.clear_output(wait=True)
            fig = C.plot_pareto(rows)
            ax = fig.axes[0]
            ax.axvline(size.value * 2**20, color="k", lw=2)
            ax.axhline(ratio.value, color="k", lw=2)
            display(fig)
            plt.close(fig)
            best = min(fit, key=lambda r: r["size_bytes"], default=None)
            print(f"{len(fit)} of {len(rows)} recorded results fit"
                  + (f"; the smallest: {best['size_bytes'] / 2**20:.1f} MiB, PPL "
                     f"{best['ppl_ratio']:.2f}× — {best['label']}" if best else ""))

    for w in (size, ratio, speed):
        w.observe(draw, names="value")
    draw()
    display(W.VBox([W.HBox([size, ratio, speed]), out]))
    return out
