"""``factorize_model``: the library entry point of low-rank factorization (``edgellm lowrank``),
and (re-exported from :mod:`edgellm.lowrank.lorc`) ``apply_lorc``, low-rank compensation of
a quantized model.

Every decoder linear (q, k, v, o, gate, up, down; the tied embedding / lm_head is left alone)
is replaced by a :class:`~edgellm.lowrank.layers.LowRankLinear` of its rank, chosen by

- ``ratio``: the fraction of the factorized linears' parameters removed, the same in every
  layer (0.2 keeps 80 %): ``r = ⌊(1 − ratio) · m·n/(m+n)⌋`` for each (m, n) linear;
- ``rank``: one rank for every linear (must be < min(m, n) of each; a warning when it is at or
  above a layer's break-even, where it saves nothing);
- ``ranks``: ``{name: rank}`` per layer, e.g. from :func:`ranks_from_sensitivity`.

``svd`` needs no data.  ``asvd`` and ``svdllm`` read calibration inputs layer by layer
(:func:`edgellm.calib.sequential`): each layer is factorized on the outputs of the already
factorized layers before it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from edgellm.lowrank.factor import factor_pair as _factorize
from edgellm.lowrank.factor import linear_shapes  # noqa: F401 (re-exported)
from edgellm.lowrank.layers import LowRankLinear, replace_module
from edgellm.lowrank.lorc import LoRCResult, apply_lorc, check_lorc_rank  # noqa: F401
from edgellm.lowrank.svd import (
    LowRankError,
    LowRankWarning,
    break_even_rank,
    check_rank,
    check_ratio,
    factor_params,
    rank_for_ratio,
)
from edgellm.metrics import EvalSettings
from edgellm.models import DEFAULT_MODEL

METHODS = ("svd", "asvd", "svdllm")
CALIBRATED = ("asvd", "svdllm")


@dataclass
class LowRankResult:
    """What :func:`factorize_model` did.

    ``ranks``         ``{linear name: rank}`` in model order
    ``energy_kept``   ``{name: fraction of Σσ² kept}`` of the matrix that was truncated
                      (``W``, ``W S`` for ASVD, ``W L`` for SVD-LLM)
    ``n_params_*``    parameters of the whole model / of the factorized linears, before and after
    ``warnings``      ranks at or above their layer's break-even (no savings there)
    """

    method: str
    ranks: dict[str, int]
    energy_kept: dict[str, float]
    n_params_before: int
    n_params_after: int
    n_params_linears_before: int
    n_params_linears_after: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    damps: dict[str, float] = field(default_factory=dict)

    @property
    def ratio_achieved(self) -> float:
        """Fraction of the factorized linears' parameters removed."""
        return 1 - self.n_params_linears_after / max(self.n_params_linears_before, 1)

    def info(self) -> dict:
        """JSON-ready summary (ranks summarised per role: one int, or the sorted distinct ranks)."""
        by_role: dict[str, set] = {}
        for name, r in self.ranks.items():
            by_role.setdefault(name.rsplit(".", 1)[-1], set()).add(r)
        energy = list(self.energy_kept.values())
        return {"method": self.method, "n_factorized": len(self.ranks),
                "ranks_by_role": {k: (min(v) if len(v) == 1 else sorted(v))
                                  for k, v in by_role.items()},
                "n_params_linears": self.n_params_linears_after,
                "n_params_linears_base": self.n_params_linears_before,
                "ratio_achieved": self.ratio_achieved,
                "energy_kept_mean": sum(energy) / len(energy) if energy else None,
                "energy_kept_min": min(energy) if energy else None,
                "max_damp": max(self.damps.values()) if self.damps else None,
                "rank_warnings": self.warnings, "seconds_factorize": self.seconds}


