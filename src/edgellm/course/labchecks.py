"""Graders of the labs' open (research-tier) tasks: a measured target, any method that reaches it.

A closed exercise is checked against a fixed reference (:func:`edgellm.course.labs.check`); an open
task has many valid answers, so its grader measures the answer instead: the figure the task is
about (an output error, an RMS error, a perplexity), the same figure for the task's baseline, and
the task's constraints (a bit budget, a sparsity pattern, a token budget).  Every grader returns a
:class:`Verdict`; a lab's check cell prints ``verdict.summary()`` and calls ``check`` on
``verdict.constraints_ok`` and ``verdict.target_met`` (as 0/1), so that the perturbation test of
the labs still sees every check fail.

=====  =====================================================  =========================================
lab    task                                                   grader
=====  =====================================================  =========================================
01     sliding-window PPL within 5 % of a long-overlap        :func:`window_task`
       reference at ≤ 2 forward tokens per text token
02     a 4-bit format at ≤ 4.25 bits/weight, RMS error ≥ 10 % :func:`format_task`
       below symmetric INT4 g64
03     3-bit g64 weights of ``mlp.down_proj``, output error   :func:`quant3_task`
       ≥ 20 % below RTN's
04     W8A8 (int8 codes, per-token / per-row scales), output  :func:`w8a8_task`
       error ≤ 1/10 of per-tensor int8's
05     a 16-level data type (one scale per block of 64),      :func:`codebook_task`
       RMS error ≥ 2 % below NF4's
06     a 2:4-sparse ``mlp.down_proj``, output error ≥ 25 %    :func:`sparse24_task`
       below Wanda's 2:4 mask
08     ``mlp.gate_proj`` as two factors with ≤ 60 % of its     :func:`lowrank_task`
       parameters, held-out output error ≥ 20 % below plain
       SVD's at the same budget
09     an adapter (or any trainable subset) of ≤ 300k          :func:`lora_budget_task`
       parameters whose held-out answer loss after 5 AdamW
       steps the grader runs is ≤ 3.5 nats
10     an adapter merged into a 4-bit base, stored in          :func:`merge_budget_task`
       ≤ 4.75 bits/weight, keeping ≥ 75 % of the update
       (error ≤ 0.25 ‖update‖); re-quantizing loses it all
=====  =====================================================  =========================================

The tests in ``tests/test_labs_research.py`` run every grader on two different valid answers (both
pass), on the task's baseline (fails the target) and on an answer that breaks a constraint.

The module is over 400 lines because every lab's grader lives here, one short section per lab, so
that an instructor finds each open task's target and constraints in one file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgellm.errors import EdgeLLMError


class LabTaskError(EdgeLLMError, ValueError):
    """A research task was called with data it cannot grade (wrong shapes, empty tensors)."""


@dataclass
class Verdict:
    """The grade of one answer to an open task: lower ``value`` is better; pass at ``≤ target``."""

    task: str
    value: float             # the measured figure of the answer (e.g. error / baseline's error)
    target: float            # the task's threshold on ``value``
    baseline: float          # the same figure for the baseline (1.0 when ``value`` is a ratio)
    violations: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def constraints_ok(self) -> bool:
        return not self.violations

    @property
    def target_met(self) -> bool:
        return math.isfinite(self.value) and self.value <= self.target

    @property
    def passed(self) -> bool:
        return self.constraints_ok and self.target_met

    def summary(self) -> str:
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in self.details.items())
        broken = "; ".join(self.violations) if self.violations else "none"
        return (f"{self.task}: {_fmt(self.value)} (target ≤ {_fmt(self.target)}, baseline "
                f"{_fmt(self.baseline)}){'; ' + extra if extra else ''}; constraint violations: "
                f"{broken} -> {'PASS' if self.passed else 'not yet'}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _out_error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Mean squared output error ``‖X (W − Ŵ)ᵀ‖² / tokens`` in float64; X (tokens, in)."""
    D = W.double() - W_hat.double()                         # (out, in)
    return (X.double() @ D.T).square().sum().item() / X.shape[0]


