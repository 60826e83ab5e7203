"""``prune_model``: the library entry point of pruning (unstructured, N:M, structured).

``edgellm prune`` (:mod:`edgellm.cli.prune`) parses flags and calls it; the lesson calls it
directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
                progress: bool = False) -> PruneResult:
    """Prune ``model`` in place by name; return a :class:`PruneResult` (achieved sparsity etc.).

    The library entry point behind ``edgellm prune`` (the lesson calls it too).  Without
    ``structured``, ``sparsity`` defaults to 0.5.
    """
    import torch

    from edgellm.prune.masks import PruneError

    if method not in METHODS:
        raise PruneError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if structured is None and sparsity is None and nm is None:
        sparsity = 0.5
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

            stats = apply_wanda(model, ids, sparsity, nm, progress=progress)
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


