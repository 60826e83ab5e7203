"""Views for lesson 07 (knowledge distillation): the KL-direction toy, the teacher-cost table, the
recorded loss comparison, generations side by side and the draft model.

The toy is pure and small: a 1-D mixture of two Gaussians ``p`` on a grid, a single Gaussian
``q`` fitted to it by gradient descent under any objective (:func:`fit_gaussian`), and the
numbers that tell mode covering from mode seeking (:func:`fit_stats`).  :func:`toy_widget` only
wires them to sliders.  The table helpers turn recorded ``edgellm distill`` records
(``results/07_*.json``) into rows; they read keys with ``.get`` so a record without an optional
key shows a dash instead of failing.

Over 400 lines because it is the one home of the lesson's views (the toy and its lab grader, the
teacher's cost, the recorded tables, the KD step timer); each part is small and tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from edgellm.lessons.common import LessonError, format_bytes, new_figure

# --------------------------------------------------------------------------------------------
# the toy: one Gaussian fitted to a mixture of two


def toy_grid(lo: float = -10.0, hi: float = 10.0, n: int = 801) -> torch.Tensor:
    """Points ``x`` (n,) float64 on which the toy densities live (a discrete distribution)."""
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def gaussian(x: torch.Tensor, mu, sigma) -> torch.Tensor:
    """``N(mu, sigma²)`` on the grid, normalised to sum to 1 (n,); differentiable in mu, sigma."""
    q = torch.exp(-0.5 * ((x - mu) / sigma) ** 2)  # (n,)
    return q / q.sum()


def mixture(x: torch.Tensor, *, sep: float = 6.0, weight: float = 0.7,
            sigma: float = 1.0) -> torch.Tensor:
    """``weight·N(−sep/2, σ²) + (1 − weight)·N(+sep/2, σ²)`` on the grid (n,), summing to 1.
    The major mode sits at ``−sep/2`` when ``weight ≥ 0.5``."""
    if not 0.0 < weight < 1.0:
        raise LessonError(f"weight={weight}: the first component's weight must be in (0, 1)")
    if sep < 0 or sigma <= 0:
        raise LessonError(f"sep={sep} must be ≥ 0 and sigma={sigma} > 0")
    p = weight * gaussian(x, -sep / 2, sigma) + (1 - weight) * gaussian(x, sep / 2, sigma)
    return p / p.sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ p log(p/q)`` of two distributions on the same grid (0·log 0 = 0)."""
    return (torch.xlogy(p, p) - p * torch.log(q.clamp_min(1e-300))).sum()


def forward_objective(p, q):
    """Forward KL ``KL(p ‖ q)``: the teacher's mass must be covered (mean-seeking)."""
    return kl(p, q)


def reverse_objective(p, q):
    """Reverse KL ``KL(q ‖ p)``: the student's mass must sit where the teacher has mass."""
    return kl(q, p)


OBJECTIVES = {"forward": forward_objective, "reverse": reverse_objective}


@dataclass
class GaussFit:
    """A single Gaussian fitted on the grid: ``mu``, ``sigma``, its density ``q`` (n,) and the
    objective after each step."""
    mu: float
    sigma: float
    q: torch.Tensor
    losses: list[float] = field(default_factory=list)


def fit_gaussian(p: torch.Tensor, x: torch.Tensor, objective="forward", *, mu0: float = 0.5,
                 sigma0: float = 1.0, steps: int = 400, lr: float = 0.05) -> GaussFit:
    """Fit ``q = N(mu, sigma²)`` to ``p`` on the grid ``x`` by Adam on ``(mu, log sigma)``.

    ``objective`` is ``"forward"``, ``"reverse"`` or any ``f(p, q) -> 0-d tensor`` to minimise
    (differentiable in ``q``).  The start ``mu0`` is off-centre on purpose: a symmetric start is
    a saddle point of reverse KL.  Float64, a few hundred steps: well under a second.
    """
    f = OBJECTIVES.get(objective) if isinstance(objective, str) else objective
    if f is None:
        raise LessonError(f"objective={objective!r}: use 'forward', 'reverse' or a function "
                          "f(p, q) returning a 0-d tensor")
    mu = torch.tensor(float(mu0), dtype=torch.float64, requires_grad=True)
    log_s = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu, log_s], lr=lr)
    losses = []
    for _ in range(steps):
        loss = f(p, gaussian(x, mu, log_s.exp()))
        if loss.dim() != 0 or not torch.isfinite(loss):
            raise LessonError(f"the objective returned {loss!r}; return a finite 0-d tensor "
                              "(clamp q before taking its log)")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        q = gaussian(x, mu, log_s.exp())
    return GaussFit(mu.item(), log_s.exp().item(), q, losses)