def check_options(method: str = "svd", *, ratio: float | None = None, rank: int | None = None,
                  ranks: dict | None = None, alpha: float = 0.5) -> None:
    """Reject a bad method or target before any work (raises :class:`LowRankError`)."""
    if method not in METHODS:
        raise LowRankError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    given = [k for k, v in (("ratio", ratio), ("rank", rank), ("ranks", ranks)) if v is not None]
    if len(given) != 1:
        raise LowRankError("give exactly one of ratio (fraction of parameters removed, e.g. 0.2), "
                           f"rank (e.g. 64) or ranks (per layer); got {given or 'none'}")
    if ratio is not None:
        check_ratio(ratio)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LowRankError(f"rank={rank!r} must be a positive integer (e.g. 64)")
    if not 0 <= alpha <= 1:
        raise LowRankError(f"alpha={alpha} must lie in [0, 1] (ASVD's default is 0.5)")


def shapes_from_config(config) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of a Llama-style config's decoder linears, without building it
    (lets the CLI check a rank before loading the model)."""
    from edgellm.models import LINEAR_ROLES, layer_prefix

    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    shape = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h),
             "o_proj": (h, heads * hd), "gate_proj": (inter, h), "up_proj": (inter, h),
             "down_proj": (h, inter)}
    return {layer_prefix(i) + path: shape[role] for i in range(config.num_hidden_layers)
            for role, path in LINEAR_ROLES.items()}


def plan_ranks(shapes: dict[str, tuple[int, int]], *, ratio: float | None = None,
               rank: int | None = None, ranks: dict | None = None) -> tuple[dict, list[str]]:
    """``({name: rank}, warnings)`` for the linears of ``shapes``; raises on an impossible rank
    (≥ min(m, n)), warns (returned texts) at or above a layer's break-even."""
    plan, over = {}, {}  # over: (m, n, r) -> roles at or above the break-even
    for name, (m, n) in shapes.items():
        if ratio is not None:
            r = rank_for_ratio(m, n, ratio)
        elif rank is not None:
            r = rank
        else:
            r = ranks.get(name)
            if r is None:
                continue  # not factorized
            r = int(r)
        if check_rank(m, n, r, name):
            over.setdefault((m, n, r), []).append(name.rsplit(".", 1)[-1])
        plan[name] = r
    notes = []  # one text per shape and rank, not one per layer
    for (m, n, r), roles in over.items():
        text = check_rank(m, n, r, ", ".join(dict.fromkeys(roles)))
        notes.append(text.replace(f"({m}×{n})", f"({m}×{n}, {len(roles)} linears)", 1))
    unknown = sorted(set(ranks or {}) - set(shapes))
    if unknown:
        raise LowRankError(f"ranks names {unknown[:3]}, not decoder linears of this model (or "
                           f"outside the layers chosen); names look like "
                           f"{next(iter(shapes), 'model.layers.0.self_attn.q_proj')}")
    return plan, notes


def ranks_from_sensitivity(shapes: dict[str, tuple[int, int]], sensitivity: dict[str, float],
                           ratio: float) -> dict[str, int]:
    """Per-layer ranks removing ``ratio`` of the parameters overall, more to sensitive layers.

    Each layer keeps a fraction ``f = min(1, c · s)`` of its break-even rank (``s`` its
    sensitivity, e.g. the ΔNLL when only it is factorized); ``c`` is found by bisection so that
    the kept parameters total ``(1 − ratio)`` of the linears'.  Layers with ``f = 1`` stay dense.
    """
    check_ratio(ratio)
    names = [n for n in shapes if n in sensitivity]
    if not names:
        raise LowRankError("the sensitivity dict names none of the model's linears")
    P = {n: shapes[n][0] * shapes[n][1] for n in names}
    s = {n: max(float(sensitivity[n]), 1e-12) for n in names}
    target = (1 - ratio) * sum(P.values())

    def kept(c):
        return sum(min(1.0, c * s[n]) * P[n] for n in names)

    lo, hi = 0.0, 1.0
    while kept(hi) < target and hi < 1e12:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
    out = {}
    for n in names:
        f = min(1.0, hi * s[n])
        if f < 1.0:
            out[n] = max(1, int(f * break_even_rank(*shapes[n])))
    return out


