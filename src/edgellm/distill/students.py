"""Students: compressed copies of the teacher, built with the pruning and low-rank code.

With one offline model, distillation here *recovers what compression lost* (as Minitron,
Muralidharan et al. 2024, and LLM-Pruner, Ma et al. 2023, do): the teacher is the dense model,
the student a smaller copy of it.

    drop-layers   remove ``ratio`` of the decoder layers, lowest block influence first
                  (ShortGPT, Men et al. 2024), never the first or the last
    channels      remove ``ratio`` of the MLP channels (activation-weighted importance)
    nm            2:4 semi-structured sparsity by Wanda (ratio fixed at 0.5 of the weights)
    lowrank       SVD-LLM factorization removing ``ratio`` of the linears' parameters
    none          an unchanged copy: the control (the teacher fine-tuned the same way)
"""

from __future__ import annotations

import copy

import torch

from edgellm.distill.losses import DistillError
from edgellm.models import decoder_layers, n_params

KINDS = ("drop-layers", "channels", "nm", "lowrank", "none")


def check_ratio(kind: str, ratio: float) -> float:
    """``ratio`` in (0, 1) for a compressing student; ignored (0) for ``none`` and ``nm``."""
    if kind not in KINDS:
        raise DistillError(f"unknown student {kind!r}; use one of {', '.join(KINDS)}")
    if kind in ("none", "nm"):
        return 0.0 if kind == "none" else 0.5
    r = float(ratio)
    if not 0.0 < r < 1.0:
        raise DistillError(f"ratio={ratio} is outside (0, 1): it is the fraction of the "
                           f"{'layers' if kind == 'drop-layers' else 'parameters'} removed")
    return r


def layers_to_drop(block_influence: torch.Tensor, ratio: float) -> list[int]:
    """The ``round(ratio · n)`` layers of lowest block influence, keeping the first and last."""
    n = len(block_influence)
    k = int(round(ratio * n))
    if k < 1 or k > n - 2:
        raise DistillError(f"ratio={ratio} removes {k} of {n} layers; choose a ratio that "
                           f"removes between 1 and {n - 2} (the first and last stay)")
    bi = block_influence.clone().float()
    bi[0] = bi[-1] = float("inf")  # the embedding-facing and the output-facing layers stay
    return sorted(torch.argsort(bi, stable=True)[:k].tolist())


def make_student(teacher, kind: str, *, ratio: float = 0.2, calib=None, progress: bool = False):
    """A compressed deep copy of ``teacher``: ``(student, info)``.

    ``calib`` (n_samples, seq_len) token ids of the train split: block influence, channel
    importance, Wanda's activations, SVD-LLM's whitening.  ``info`` is JSON-ready: ``student``,
    ``ratio``, ``n_params``, ``n_params_teacher`` and what the compression reports (``kept``
    layers for drop-layers).
    """
    r = check_ratio(kind, ratio)
    if kind != "none" and calib is None:
        raise DistillError(f"student {kind!r} needs calibration tokens (calib=(n, seq_len) ids)")
    student = copy.deepcopy(teacher)
    n_layers = len(decoder_layers(teacher))
    info: dict = {"student": kind, "ratio": r}
    if kind == "drop-layers":
        from edgellm.prune.structured import block_influence, drop_layers

        bi = block_influence(student, calib)
        dropped = drop_layers(student, layers_to_drop(bi, r))
        info.update(dropped=dropped["dropped"], kept=dropped["kept"],
                    block_influence=[round(float(b), 6) for b in bi])
    elif kind == "channels":
        from edgellm.prune.structured import prune_channels

        out = prune_channels(student, calib, r)
        info.update({k: v for k, v in out.items() if k not in ("structured", "ratio")})
    elif kind == "nm":
        from edgellm.prune.wanda import apply_wanda

        stats = apply_wanda(student, calib, None, (2, 4), progress=progress)
        info.update(nm="2:4", sparsity=stats["sparsity"])
    elif kind == "lowrank":
        from edgellm.lowrank.apply import factorize_model

        res = factorize_model(student, calib, method="svdllm", ratio=r, progress=progress)
        info.update({k: v for k, v in res.info().items() if k != "rank_warnings"})
    if kind != "drop-layers":
        info["kept"] = list(range(n_layers))
    info.update(n_layers=len(decoder_layers(student)), n_layers_teacher=n_layers,
                n_params=n_params(student), n_params_teacher=n_params(teacher))
    return student.eval(), info


def layer_map(student_info: dict) -> list[int]:
    """Which teacher layer each student layer stands for (its output is matched with that
    teacher layer's output): ``kept[i]`` for a layer-dropped student, ``i`` otherwise."""
    return list(student_info["kept"])