def fit_stats(fit: GaussFit, p: torch.Tensor, x: torch.Tensor, *, sep: float = 6.0,
              weight: float = 0.7, width: float = 1.5) -> dict:
    """How a fit treats the two modes: ``mode_error`` (distance of its peak ``mu`` from the
    major mode), ``mass_major`` / ``mass_minor`` (its mass within ±``width`` of each mode),
    ``forward_kl`` = KL(p‖q) (coverage) and ``reverse_kl`` = KL(q‖p) (mass where p has none)."""
    major, minor = (-sep / 2, sep / 2) if weight >= 0.5 else (sep / 2, -sep / 2)
    q = fit.q

    def near(c):
        return q[(x - c).abs() <= width].sum().item()

    return {"mu": fit.mu, "sigma": fit.sigma, "mode_error": abs(fit.mu - major),
            "mass_major": near(major), "mass_minor": near(minor),
            "forward_kl": kl(p, q).item(), "reverse_kl": kl(q, p).item()}


# the research exercise of the lab: a fit that keeps the major mode's peak *and* covers the
# teacher, without spreading mass where the teacher has none
RESEARCH_TARGET = {"sep": 6.0, "weight": 0.7, "max_mode_error": 1.0, "max_forward_kl": 1.2,
                   "max_reverse_kl": 0.9}


def research_check(objective, *, target: dict | None = None) -> dict:
    """Fit the lab's toy (``RESEARCH_TARGET``) with ``objective`` and say which conditions
    hold: ``peak`` (mode error ≤ max), ``covers`` (forward KL ≤ max), ``no_spread`` (reverse KL
    ≤ max), ``passed`` (all three), with the fit's :func:`fit_stats`."""
    t = {**RESEARCH_TARGET, **(target or {})}
    x = toy_grid()
    p = mixture(x, sep=t["sep"], weight=t["weight"])
    s = fit_stats(fit_gaussian(p, x, objective), p, x, sep=t["sep"], weight=t["weight"])
    out = {"peak": s["mode_error"] <= t["max_mode_error"],
           "covers": s["forward_kl"] <= t["max_forward_kl"],
           "no_spread": s["reverse_kl"] <= t["max_reverse_kl"], **s}
    out["passed"] = out["peak"] and out["covers"] and out["no_spread"]
    return out


def plot_fits(x: torch.Tensor, p: torch.Tensor, fits: dict, *, ax=None, title: str | None = None):
    """The mixture (shaded) and each fitted Gaussian ``{label: GaussFit}`` as a line."""
    if ax is None:
        _, ax = new_figure((7, 3.2))
    dx = (x[1] - x[0]).item()
    ax.fill_between(x.numpy(), (p / dx).numpy(), color="0.85", label="teacher p (mixture)")
    for label, f in fits.items():
        ax.plot(x.numpy(), (f.q / dx).numpy(), lw=2,
                label=f"{label}: μ = {f.mu:+.2f}, σ = {f.sigma:.2f}")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    return ax


