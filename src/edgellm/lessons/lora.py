"""Lesson 09 (LoRA): adapter sizes from a model's shapes, the training-memory formula, the recorded
recorded runs read with standard errors, generations side by side, and the size widget.

Sizes are counted from the shapes of the targeted linears, without building an adapter: a rank-r
adapter on a linear ``W`` (out, in) holds ``A`` (r, in) and ``B`` (out, r), i.e. ``r·(out + in)``
numbers.  A test checks the count against :func:`edgellm.lora.apply.apply_lora`.
"""

from __future__ import annotations

from edgellm.lessons.common import format_bytes
from edgellm.lora.apply import target_linears
from edgellm.lora.layers import TARGETS

RANKS = (1, 2, 4, 8, 16, 32, 64)


def adapter_params(model, rank: int, targets: str = "all") -> int:
    """Trainable numbers of a rank-``rank`` LoRA on the ``targets`` linears: ``r·Σ(out + in)``."""
    return rank * sum(sum(m.weight.shape) for m in target_linears(model, targets).values())


def base_params(model) -> int:
    """Parameters of the base model, each shared tensor (tied embedding) counted once."""
    return sum(p.numel() for p in model.parameters())


def size_rows(model, ranks=RANKS, targets=tuple(TARGETS)) -> list[dict]:
    """One row per (targets, rank): ``params``, ``bytes_fp32``, ``bytes_fp16`` and ``share`` (the
    adapter's parameters as a fraction of the base model's)."""
    n_base = base_params(model)
    rows = []
    for t in targets:
        for r in ranks:
            n = adapter_params(model, r, t)
            rows.append({"targets": t, "rank": r, "params": n, "bytes_fp32": 4 * n,
                         "bytes_fp16": 2 * n, "share": n / n_base})
    return rows


def format_size_table(rows: list[dict]) -> str:
    """The rows of :func:`size_rows` as a text table, targets across, ranks down."""
    targets = list(dict.fromkeys(r["targets"] for r in rows))
    by = {(r["targets"], r["rank"]): r for r in rows}
    head = f"{'rank':>5}" + "".join(f"{t + ': params':>18}{'fp32':>11}{'of base':>9}" for t in targets)
    lines = [head]
    for rank in dict.fromkeys(r["rank"] for r in rows):
        line = f"{rank:>5}"
        for t in targets:
            r = by[(t, rank)]
            line += f"{r['params']:>18,}{format_bytes(r['bytes_fp32']):>11}{r['share']:>9.2%}"
        lines.append(line)
    return "\n".join(lines)


def training_memory(n_base: int, n_trainable: int, *, weight_bytes: int = 4,
                    trainable_bytes: int = 4) -> dict:
    """Bytes of training state, activations not included: the base weights (frozen, at
    ``weight_bytes`` each), plus for every trainable parameter its value, its gradient and
    AdamW's two moments (each ``trainable_bytes``).  For full fine-tuning pass
    ``n_trainable = n_base`` and ``n_base = 0``."""
    out = {"weights": n_base * weight_bytes + n_trainable * trainable_bytes,
           "gradients": n_trainable * trainable_bytes,
           "adamw_states": 2 * n_trainable * trainable_bytes}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------
# the recorded runs


def se_bound(se1: float, se2: float) -> float:
    """``√(se₁² + se₂²)``: the standard error of a difference of two independent estimates, a
    conservative bound when both are measured on the same items (a paired error is smaller)."""
    return (se1 ** 2 + se2 ** 2) ** 0.5


def reading(diff: float, se: float, *, k: float = 2.0) -> str:
    """``higher`` / ``lower`` when ``diff`` is more than ``k`` standard errors from 0, else
    ``not resolved``."""
    if diff > k * se:
        return "higher"
    if diff < -k * se:
        return "lower"
    return "not resolved"


def run_rows(records: list[dict], *, show_lr: bool = False) -> list[dict]:
    """The base model (best prompt), each LoRA run and the shuffled-label control, one row each:
    ``run``, ``accuracy``, ``se``, ``format_valid``, ``ppl`` (held-out answers, plain prompt),
    ``trainable_params``, ``adapter_bytes``.  ``show_lr``: the learning rate in each name."""
    rows = []
    if records:
        r0 = records[0]
        rows.append({"run": f"base, {r0.get('base_prompt_style', 'best')} prompt",
                     "accuracy": r0["accuracy_base"], "se": r0["accuracy_base_se"],
                     "format_valid": r0["format_valid_base"], "ppl": r0["ppl_base"],
                     "trainable_params": 0, "adapter_bytes": 0, "record": None})
    for r in records:
        method = "rsLoRA" if r["method"] == "lora" and r.get("rslora") else r["method"]
        name = (f"full fine-tune, {r['steps']} steps" if r["method"] == "full" else
                f"{method} r={r['rank']} {r['targets']}, {r['steps']} steps")
        name += f", lr {r['lr']:g}" if show_lr else ""
        rows.append({"run": name + (" (shuffled labels)" if r.get("shuffle_labels") else ""),
                     "accuracy": r["accuracy"], "se": r["accuracy_se"],
                     "format_valid": r["format_valid"], "ppl": r["ppl"],
                     "trainable_params": r["trainable_params"],
                     "adapter_bytes": r["adapter_bytes"], "record": r})
    return rows