@torch.no_grad()
def factorize_model(model, calib=None, *, method: str = "svd", ratio: float | None = None,
                    rank: int | None = None, ranks: dict | None = None, alpha: float = 0.5,
                    layers=None, batch_size: int = 8, progress: bool = False) -> LowRankResult:
    """Replace the decoder linears of ``model`` by low-rank factors, in place.

    ``calib`` (n_samples, seq_len) token ids for ``asvd`` / ``svdllm`` (``None`` for ``svd``);
    exactly one of ``ratio``, ``rank``, ``ranks``; ``alpha`` is ASVD's exponent; ``layers``
    (decoder indices) limits the work.  Returns a :class:`LowRankResult`.
    """
    from edgellm.models import layer_linears, n_params

    check_options(method, ratio=ratio, rank=rank, ranks=ranks, alpha=alpha)
    shapes = linear_shapes(model, layers)
    plan, notes = plan_ranks(shapes, ratio=ratio, rank=rank, ranks=ranks)
    for text in notes:
        warnings.warn(text, LowRankWarning, stacklevel=2)
    n_before, t0 = n_params(model), time.perf_counter()
    energy, damps = {}, {}

    def swap(name, lin, B, A):
        bias = None if lin.bias is None else lin.bias.detach()
        replace_module(model, name, LowRankLinear.from_factors(B, A, bias, lin.weight.dtype))

    if method == "svd":
        for name, r in plan.items():
            lin = model.get_submodule(name)
            B, A, energy[name] = _factorize("svd", lin.weight, r)
            swap(name, lin, B, A)
    else:
        from edgellm.calib import check_calibration, sequential
        from edgellm.lowrank.factor import factor_layer

        ids = check_calibration(calib)
        wanted = sorted({int(n.split(".")[2]) for n in plan})

        def factorize_layer(index, layer, stream):
            lins = {n: m for n, m in layer_linears(model, index).items() if n in plan}
            for name, (B, A, energy[name], damp) in factor_layer(
                    method, layer, lins, plan, stream, alpha=alpha).items():
                if damp is not None:
                    damps[name] = damp
                swap(name, lins[name], B, A)

        sequential(model, ids, factorize_layer, layers=wanted, batch_size=batch_size,
                   progress=progress, desc=method.upper())
    lin_before = sum(m * n for name, (m, n) in shapes.items() if name in plan)
    lin_after = sum(factor_params(m, n, plan[name]) for name, (m, n) in shapes.items()
                    if name in plan)
    return LowRankResult(method=method, ranks=plan, energy_kept=energy,
                         n_params_before=n_before, n_params_after=n_params(model),
                         n_params_linears_before=lin_before, n_params_linears_after=lin_after,
                         seconds=time.perf_counter() - t0, warnings=notes, damps=damps)


def bpw_of(result: LowRankResult, factor_bits: int = 16) -> float:
    """Bits per original weight of the factorized linears with the factors stored at
    ``factor_bits`` (fp16: 16 · kept fraction)."""
    return factor_bits * result.n_params_linears_after / max(result.n_params_linears_before, 1)