def toy_widget():
    """Sliders for the mixture's separation and first weight; both fits redrawn with numbers."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    x = toy_grid()

    def show(sep=6.0, weight=0.7):
        p = mixture(x, sep=sep, weight=weight)
        fits = {k: fit_gaussian(p, x, k, steps=250, lr=0.08) for k in ("forward", "reverse")}
        ax = plot_fits(x, p, fits, title=f"separation {sep:g}, weights {weight:.2f} / "
                                         f"{1 - weight:.2f}")
        plt.show()
        for k, f in fits.items():
            s = fit_stats(f, p, x, sep=sep, weight=weight)
            print(f"{k:>8} KL: mass near the major mode {s['mass_major']:.2f}, near the minor "
                  f"{s['mass_minor']:.2f}; KL(p‖q) {s['forward_kl']:.3f}, KL(q‖p) "
                  f"{s['reverse_kl']:.3f}")
        del ax

    return widgets.interact(
        show, sep=widgets.FloatSlider(value=6.0, min=0.0, max=10.0, step=0.5,
                                      description="separation"),
        weight=widgets.FloatSlider(value=0.7, min=0.05, max=0.95, step=0.05,
                                   description="weight"))


# --------------------------------------------------------------------------------------------
# what the teacher costs


def teacher_cost_rows(vocab_size: int, ks=(16, 64, 256), *, steps: int = 40,
                      batch_size: int = 4, seq_len: int = 256) -> list[dict]:
    """Bytes per token and for a whole run (``steps × batch_size × seq_len`` tokens) of the full
    fp32 logits and of top-k caches (fp32 log-prob + int32 id each; the tail bucket is implied)."""
    n_tok = steps * batch_size * seq_len
    rows = [{"kept": f"full ({vocab_size:,} logits)", "bytes_per_token": vocab_size * 4}]
    rows += [{"kept": f"top-{k} + tail", "bytes_per_token": k * 8} for k in ks]
    for r in rows:
        r["run_bytes"] = r["bytes_per_token"] * n_tok
        r["run"] = format_bytes(r["run_bytes"])
    return rows


# --------------------------------------------------------------------------------------------
# the recorded comparison of losses


def _num(rec: dict, key: str):
    v = rec.get(key)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def label(rec: dict) -> str:
    """A short name of a distill record: the loss, ``control`` for the uncompressed teacher."""
    if rec.get("student") == "none":
        return f"control ({rec.get('loss', '?')})"
    return str(rec.get("loss", "?"))


def paired_difference(rec: dict, ref: dict) -> dict:
    """ΔNLL of ``rec`` minus ``ref`` (nats per token) with its standard error.

    Exact when ``rec`` carries the paired difference against ``ref``, computed from per-token
    NLLs (``delta_nll_vs_baseline`` ± ``…_stderr`` of a run with ``baseline_loss`` equal to
    ``ref``'s loss, or ``delta_nll_vs_<loss>``); otherwise the
    difference of their paired ΔNLLs against the teacher (the same tokens, so the mean is exact)
    with ``√(se_a² + se_b²)`` as the error, which ignores the correlation of the two models'
    errors and is conservative when they are positively correlated (``exact_se`` False).
    """
    if rec.get("baseline_loss") == ref.get("loss") and rec.get("student") == ref.get("student"):
        keys = ("delta_nll_vs_baseline", "delta_nll_vs_baseline_stderr")
    else:
        keys = (f"delta_nll_vs_{ref.get('loss')}", f"delta_nll_vs_{ref.get('loss')}_stderr")
    if _num(rec, keys[0]) is not None and _num(rec, keys[1]) is not None:
        return {"diff": rec[keys[0]], "se": rec[keys[1]], "exact_se": True}
    a, b = _num(rec, "delta_nll"), _num(ref, "delta_nll")
    if a is None or b is None:
        return {"diff": None, "se": None, "exact_se": False}
    sa, sb = _num(rec, "delta_nll_stderr") or 0.0, _num(ref, "delta_nll_stderr") or 0.0
    return {"diff": a - b, "se": math.hypot(sa, sb), "exact_se": False}


def verdict(diff: float | None, se: float | None, *, k: float = 2.0) -> str:
    """``lower`` / ``higher`` when ``diff`` is more than ``k`` standard errors from 0, else
    ``not resolved``."""
    if diff is None or se is None:
        return "not recorded"
    if diff < -k * se:
        return "lower"
    if diff > k * se:
        return "higher"
    return "not resolved"


LOSS_COLUMNS = (("run", "{:<14}"), ("PPL", "{:>8.3f}"), ("ΔNLL vs teacher", "{:>18}"),
                ("vs CE", "{:>18}"), ("KL", "{:>7.3f}"), ("entropy", "{:>8.3f}"),
                ("params", "{:>8}"), ("tokens", "{:>8}"))


def loss_rows(records: list[dict]) -> list[dict]:
    """One row per recorded run: PPL, paired ΔNLL ± SE against the teacher and against the CE
    run, KL to the teacher, mean entropy of the predictions, parameters and tokens seen."""
    ce = next((r for r in records if r.get("loss") == "ce" and r.get("student") != "none"), None)
    rows = []
    for r in records:
        d_t, se_t = _num(r, "delta_nll"), _num(r, "delta_nll_stderr")
        vs = paired_difference(r, ce) if ce is not None and r is not ce else None
        rows.append({
            "run": label(r), "loss": r.get("loss"), "student": r.get("student"),
            "ppl": _num(r, "ppl"), "ppl_base": _num(r, "ppl_base"),
            "ppl_teacher": _num(r, "ppl_teacher"),
            "delta_nll": d_t, "delta_nll_stderr": se_t,
            "vs_ce": None if vs is None else vs["diff"], "vs_ce_stderr": None if vs is None else vs["se"],
            "vs_ce_exact_se": bool(vs and vs["exact_se"]),
            "kl_mean": _num(r, "kl_mean"), "entropy_mean": _num(r, "entropy_mean"),
            "n_params": _num(r, "n_params"), "tokens_seen": _num(r, "tokens_seen")})
    return rows


def _pm(v, se, width=18):
    if v is None:
        return f"{'—':>{width}}"
    return f"{f'{v:+.3f} ± {se:.3f}' if se is not None else f'{v:+.3f}':>{width}}"


def format_loss_table(rows: list[dict]) -> str:
    """The rows of :func:`loss_rows` as a fixed-width text table."""
    head = (f"{'run':<14}{'PPL':>8}{'ΔNLL vs teacher':>18}{'ΔNLL vs CE':>18}{'KL':>7}"
            f"{'entropy':>9}{'params':>9}{'tokens':>8}")
    lines = [head]
    for r in rows:
        def f(v, spec, width):
            return f"{'—':>{width}}" if v is None else format(v, spec).rjust(width)
        lines.append(f"{r['run']:<14}{f(r['ppl'], '.3f', 8)}"
                     f"{_pm(r['delta_nll'], r['delta_nll_stderr'])}"
                     f"{_pm(r['vs_ce'], r['vs_ce_stderr'])}"
                     f"{f(r['kl_mean'], '.3f', 7)}{f(r['entropy_mean'], '.3f', 9)}"
                     f"{f(None if r['n_params'] is None else r['n_params'] / 1e6, '.1f', 8)}M"
                     f"{f(r['tokens_seen'], 'd', 8)}")
    return "\n".join(lines)


def plot_losses(rows: list[dict], *, ax=None):
    """PPL of each run (bars) with the student before training and the teacher as lines."""
    if ax is None:
        _, ax = new_figure((7, 3))
    rows = [r for r in rows if r["ppl"] is not None]
    ax.bar([r["run"] for r in rows], [r["ppl"] for r in rows], color="tab:blue")
    before = next((r["ppl_base"] for r in rows if r["ppl_base"] and r["student"] != "none"), None)
    teacher = next((r["ppl_teacher"] for r in rows if r["ppl_teacher"]), None)
    if before:
        ax.axhline(before, color="tab:red", ls="--", lw=1, label=f"student before ({before:.2f})")
    if teacher:
        ax.axhline(teacher, color="0.4", ls=":", lw=1, label=f"teacher ({teacher:.2f})")
    ax.set_ylabel("PPL (pydoc test)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    return ax


def samples_side_by_side(columns: dict[str, list[str]], prompts: list[str], *,
                         width: int = 70) -> str:
    """Generations of several models for the same prompts as text blocks:
    ``columns = {"teacher": [...], "student before": [...], ...}``, one list entry per prompt."""
    import textwrap

    out = []
    for i, prompt in enumerate(prompts):
        out.append(f"── prompt {i + 1}: {prompt!r}")
        for name, texts in columns.items():
            text = texts[i] if i < len(texts) and texts[i] is not None else "(not recorded)"
            body = textwrap.fill(" ".join(text.split()), width=width,
                                 initial_indent="    ", subsequent_indent="    ")
            out.append(f"  {name}:\n{body}")
    return "\n".join(out)


def draft_row(rec: dict) -> dict:
    """The draft student's record: layers, parameters, PPL before/after, KL, where it is saved."""
    return {"name": rec.get("saved_as") or rec.get("save_as"),
            "layers": rec.get("n_layers"), "layers_teacher": rec.get("n_layers_teacher"),
            "n_params": _num(rec, "n_params"), "ppl": _num(rec, "ppl"),
            "ppl_base": _num(rec, "ppl_base"), "ppl_teacher": _num(rec, "ppl_teacher"),
            "kl_mean": _num(rec, "kl_mean"), "top1_agreement": _num(rec, "top1_agreement"),
            "steps": rec.get("steps"), "loss": rec.get("loss")}


def recorded(name: str) -> list[dict]:
    """The records of sweep ``results/<name>.json``, or ``[]`` with a note when it is missing
    or not run yet (the lesson then shows its live numbers only)."""
    from edgellm.results import ResultsError, load_records

    try:
        records = load_records(name)
    except ResultsError:
        records = []
    if not records:
        print(f"results/{name}.json is not recorded yet: `edgellm results --run {name}` "
              "records it")
    return records


# --------------------------------------------------------------------------------------------
# the real model: the recorded student, and what one KD step costs


def teacher_and_student(name: str | None = None, *, ratio: float = 0.2, n_samples: int = 8,
                        seq_len: int = 256, seed: int = 0):
    """``(teacher, tok, student, info)``: the default model and the student ``edgellm distill
    --student drop-layers --ratio R`` builds with its default calibration (``n_samples`` ×
    ``seq_len`` pydoc train tokens, ``seed``), so it is the recorded student before training."""
    from edgellm.data import get_calibration
    from edgellm.distill.students import make_student
    from edgellm.models import DEFAULT_MODEL, load_model

    teacher, tok = load_model(name or DEFAULT_MODEL, quiet=True)
    calib = get_calibration("pydoc", n_samples, seq_len, seed, tokenizer=tok)
    student, info = make_student(teacher, "drop-layers", ratio=ratio, calib=calib)
    return teacher, tok, student, info


def time_kd_step(student, teacher, ids: torch.Tensor, *, top_k: int = 0) -> dict:
    """Seconds of one forward-KL step on ``ids`` (B, T): the teacher's forward (``teacher_s``,
    0 with a ``top_k`` cache, whose one-off cost is ``cache_s``) and the student's forward and
    backward (``student_s``).  The gradients are discarded; no weight changes."""
    import time

    from edgellm.distill.losses import forward_kl, topk_forward_kl
    from edgellm.distill.teacher import teacher_topk

    out = {"top_k": top_k, "cache_s": 0.0, "teacher_s": 0.0}
    if top_k:
        t0 = time.perf_counter()
        lp, ix = teacher_topk(teacher, ids, k=top_k)  # (B, T, k) each, computed once
        out["cache_s"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        with torch.no_grad():
            z_t = teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        out["teacher_s"] = time.perf_counter() - t0
    params = [p for p in student.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        t0 = time.perf_counter()
        z_s = student(input_ids=ids, use_cache=False).logits  # (B, T, V)
        loss = topk_forward_kl(z_s, lp, ix) if top_k else forward_kl(z_s, z_t)
        loss.backward()
        out["student_s"] = time.perf_counter() - t0
    finally:
        for p, f in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(f)
    out["step_s"] = out["teacher_s"] + out["student_s"]
    out["loss"] = loss.item()
    return out


def topk_summary(rec: dict) -> str:
    """The recorded top-k trade (``results/07_topk.json``) in a few lines: step times measured
    interleaved in one process, the KD overhead, the top-k speed-up against its ceiling, the
    cache's memory and truncation error; a dash for what the record lacks."""
    def f(key, spec=".2f"):
        v = _num(rec, key)
        return "—" if v is None else format(v, spec)

    batch = rec.get("step_time_batch") or [rec.get("batch_size"), rec.get("seq_len")]
    mib = _num(rec, "teacher_cache_bytes")
    full = _num(rec, "teacher_cache_bytes_full")
    return "\n".join([
        f"recorded, batch {' × '.join(str(b) for b in batch)}, top-{rec.get('top_k')}: teacher "
        f"forward {f('seconds_teacher_forward')} s, student step {f('seconds_student_step')} s, "
        f"live KD step {f('seconds_kd_step')} s, top-k KD step {f('seconds_kd_step_topk')} s",
        f"  KD overhead {f('kd_overhead')} (KD step / (student step + teacher forward)); top-k "
        f"speed-up {f('topk_speedup')}× of a possible {f('topk_speedup_ceiling')}×",
        f"  cache {'—' if mib is None else format_bytes(mib)} for the run (full logits "
        f"{'—' if full is None else format_bytes(full)}); truncation KL "
        f"{f('truncation_kl_mean', '.4f')}, teacher tail mass {f('teacher_tail_mass_mean', '.3f')}; "
        f"fKL first batch full {f('fkl_full_first_batch', '.4f')} vs top-k "
        f"{f('fkl_topk_first_batch', '.4f')}; PPL after training {f('ppl', '.3f')}"])


def kl_direction_task(objective, *, target: dict | None = None):
    """The lab's open task as an :class:`edgellm.course.labchecks.Verdict`: fit the toy with
    ``objective``; ``value`` is the worse of the two targets, each as a fraction of its bound
    (``max(mode_error / max_mode_error, forward_kl / max_forward_kl)``, pass at ≤ 1); the
    constraint is ``reverse_kl ≤ max_reverse_kl``; ``baseline`` is the value of plain forward KL."""
    from edgellm.course.labchecks import Verdict

    t = {**RESEARCH_TARGET, **(target or {})}

    def value(r):
        return max(r["mode_error"] / t["max_mode_error"], r["forward_kl"] / t["max_forward_kl"])

    r = research_check(objective, target=t)
    base = research_check("forward", target=t)
    broken = [] if r["no_spread"] else [
        f"KL(q‖p) = {r['reverse_kl']:.3f} > {t['max_reverse_kl']}: the fit spreads mass where "
        "the teacher has none"]
    return Verdict("toy KL direction", value(r), 1.0, value(base), broken,
                   {k: round(r[k], 4) for k in ("mu", "sigma", "mode_error", "forward_kl",
                                                 "reverse_kl", "mass_minor")})