def run_kind(rec: dict | None) -> str:
    """``base``, ``shuffled``, ``full`` or the method (``lora``, ``qlora`` …) of a record's row."""
    if rec is None:
        return "base"
    if rec.get("shuffle_labels"):
        return "shuffled"
    return rec["method"]


def compare(rows: list[dict], pairs) -> list[str]:
    """One line per ``(a, b)`` pair of run kinds present in ``rows``: the accuracy difference,
    its bound :func:`se_bound` and the 2-standard-error :func:`reading`."""
    kind = {run_kind(r["record"]): r for r in rows}
    out = []
    for a, b in pairs:
        if a in kind and b in kind:
            diff = kind[a]["accuracy"] - kind[b]["accuracy"]
            se = se_bound(kind[a]["se"], kind[b]["se"])
            out.append(f"{a} − {b}: accuracy {diff:+.1%} ± {se:.1%} -> {reading(diff, se)}; "
                       f"format valid {kind[a]['format_valid']:.0%} vs {kind[b]['format_valid']:.0%}")
    return out


def format_runs(rows: list[dict]) -> str:
    lines = [f"{'run':<44}{'accuracy ± se':>17}{'format ok':>10}{'answer PPL':>11}"
             f"{'trainable':>11}{'adapter':>11}"]
    for r in rows:
        lines.append(f"{r['run']:<44}{r['accuracy']:>9.1%} ± {r['se']:>5.1%}{r['format_valid']:>10.0%}"
                     f"{r['ppl']:>11.2f}{r['trainable_params']:>11,}"
                     f"{format_bytes(r['adapter_bytes']) if r['adapter_bytes'] else '-':>11}")
    return "\n".join(lines)


def side_by_side(columns: dict[str, list[str]], prompts: list[str], answers: list[str], *,
                 width: int = 30) -> str:
    """Prompts, the right answers and each model's output, one block per prompt."""
    out = []
    for i, (q, a) in enumerate(zip(prompts, answers, strict=True)):
        out.append(f"{q.splitlines()[-1][:100]!r}\n  {'answer':<{width}} {a}")
        for name, outs in columns.items():
            text = " ".join(outs[i].split()) if i < len(outs) else "-"
            out.append(f"  {name:<{width}} {text[:70]}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# widget


def size_widget(model, *, weight_bytes: int = 4):
    """Sliders for the rank and the targets: trainable parameters, adapter bytes (fp32) and the
    training-memory formula against full fine-tuning, from ``model``'s shapes."""
    import ipywidgets as widgets

    n_base = base_params(model)

    def show(rank=8, targets="all"):
        n = adapter_params(model, rank, targets)
        lora = training_memory(n_base, n, weight_bytes=weight_bytes)
        full = training_memory(0, n_base)
        print(f"targets {targets} ({', '.join(TARGETS[targets])}), rank {rank}")
        print(f"  trainable parameters {n:,} ({n / n_base:.2%} of the base's {n_base:,})")
        print(f"  adapter file (fp32)  {format_bytes(4 * n)}; the base (fp32) "
              f"{format_bytes(4 * n_base)}: {4 * n_base / (4 * n):,.0f} adapters of this size "
              "fit in the base's bytes")
        print(f"  training memory without activations: base weights {format_bytes(lora['weights'])}"
              f" + gradients {format_bytes(lora['gradients'])} + AdamW "
              f"{format_bytes(lora['adamw_states'])} = {format_bytes(lora['total'])}")
        print(f"  full fine-tuning: weights {format_bytes(full['weights'])} + gradients "
              f"{format_bytes(full['gradients'])} + AdamW {format_bytes(full['adamw_states'])} = "
              f"{format_bytes(full['total'])}  ({full['total'] / lora['total']:.1f}× LoRA's)")

    return widgets.interact(show, rank=widgets.SelectionSlider(options=list(RANKS), value=8,
                                                                description="rank"),
                            targets=widgets.Dropdown(options=list(TARGETS), value="all",
                                                     description="targets"))
