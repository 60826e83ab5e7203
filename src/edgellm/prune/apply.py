"""``prune_model``: the library entry point of pruning (unstructured, N:M, structured).

:func:`prune_record` loads, prunes, measures, recovers and saves: the record ``edgellm prune``
(:mod:`edgellm.cli.prune`, which only parses and checks flags) prints.  The lesson calls
:func:`prune_model` directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgellm.metrics import EvalSettings
from edgellm.models import DEFAULT_MODEL

ALLOCATE = ("uniform", "sensitivity")
METHODS = ("magnitude", "wanda", "sparsegpt")
STRUCTURED = ("heads", "channels", "layers")


@dataclass
class PruneResult:
    """What :func:`prune_model` did.

    ``info``      JSON-ready record: the settings, ``sparsity`` (over the decoder linears),
                  ``sparsity_layers`` ``{name: sparsity}``, ``sparsity_min`` / ``_max``,
                  ``seconds_prune`` and what a structured method reports (kept heads …)
    """

    info: dict

    @property
    def sparsity(self) -> float:
        return self.info["sparsity"]


def prune_model(model, tok=None, *, method: str = "wanda", sparsity: float | None = None,
                nm: tuple[int, int] | None = None, scope: str = "row",
                structured: str | None = None, ratio: float = 0.2, granularity: str = "query",
                calib: str = "pydoc", n_samples: int = 32, seq_len: int = 512, seed: int = 0,
                allocate: str = "uniform", spread: float = 0.1, sensitivity_tokens: int = 2048,
                progress: bool = False) -> PruneResult:
    """Prune ``model`` in place by name; return a :class:`PruneResult` (achieved sparsity etc.).

    The library entry point behind ``edgellm prune`` (the lesson calls it too).  Without
    ``structured``, ``sparsity`` defaults to 0.5.  ``allocate="sensitivity"`` (Wanda,
    unstructured) first scans each layer's ΔNLL on ``sensitivity_tokens`` of the calibration
    corpus's validation split, then gives the layers ``sparsity ± spread`` at the same total
    (:mod:`edgellm.prune.sensitivity`, :func:`edgellm.allocation.spread_ratios`).
    """
    import torch

    from edgellm.prune.masks import PruneError

    if method not in METHODS:
        raise PruneError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if structured is None and sparsity is None and nm is None:
        sparsity = 0.5
    check_allocation(allocate, method=method, sparsity=sparsity, nm=nm, structured=structured,
                     spread=spread, sensitivity_tokens=sensitivity_tokens)
    torch.manual_seed(seed)
    info = {"method": method, "sparsity_target": sparsity,
            "nm": f"{nm[0]}:{nm[1]}" if nm else None, "structured": structured,
            "ratio": ratio if structured else None}
    needs_calib = method != "magnitude" or structured == "layers"
    ids = None
    if needs_calib:
        from edgellm.data import get_calibration

        ids = get_calibration(calib, n_samples, seq_len, seed, tokenizer=tok)
        info.update(calib=calib, n_samples=n_samples, seq_len=seq_len)
    t0 = time.perf_counter()
    if structured:
        from edgellm.prune.structured import apply_structured

        s_ids = ids if (method != "magnitude" or structured == "layers") else None
        sinfo = apply_structured(model, s_ids, kind=structured, ratio=ratio,
                                 granularity=granularity)
        info.update({k: v for k, v in sinfo.items() if k not in ("structured", "ratio")})
    if sparsity is not None or nm is not None:
        from edgellm.prune.layers import check_target, prunable_linears

        check_target(sparsity, nm, prunable_linears(model))  # fail before any work
        if method == "magnitude":
            from edgellm.prune.magnitude import apply_magnitude

            stats = apply_magnitude(model, sparsity=sparsity, nm=nm, scope=scope)
            info["scope"] = scope
        elif method == "wanda":
            from edgellm.prune.wanda import apply_wanda

            layer_sparsity = None
            if allocate == "sensitivity":
                layer_sparsity = _allocate(model, tok, ids, info, calib=calib, sparsity=sparsity,
                                           spread=spread, sensitivity_tokens=sensitivity_tokens,
                                           progress=progress)
            stats = apply_wanda(model, ids, sparsity, nm, layer_sparsity=layer_sparsity,
                                progress=progress)
        else:
            from edgellm.prune.sparsegpt import apply_sparsegpt

            stats = apply_sparsegpt(model, ids, sparsity, nm, progress=progress)
    else:
        from edgellm.prune.layers import sparsity_stats

        stats = sparsity_stats(model)
    info["seconds_prune"] = time.perf_counter() - t0
    per = stats["layers"]
    info.update(sparsity=stats["sparsity"], sparsity_layers=per,
                sparsity_min=min(per.values()), sparsity_max=max(per.values()))
    return PruneResult(info)


def check_allocation(allocate: str = "uniform", *, method: str = "wanda",
                     sparsity: float | None = 0.5, nm=None, structured: str | None = None,
                     spread: float = 0.1, sensitivity_tokens: int = 2048) -> None:
    """``allocate="sensitivity"`` needs Wanda, an unstructured ``sparsity`` and a spread the
    rule accepts (raises :class:`edgellm.prune.masks.PruneError` otherwise)."""
    from edgellm.allocation import AllocationError, spread_ratios
    from edgellm.prune.masks import PruneError

    if allocate not in ALLOCATE:
        raise PruneError(f"allocate={allocate!r}; use one of {', '.join(ALLOCATE)}")
    if allocate == "uniform":
        return
    if sparsity is None and nm is None and structured is None:
        sparsity = 0.5  # prune_model's default
    if method != "wanda" or sparsity is None or nm is not None or structured is not None:
        raise PruneError("--allocate sensitivity spreads an unstructured --sparsity over the "
                         "layers with Wanda: use --method wanda --sparsity S, without --nm or "
                         "--structured")
    try:
        spread_ratios({0: 0.0, 1: 1.0}, sparsity, spread)
    except AllocationError as e:
        raise PruneError(f"--spread {spread}: {e}") from None
    if sensitivity_tokens < 64:
        raise PruneError(f"--sensitivity-tokens {sensitivity_tokens}: give at least 64")


def _allocate(model, tok, ids, info: dict, *, calib: str, sparsity: float, spread: float,
              sensitivity_tokens: int, progress: bool) -> dict[int, float]:
    """The sensitivity scan and the per-layer sparsities; what it measured goes into ``info``."""
    from edgellm.allocation import spread_ratios
    from edgellm.data import get_tokens
    from edgellm.prune.sensitivity import layer_sensitivity

    t0 = time.perf_counter()
    held = get_tokens(calib, tok, "validation", sensitivity_tokens)
    sens = layer_sensitivity(model, ids, held, sparsity=sparsity, progress=progress)
    layer_sparsity = spread_ratios(sens, sparsity, spread)
    info.update(allocate="sensitivity", spread=spread,
                sensitivity={str(i): v for i, v in sens.items()},
                layer_sparsity_target={str(i): v for i, v in layer_sparsity.items()},
                sensitivity_data=f"{calib} validation", sensitivity_tokens=len(held),
                seconds_sensitivity=time.perf_counter() - t0)
    return layer_sparsity


def prune_record(model_name: str = DEFAULT_MODEL, *, sparsity: float | None = None,
                 nm: tuple[int, int] | None = None, structured: str | None = None,
                 calib: str = "pydoc", evaluate: bool = False,
                 eval_settings: EvalSettings | None = None, recover_steps: int = 0,
                 recover_lr: float | None = None, recover_batch: int = 2,
                 recover_seq_len: int = 256, lora: bool = False, control: bool = False,
                 out: str | None = None, seed: int = 0, progress: bool = False,
                 baseline_calib: str | None = None, device: str | None = None,
                 **settings) -> dict:
    """Load ``model_name`` on ``device`` (:func:`edgellm.models.load_model`), prune it
    (``sparsity``, ``nm``, ``structured``, ``calib`` and ``settings``: :func:`prune_model`'s
    keywords), measure
    sizes and the paired prefill speed against the unpruned model, optionally recover with
    ``recover_steps`` of fine-tuning (``control``: the unpruned model fine-tuned the same way)
    and save to ``out``: the record ``edgellm prune`` prints.  With ``evaluate``, quality against
    the unpruned model before and after recovery.  ``baseline_calib`` prunes a second copy the
    same way but calibrated on that corpus and, with ``evaluate``, reports the paired per-token
    ``delta_nll_vs_baseline`` (this mask minus the baseline mask, with its standard error) on
    the evaluation tokens (before any recovery)."""
    import copy
    import os

    from edgellm.data import get_tokens
    from edgellm.measure import merge, paired_prefill, peak_rss_bytes
    from edgellm.metrics import evaluate_paired
    from edgellm.models import load_model, n_params
    from edgellm.prune.accounting import model_bytes, sparse_storage
    from edgellm.prune.layers import prunable_linears
    from edgellm.records import record

    ev = eval_settings or EvalSettings()
    # zeros inside the linears (kept through recovery): any run that is not structured-only,
    # including the default sparsity prune_model applies when neither is given
    unstructured = structured is None or sparsity is not None or nm is not None
    model, tok = load_model(model_name, quiet=not progress, device=device)
    reference = copy.deepcopy(model)
    rec = prune_model(model, tok, sparsity=sparsity, nm=nm, structured=structured, calib=calib,
                      seed=seed, progress=progress, **settings).info
    rec.update(n_params=n_params(model), n_params_base=n_params(reference),
               n_nonzero=sum(int((p != 0).sum()) for p in model.parameters()),
               size_bytes=model_bytes(model), size_bytes_base=model_bytes(reference))
    if unstructured:
        rec.update(sparse_storage(model, nm))
    merge(rec, paired_prefill(model, reference, get_tokens(ev.data, tok, ev.split, 1024)))
    rec["speed_note"] = ("dense fp32 forward: zeros do not speed up a dense matmul; no CPU 2:4 "
                         "kernel in PyTorch")
    rec.update(ppl=None, ppl_base=None, kl_mean=None)

    def paired(candidate) -> dict:
        return evaluate_paired(candidate, reference, tok, progress=progress, **ev.kwargs())

    if evaluate:
        merge(rec, paired(model))
    if baseline_calib is not None:
        twin = copy.deepcopy(reference)
        prune_model(twin, tok, sparsity=sparsity, nm=nm, structured=structured,
                    calib=baseline_calib, seed=seed, **settings)
        rec["baseline_calib"] = baseline_calib
        if evaluate:  # NLL(this mask) − NLL(the baseline mask), per token on the same tokens
            c = evaluate_paired(model, twin, tok, progress=progress, **ev.kwargs())
            rec.update(ppl_baseline=c["ppl_base"], delta_nll_vs_baseline=c["delta_nll"],
                       delta_nll_vs_baseline_stderr=c["delta_nll_stderr"],
                       kl_mean_vs_baseline=c["kl_mean"])
        del twin
    if recover_steps:
        from edgellm.prune.recover import finetune, zero_masks

        train = get_tokens(calib, tok, "train")
        masks = zero_masks(model) if unstructured else None
        kw = dict(steps=recover_steps, batch_size=recover_batch, seq_len=recover_seq_len,
                  lr=recover_lr, lora=lora, seed=seed, progress=progress)
        before = {k: rec[k] for k in ("ppl", "kl_mean") if rec.get(k) is not None}
        ft = finetune(model, train, masks=masks, **kw)
        lins = list(prunable_linears(model).values())
        rec.update({f"{k}_before_recovery": v for k, v in before.items()})
        rec.update(recover_steps=ft.steps, recover_seconds=ft.seconds, recover_lr=ft.lr,
                   recover_lora=lora, recover_loss_first=ft.losses[0],
                   recover_loss_last=ft.losses[-1],
                   sparsity_after_recovery=sum(int((lin.weight == 0).sum()) for lin in lins)
                   / sum(lin.weight.numel() for lin in lins))
        if evaluate:
            merge(rec, paired(model))
        if control:
            twin = copy.deepcopy(reference)
            finetune(twin, train, **kw)
            if evaluate:
                c = paired(twin)
                rec.update(ppl_control=c["ppl"], kl_mean_control=c["kl_mean"])
    if out:
        from edgellm.records import write_folder

        with write_folder(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        rec.update(out=str(out), file_bytes=os.path.getsize(os.path.join(out, "model.safetensors")))
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=seed, model=model_name)