def factorize_record(model_name: str = DEFAULT_MODEL, *, method: str = "svd",
                     ratio: float | None = None, rank: int | None = None, alpha: float = 0.5,
                     calib: str = "pydoc", n_samples: int = 32, seq_len: int = 512,
                     seed: int = 0, evaluate: bool = False,
                     eval_settings: EvalSettings | None = None, out: str | None = None,
                     allocate: str = "uniform", spread: float = 0.1,
                     sensitivity_tokens: int = 2048, progress: bool = False,
                     device: str | None = None) -> dict:
    """Load ``model_name`` on ``device`` (:func:`edgellm.models.load_model`), factorize its decoder linears (:func:`factorize_model`), measure
    parameters, size and the paired prefill speed against the unfactorized model, with
    ``evaluate`` its quality against it, and save to ``out``: the record ``edgellm lowrank``
    prints.  Break-even warnings are printed once on stderr and kept in ``rank_warnings``.
    ``allocate="sensitivity"`` (with ``ratio``) scans each layer's ΔNLL on
    ``sensitivity_tokens`` of the calibration corpus's validation split and spreads the ratio
    by ±``spread`` (:mod:`edgellm.lowrank.sensitivity`) at the same total budget."""
    import copy
    import os
    import sys

    from edgellm.data import get_calibration, get_tokens
    from edgellm.lowrank.svd import LowRankWarning
    from edgellm.measure import merge, paired_prefill, peak_rss_bytes
    from edgellm.metrics import evaluate_paired
    from edgellm.models import load_model, n_params, param_bytes_by_dtype
    from edgellm.records import record

    ev = eval_settings or EvalSettings()
    model, tok = load_model(model_name, quiet=not progress, device=device)
    reference = copy.deepcopy(model)
    ids = None
    if method != "svd":
        ids = get_calibration(calib, n_samples, seq_len, seed, tokenizer=tok)
    extra, ranks = {}, None
    if allocate == "sensitivity":
        from edgellm.lowrank.sensitivity import (
            budget,
            layer_sensitivity,
            ranks_for_layer_ratios,
            spread_ratios,
        )

        held = get_tokens(calib, tok, "validation", sensitivity_tokens)
        t0 = time.perf_counter()
        sens = layer_sensitivity(model, ids, held, method=method, ratio=ratio, alpha=alpha,
                                 ctx=min(ev.ctx, len(held)), progress=progress)
        layer_ratios = spread_ratios(sens, ratio, spread)
        ranks = ranks_for_layer_ratios(linear_shapes(model), layer_ratios)
        extra = {"sensitivity": {str(i): v for i, v in sens.items()},
                 "layer_ratios": {str(i): v for i, v in layer_ratios.items()},
                 "spread": spread, "sensitivity_data": f"{calib} validation",
                 "sensitivity_tokens": len(held), "seconds_sensitivity": time.perf_counter() - t0,
                 "ratio_planned": budget(linear_shapes(model), ranks)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LowRankWarning)
        res = factorize_model(model, ids, method=method, ratio=None if ranks else ratio,
                              rank=rank, ranks=ranks, alpha=alpha, progress=progress)
    for w in caught:  # the break-even warnings, once each, on stderr (the record keeps them)
        print(f"edgellm lowrank: warning: {w.message}", file=sys.stderr)
    rec = {**res.info(), **extra, "ratio": ratio, "rank": rank, "allocate": allocate,
           "alpha": alpha if method == "asvd" else None,
           "n_params": n_params(model), "n_params_base": n_params(reference),
           "bpw": bpw_of(res), "bpw_base": 16.0,
           "size_bytes": sum(param_bytes_by_dtype(model).values()),
           "size_bytes_base": sum(param_bytes_by_dtype(reference).values())}
    if ids is not None:
        rec.update(calib=calib, n_samples=n_samples, seq_len=seq_len)
    merge(rec, paired_prefill(model, reference, get_tokens(ev.data, tok, ev.split, 1024)))
    rec.update(ppl=None, ppl_base=None, kl_mean=None)
    if evaluate:
        merge(rec, evaluate_paired(model, reference, tok, progress=progress, **ev.kwargs()))
    if out:
        from edgellm.lowrank.layers import WEIGHTS, save_factorized

        folder = save_factorized(model, out, tok, meta={
            "method": method, "ratio": ratio, "rank": rank, "model": model_name})
        rec.update(out=str(out), file_bytes=os.path.getsize(folder / WEIGHTS))
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=seed, model=model_name)