def _rms(A: torch.Tensor, B: torch.Tensor) -> float:
    return (A.double() - B.double()).square().mean().sqrt().item()


def _tokens_by_in(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    X = X.reshape(-1, X.shape[-1])
    if X.shape[1] != W.shape[1] or X.shape[0] == 0:
        raise LabTaskError(f"X {tuple(X.shape)} must be (tokens, in) with in = W's "
                           f"{W.shape[1]} input features; pass the layer's inputs")
    return X


def _shape_violation(name: str, t, shape) -> list[str]:
    if not isinstance(t, torch.Tensor):
        return [f"{name} must be a tensor, got {type(t).__name__}"]
    if tuple(t.shape) != tuple(shape):
        return [f"{name} has shape {tuple(t.shape)}, want {tuple(shape)}"]
    if t.is_floating_point() and not torch.isfinite(t).all():
        return [f"{name} holds NaN/Inf"]
    return []


def _integral(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool((t == t.round()).all())


# --------------------------------------------------------------------------------------------
# lab 01: context versus compute


def fed_tokens(n_tokens: int, ctx: int, stride: int) -> int:
    """Tokens fed to the model by the ``sliding`` protocol (sum of the window lengths)."""
    from edgellm.metrics import windows

    return sum(w.end - w.start for w in windows(n_tokens, "sliding", ctx, stride))


def window_reference(model, tokens: torch.Tensor, max_ctx: int) -> float:
    """The task's reference: sliding windows of ``max_ctx`` with stride ``max_ctx // 4``."""
    from edgellm.metrics import perplexity

    return perplexity(model, tokens, "sliding", max_ctx, stride=max(1, max_ctx // 4),
                      progress=False)["ppl"]


def window_task(model, tokens: torch.Tensor, ctx: int, stride: int, *, max_ctx: int,
                budget: float = 2.0, tol: float = 0.05, ref_ppl: float | None = None) -> Verdict:
    """Lab 01: a ``(ctx, stride)`` for the ``sliding`` protocol whose perplexity is within ``tol``
    (relative) of :func:`window_reference`, feeding at most ``budget`` tokens per text token and
    ``ctx ≤ max_ctx``.  ``value`` is ``ppl / ref_ppl − 1``; the baseline is non-overlapping windows
    of ``max_ctx`` (one forward token per text token)."""
    from edgellm.metrics import perplexity

    n = len(tokens)
    ref = window_reference(model, tokens, max_ctx) if ref_ppl is None else ref_ppl
    base = perplexity(model, tokens, "sliding", max_ctx, stride=max_ctx, progress=False)["ppl"]
    violations = []
    if not (isinstance(ctx, int) and isinstance(stride, int)):
        return Verdict("PPL excess over the reference", math.inf, tol, base / ref - 1,
                       [f"ctx and stride must be ints, got {ctx!r}, {stride!r}"])
    if not 2 <= ctx <= max_ctx:
        violations.append(f"ctx={ctx} outside 2…{max_ctx}")
    if not 1 <= stride <= ctx:
        violations.append(f"stride={stride} outside 1…ctx")
        return Verdict("PPL excess over the reference", math.inf, tol, base / ref - 1, violations)
    fed = fed_tokens(n, ctx, stride)
    if fed > budget * n:
        violations.append(f"{fed} tokens fed = {fed / n:.2f} per text token > budget {budget:g}")
    ppl = perplexity(model, tokens, "sliding", ctx, stride=stride, progress=False)["ppl"]
    return Verdict("PPL excess over the reference", ppl / ref - 1, tol, base / ref - 1, violations,
                   {"ppl": ppl, "ref_ppl": ref, "fed_per_token": fed / n})


# --------------------------------------------------------------------------------------------
# lab 02: a 4-bit format under a bit budget


def side_bits(side) -> int:
    """Storage bits of the side information: every tensor of a tensor / list / tuple / dict."""
    if isinstance(side, torch.Tensor):
        return side.numel() * side.element_size() * 8
    if isinstance(side, dict):
        side = list(side.values())
    if isinstance(side, list | tuple):
        return sum(side_bits(s) for s in side)
    raise LabTaskError(f"side information must be tensors (or lists / dicts of them), got "
                       f"{type(side).__name__}; store numbers as tensors so that their bits count")


def format_task(W: torch.Tensor, codes: torch.Tensor, side, decode: Callable, *, bits: int = 4,
                max_bpw: float = 4.25, gain: float = 0.10) -> Verdict:
    """Lab 02: ``bits``-bit codes (one per weight, at most ``2**bits`` values) plus side tensors
    (scales, offsets, tables; counted at their dtype's size) within ``max_bpw`` bits per weight;
    ``decode(codes, side)`` must give back ``Ŵ`` with RMS error at least ``gain`` below symmetric
    absmax INT4 in groups of 64 with fp16 scales (4.25 bpw).  ``value`` = RMS / baseline's RMS."""
    from edgellm.quant.rtn import fake_quantize

    base = _rms(W, fake_quantize(W, bits=4, group_size=64, sym=True))
    violations = _shape_violation("codes", codes, W.shape)
    if not violations:
        if not _integral(codes):
            violations.append("codes are not integers")
        elif codes.max().item() - codes.min().item() >= 2 ** bits:
            violations.append(f"codes span {codes.max().item() - codes.min().item() + 1:.0f} "
                              f"values; {bits} bits hold {2 ** bits}")
    try:
        bpw = bits + side_bits(side) / W.numel()
    except LabTaskError as e:
        return Verdict("RMS error / INT4 g64's", math.inf, 1 - gain, 1.0, violations + [str(e)])
    if bpw > max_bpw + 1e-12:
        violations.append(f"{bpw:.4f} bits per weight > {max_bpw}")
    try:
        W_hat = decode(codes, side)
    except Exception as e:                    # a student's decoder: report it, do not crash the check
        return Verdict("RMS error / INT4 g64's", math.inf, 1 - gain, 1.0,
                       violations + [f"decode(codes, side) raised {type(e).__name__}: {e}"])
    bad = _shape_violation("decode(codes, side)", W_hat, W.shape)
    if bad:
        return Verdict("RMS error / INT4 g64's", math.inf, 1 - gain, 1.0, violations + bad)
    return Verdict("RMS error / INT4 g64's", _rms(W, W_hat) / base, 1 - gain, 1.0, violations,
                   {"bpw": bpw})


# --------------------------------------------------------------------------------------------
# lab 03: 3-bit weights that beat RTN on the layer's output


def max_distinct_per_group(W_hat: torch.Tensor, group_size: int) -> int:
    """The largest number of distinct float32 values in one group of ``group_size`` consecutive
    inputs of a row of ``W_hat`` (out, in)."""
    out, n = W_hat.shape
    g = W_hat.float().reshape(out * n // group_size, group_size).sort(-1).values
    distinct = 1 + (g[:, 1:] != g[:, :-1]).sum(-1)          # (groups,)
    return int(distinct.max().item())


def quant3_task(W: torch.Tensor, X: torch.Tensor, W_hat: torch.Tensor, *, bits: int = 3,
                group_size: int = 64, gain: float = 0.20) -> Verdict:
    """Lab 03: ``Ŵ`` with at most ``2**bits`` distinct values in each group of ``group_size``
    consecutive inputs of a row (any codebook, any scales), whose output error on ``X``
    (tokens, in) is at least ``gain`` below asymmetric min/max RTN's (fp16 scale and offset).
    ``value`` = output error / RTN's."""
    from edgellm.quant.rtn import fake_quantize

    X = _tokens_by_in(X, W)
    base = _out_error(X, W, fake_quantize(W, bits=bits, group_size=group_size))
    violations = _shape_violation("W_hat", W_hat, W.shape)
    if violations:
        return Verdict("output error / RTN's", math.inf, 1 - gain, 1.0, violations)
    k = max_distinct_per_group(W_hat, group_size)
    if k > 2 ** bits:
        violations.append(f"a group of {group_size} holds {k} distinct values; {bits} bits "
                          f"hold {2 ** bits}")
    return Verdict("output error / RTN's", _out_error(X, W, W_hat) / base, 1 - gain, 1.0,
                   violations, {"max_distinct_per_group": k})


# --------------------------------------------------------------------------------------------
# lab 04: W8A8 on a layer with outliers


def _scale_violation(name: str, s, n_rows: int, rows: str) -> list[str]:
    if not isinstance(s, torch.Tensor):
        s = torch.as_tensor(s, dtype=torch.float64)
    if s.numel() not in (1, n_rows):
        return [f"{name} has {s.numel()} values; use one (per tensor) or {n_rows} (one per {rows})"]
    if not torch.isfinite(s).all() or (s <= 0).any():
        return [f"{name} must be finite and positive"]
    return []


def w8a8_task(X: torch.Tensor, W: torch.Tensor, X_codes: torch.Tensor, x_scale, W_codes: torch.Tensor,
              w_scale, *, factor: float = 10.0) -> Verdict:
    """Lab 04: int8 codes for the activations ``X`` (tokens, in) and the weight ``W`` (out, in)
    with one scale per tensor or per row (token / output channel) — an int8 GEMM with a rescale —
    whose output ``(X_codes·x_scale)(W_codes·w_scale)ᵀ`` has a squared error at most ``1/factor``
    of per-tensor absmax int8's.  Smoothing or rotating first is allowed (fold it into the codes).
    ``value`` = output error / per-tensor int8's."""
    X = _tokens_by_in(X, W)
    T, (out, _) = X.shape[0], W.shape
    Xd, Wd = X.double(), W.double()
    Y = Xd @ Wd.T                                           # (T, out)

    def q8(A, s):
        return (A / s).round().clamp(-127, 127) * s

    sx, sw = Xd.abs().max() / 127, Wd.abs().max() / 127
    base = (q8(Xd, sx) @ q8(Wd, sw).T - Y).square().mean().item()
    violations = (_shape_violation("X_codes", X_codes, X.shape)
                  + _shape_violation("W_codes", W_codes, W.shape))
    violations += _scale_violation("x_scale", x_scale, T, "token")
    violations += _scale_violation("w_scale", w_scale, out, "output row")
    if violations:
        return Verdict("output error / per-tensor int8's", math.inf, 1 / factor, 1.0, violations)
    for name, c in (("X_codes", X_codes), ("W_codes", W_codes)):
        if not _integral(c) or c.double().abs().max().item() > 128 or c.double().max() > 127:
            violations.append(f"{name} are not int8 (integers in -128…127)")
    xs = torch.as_tensor(x_scale, dtype=torch.float64).reshape(-1, 1)   # (T or 1, 1)
    ws = torch.as_tensor(w_scale, dtype=torch.float64).reshape(-1, 1)   # (out or 1, 1)
    Y_hat = (X_codes.double() * xs) @ (W_codes.double() * ws).T
    value = (Y_hat - Y).square().mean().item() / base
    return Verdict("output error / per-tensor int8's", value, 1 / factor, 1.0, violations)


# --------------------------------------------------------------------------------------------
# lab 05: your own 4-bit data type


def codebook_task(W: torch.Tensor, levels: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                  *, blocksize: int = 64, gain: float = 0.02) -> Verdict:
    """Lab 05: a data type of at most 16 ``levels`` shared by the whole tensor, one fp32 scale per
    block of ``blocksize`` weights (flattened order, as bitsandbytes' NF4) and one code per weight:
    ``Ŵ = levels[codes] · scale`` with RMS error at least ``gain`` below NF4 with absmax scales
    (same bits: 4 + 32/blocksize per weight).  ``value`` = RMS / NF4's."""
    from edgellm.quant.formats import dequantize_nf4, quantize_nf4

    if W.numel() % blocksize:
        raise LabTaskError(f"W has {W.numel()} weights, not a multiple of blocksize={blocksize}")
    n_blocks = W.numel() // blocksize
    base = _rms(W, dequantize_nf4(*quantize_nf4(W, blocksize), shape=W.shape))
    violations = _shape_violation("codes", codes, (W.numel(),))
    violations += _shape_violation("scales", scales, (n_blocks,))
    if not isinstance(levels, torch.Tensor) or levels.dim() != 1:
        violations.append("levels must be a 1-D tensor")
    elif not violations and (not _integral(codes) or codes.min().item() < 0
                             or codes.max().item() >= levels.numel()):
        violations.append(f"codes must be integers in 0…{levels.numel() - 1}")
    if violations:
        return Verdict("RMS error / NF4's", math.inf, 1 - gain, 1.0, violations)
    if levels.numel() > 16:
        violations.append(f"{levels.numel()} levels; 4 bits hold 16")
    W_hat = levels.float()[codes.long()].reshape(n_blocks, blocksize) * scales.float()[:, None]
    return Verdict("RMS error / NF4's", _rms(W, W_hat.reshape(W.shape)) / base, 1 - gain, 1.0,
                   violations)


# --------------------------------------------------------------------------------------------
# lab 06: a 2:4 layer that beats Wanda's


def nm_violations(W_sparse: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """How many groups of ``m`` consecutive inputs keep more than ``n`` non-zero weights."""
    out, k = W_sparse.shape
    nonzero = (W_sparse.reshape(out, k // m, m) != 0).sum(-1)     # (out, in/m)
    return int((nonzero > n).sum().item())


def sparse24_task(W: torch.Tensor, X: torch.Tensor, W_sparse: torch.Tensor, *,
                  gain: float = 0.25) -> Verdict:
    """Lab 06: a 2:4-sparse ``W_sparse`` (in every group of 4 consecutive inputs of a row at most
    2 non-zeros; kept weights may change) whose output error on ``X`` (tokens, in) is at least
    ``gain`` below Wanda's 2:4 mask (kept weights unchanged).  ``value`` = output error / Wanda's."""
    from edgellm.prune import input_norms, nm_mask, wanda_scores

    X = _tokens_by_in(X, W)
    if W.shape[1] % 4:
        raise LabTaskError(f"in_features={W.shape[1]} is not a multiple of 4")
    base = _out_error(X, W, W * nm_mask(wanda_scores(W, input_norms(X)), 2, 4))
    violations = _shape_violation("W_sparse", W_sparse, W.shape)
    if violations:
        return Verdict("output error / Wanda 2:4's", math.inf, 1 - gain, 1.0, violations)
    bad = nm_violations(W_sparse)
    if bad:
        violations.append(f"{bad} groups of 4 keep more than 2 weights")
    return Verdict("output error / Wanda 2:4's", _out_error(X, W, W_sparse) / base, 1 - gain, 1.0,
                   violations, {"sparsity": (W_sparse == 0).float().mean().item()})


# --------------------------------------------------------------------------------------------
# lab 08: a low-rank layer that beats plain SVD where it matters


def lowrank_task(W: torch.Tensor, X_heldout: torch.Tensor, B: torch.Tensor, A: torch.Tensor, *,
                 max_fraction: float = 0.6, gain: float = 0.20) -> Verdict:
    """Lab 08: factors ``B`` (out, r) and ``A`` (r, in) holding at most ``max_fraction`` of
    ``W``'s parameters, whose output error on held-out inputs ``X_heldout`` (tokens, in) is at
    least ``gain`` below plain truncated SVD's at the same parameter budget (rank
    ``⌊max_fraction · out·in / (out + in)⌋``).  ``value`` = held-out error / plain SVD's."""
    from edgellm.lowrank.svd import truncated_svd

    X = _tokens_by_in(X_heldout, W)
    out_f, in_f = W.shape
    r_svd = int(max_fraction * out_f * in_f / (out_f + in_f))
    Bs, As = truncated_svd(W, r_svd)
    base = _out_error(X, W, Bs @ As)
    violations = []
    if not (isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor)) or B.dim() != 2 \
            or A.dim() != 2 or B.shape[0] != out_f or A.shape[1] != in_f \
            or B.shape[1] != A.shape[0]:
        violations.append(f"B must be (out={out_f}, r) and A (r, in={in_f}) with the same r")
        return Verdict("held-out error / plain SVD's", math.inf, 1 - gain, 1.0, violations)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        return Verdict("held-out error / plain SVD's", math.inf, 1 - gain, 1.0,
                       ["B or A holds NaN/Inf"])
    n_par = B.numel() + A.numel()
    if n_par > max_fraction * W.numel():
        violations.append(f"B and A hold {n_par} numbers, {n_par / W.numel():.1%} of W's; the "
                          f"budget is {max_fraction:.0%}")
    W_hat = B.double() @ A.double()
    return Verdict("held-out error / plain SVD's", _out_error(X, W, W_hat) / base, 1 - gain, 1.0,
                   violations, {"params_fraction": n_par / W.numel(), "rank": A.shape[0],
                                "rank_plain_svd": r_svd})


# --------------------------------------------------------------------------------------------
# lab 09: an adapter under a parameter budget


def _param_signature(p: torch.Tensor) -> tuple:
    """A parameter's shape and two float64 sums: equal for an untouched tensor, whatever its
    module is called now (adapters wrap the linears they adapt and rename them)."""
    t = p.detach().double()
    return tuple(p.shape), round(t.sum().item(), 6), round(t.square().sum().item(), 6)


def heldout_answer_loss(model, tokenizer, items, *, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats) over the answer tokens of ``items`` given the training prompt
    (the chat template's default, no instructions), teacher-forced."""
    from edgellm.lora.chat import TRAIN_STYLE, Prompting, answer_nll

    model.eval()
    return answer_nll(model, tokenizer, Prompting.from_style(TRAIN_STYLE), items,
                      batch_size=batch_size)["nll"]


def lora_budget_task(model, tokenizer, task, setup: Callable, *, steps: int = 5,
                     batch_size: int = 4, seq_len: int = 96, n_heldout: int = 16,
                     max_trainable: int = 300_000, target: float = 3.5, seed: int = 0) -> Verdict:
    """Lab 09: ``setup(model) -> (model, lr)`` makes the model trainable your way (adapters of any
    kind, some existing weights unfrozen, ...) with at most ``max_trainable`` parameters that
    require a gradient, and picks the learning rate; the grader then trains them for ``steps``
    AdamW steps (one step of linear warm-up, then linear decay; gradient norm clipped to 1) on
    seeded batches of ``batch_size`` examples of the task's train split, with the loss on the
    answer tokens.  ``value`` is the mean answer loss (nats per token) on the first
    ``n_heldout`` test items afterwards; the baseline is the untrained model's.  Frozen weights
    must stay as they were (an adapter adds, it does not edit the base); ``setup`` must not
    train."""
    from edgellm.lora.chat import TRAIN_STYLE, Prompting, answer_batches, answer_loss
    from edgellm.train import train

    items = task.subset("test", n_heldout)
    if len(items) < n_heldout or not task.split("train"):
        raise LabTaskError(f"task {task.name!r} needs train items and {n_heldout} test items")
    base = heldout_answer_loss(model, tokenizer, items)
    before = sorted(_param_signature(p) for p in model.parameters())
    name = "held-out answer loss (nats)"
    try:
        model, lr = setup(model)
    except Exception as e:                    # a student's setup: report it, do not crash the check
        return Verdict(name, math.inf, target, base,
                       [f"setup(model) raised {type(e).__name__}: {e}; it must return (model, lr)"])
    if not hasattr(model, "parameters") or not isinstance(lr, int | float) or not lr > 0:
        return Verdict(name, math.inf, target, base,
                       [f"setup(model) must return (model, lr > 0), got ({type(model).__name__}, "
                        f"{lr!r})"])
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    violations = []
    if not params:
        return Verdict(name, base, target, base, ["no parameter requires a gradient: nothing trains"])
    if n_trainable > max_trainable:
        violations.append(f"{n_trainable:,} trainable parameters > budget {max_trainable:,}")
        if n_trainable > 10 * max_trainable:      # not worth the training time: no grade
            return Verdict(name, math.inf, target, base, violations,
                           {"trainable_params": n_trainable})
    batches = answer_batches(tokenizer, Prompting.from_style(TRAIN_STYLE), task.split("train"),
                             steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed)
    res = train(model, None, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=float(lr),
                loss_fn=answer_loss, batches=batches, schedule="linear", warmup_steps=1,
                max_grad_norm=1.0, seed=seed)
    pool = before.copy()
    for p in model.parameters():
        if p.requires_grad:
            continue
        sig = _param_signature(p)
        if sig not in pool:
            violations.append(f"a frozen {tuple(p.shape)} weight is not the base model's: "
                              "leave frozen weights as they are (an adapter adds to them)")
            break
        pool.remove(sig)
    loss = heldout_answer_loss(model, tokenizer, items)
    return Verdict(name, loss if math.isfinite(loss) else math.inf, target, base, violations,
                   {"trainable_params": n_trainable, "lr": float(lr),
                    "train_loss_last": res.losses[-1], "steps": steps})


# --------------------------------------------------------------------------------------------
# lab 10: an adapter merged into a 4-bit base, under a bit budget


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def merge_budget_task(target_w: torch.Tensor, delta: torch.Tensor, store: Callable, *,
                      max_bpw: float = 4.75, max_rel_err: float = 0.25) -> Verdict:
    """Lab 10: ``store(target_w) -> (tensors, decode)`` stores the merged weight ``target_w`` (a
    4-bit base's weight plus an adapter's update ``delta``) as a dict of tensors in at most
    ``max_bpw`` bits per weight (the bytes of every tensor in the dict, whatever its dtype), and
    ``decode(tensors)`` rebuilds it.  ``value`` is ‖decode(tensors) − target_w‖ / ‖delta‖: the
    part of the update the storage loses (pass at ≤ ``max_rel_err``); the baseline is NF4
    re-quantization (bitsandbytes, blocks of 64, double quantization).  ``decode`` must read the
    weight from ``tensors``: with every tensor zeroed it must not still give the answer."""
    from edgellm.lessons.qlora import nf4_roundtrip

    if target_w.dim() != 2 or target_w.shape != delta.shape:
        raise LabTaskError(f"target_w {tuple(target_w.shape)} and delta {tuple(delta.shape)} must "
                           "be the same 2-D shape")
    d = delta.double().norm().item()
    if not d > 0:
        raise LabTaskError("delta is zero: there is no update to keep")
    base = (nf4_roundtrip(target_w).double() - target_w.double()).norm().item() / d
    name = "lost part of the update ‖Ŵ − W‖/‖ΔW‖"
    try:
        tensors, decode = store(target_w.clone())
        w_hat = decode(tensors)
    except Exception as e:
        return Verdict(name, math.inf, max_rel_err, base,
                       [f"store / decode raised {type(e).__name__}: {e}"])
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        return Verdict(name, math.inf, max_rel_err, base,
                       ["store must return (dict of tensors, decode)"])
    if not isinstance(w_hat, torch.Tensor) or w_hat.shape != target_w.shape:
        return Verdict(name, math.inf, max_rel_err, base,
                       [f"decode must return a {tuple(target_w.shape)} tensor"])
    bpw = 8 * _tensor_bytes(tensors) / target_w.numel()
    violations = []
    if bpw > max_bpw:
        violations.append(f"{bpw:.3f} bits per weight > budget {max_bpw}")
    err = (w_hat.double() - target_w.double()).norm().item() / d
    try:
        blank = decode({k: torch.zeros_like(t) for k, t in tensors.items()})
        if (blank.double() - target_w.double()).norm().item() / d <= max_rel_err:
            violations.append("decode gives the weight with every stored tensor zeroed: it must "
                              "read the weight from the tensors it is given")
    except Exception:   # a decode that fails on zeros (a division by a zero scale) reads them
        pass
    return Verdict(name, err if math.isfinite(err) else math.inf, max_rel_err, base, violations,
                   {"bpw": bpw})

