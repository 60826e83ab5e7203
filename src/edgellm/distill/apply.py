"""``distill``: the library entry point of knowledge distillation, through the one training loop.

    for step in range(steps):                      # edgellm.train.train
        batch = windows[step]                                   # (B, T)
        z_S = student(batch).logits                             # (B, T, V), with gradients
        z_T = teacher(batch).logits  (no_grad)  or the cached top-k of the teacher
        loss = D(z_S, z_T)                                      # fkl, rkl, skew, mixed, hidden
        loss.backward(); AdamW step

Losses (``loss=``): ``ce`` next-token cross-entropy on the data (no teacher); ``fkl`` forward
KL (Hinton et al., 2015); ``rkl`` reverse KL (MiniLLM's token-level form); ``skew`` skew KL
(DistiLLM); ``mixed`` ``α·CE + (1−α)·fKL``; ``hidden`` fKL plus hidden-state matching (each
student layer's output ↔ the teacher layer it stands for, both through their model's final
norm; MSE or cosine); ``seqkd`` cross-entropy on text the teacher generated (Kim & Rush, 2016),
which needs no shared vocabulary.

:func:`distill_record` builds the student, measures it before and after against the teacher
and returns the record ``edgellm distill`` prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from edgellm.devices import model_device
from edgellm.distill.losses import (
    DistillError,
    ce_loss,
    check_temperature,
    forward_kl,
    hidden_loss,
    reverse_kl,
    skew_kl,
    topk_forward_kl,
)
from edgellm.models import DEFAULT_MODEL, decoder_layers
from edgellm.train import TrainResult, train, train_windows

LOSSES = ("ce", "fkl", "rkl", "skew", "mixed", "hidden", "seqkd")
WHITE_BOX = ("fkl", "rkl", "skew", "mixed", "hidden")  # need the teacher's logits
DEFAULT_LR = 1e-4
DEFAULT_SCHEDULE = "cosine"


@dataclass
class DistillResult:
    """What :func:`distill` did.

    ``train``                the loop's :class:`~edgellm.train.TrainResult` (losses, lrs …)
    ``seconds``              wall seconds of the loop (teacher forward included)
    ``seconds_teacher``      of which in the live teacher's forward passes
    ``seconds_teacher_cache`` computing the top-k cache before the loop (0 without it)
    ``cache_bytes``          bytes of the top-k cache (0 without it)
    """

    loss: str
    train: TrainResult
    seconds: float = 0.0
    seconds_teacher: float = 0.0
    seconds_teacher_cache: float = 0.0
    cache_bytes: int = 0
    tokens_seen: int = 0
    extra: dict = field(default_factory=dict)

    def info(self) -> dict:
        steps = max(self.train.steps, 1)
        return {"loss": self.loss, "steps": self.train.steps, "tokens_seen": self.tokens_seen,
                "lr": self.train.lr, "batch_size": self.train.batch_size,
                "seq_len": self.train.seq_len, "trainable_params": self.train.trainable_params,
                "loss_first": self.train.losses[0] if self.train.losses else None,
                "loss_last": self.train.losses[-1] if self.train.losses else None,
                "losses": [round(x, 5) for x in self.train.losses],
                "seconds_train": self.seconds,
                "seconds_per_step": self.seconds / steps,
                "seconds_teacher_per_step": self.seconds_teacher / steps,
                "seconds_student_per_step": (self.seconds - self.seconds_teacher) / steps,
                "seconds_teacher_cache": self.seconds_teacher_cache,
                "teacher_cache_bytes": self.cache_bytes, **self.extra}


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise DistillError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    return loss


class _Capture:
    """Outputs of chosen decoder layers during a forward pass, passed through the final norm."""

    def __init__(self, model, indices):
        self.norm = model.model.norm
        self.out: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model)
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, i):
        def fn(module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # (B, T, C)
            self.out[i] = self.norm(h)
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def distill(student, teacher, tokens: torch.Tensor, *, loss: str = "fkl",
            temperature: float = 1.0, top_k: int = 0, alpha: float = 0.5, steps: int = 40,
            batch_size: int = 4, seq_len: int = 256, lr: float = DEFAULT_LR,
            schedule: str = DEFAULT_SCHEDULE, warmup_steps: int = 0, seed: int = 0,
            hidden_kind: str = "mse", hidden_weight: float = 1.0, layer_pairs=None,
            after_step=None, micro_batch_size: int | None = 1,
            progress: bool = False) -> DistillResult:
    """Train ``student`` in place toward ``teacher`` on windows of ``tokens`` (1-D ids).

    ``loss`` one of :data:`LOSSES` (``seqkd`` is ``ce`` on teacher-generated ``tokens``);
    ``temperature`` softens both distributions (T² factor); ``alpha`` weighs CE in ``mixed``
    and is the skew of ``skew``; ``top_k`` > 0 (``fkl`` only) computes the teacher's top-k
    log-probs of every training window once, before the loop, and trains against them with a
    tail bucket.  ``layer_pairs`` ``[(student layer, teacher layer), …]`` for ``hidden``
    (default: layer i ↔ i).  The decoder weights train, the tied embedding stays frozen (as in
    the pruning recovery).  ``micro_batch_size`` windows go through student and teacher at a
    time, gradients accumulated (the same step in a quarter of the memory at 1 of 4; None:
    the whole batch at once).  ``teacher`` may be None for ``ce`` / ``seqkd``.
    """
    check_loss(loss)
    T = check_temperature(temperature)
    if loss in WHITE_BOX and teacher is None:
        raise DistillError(f"loss {loss!r} compares with the teacher's logits: pass a teacher")
    if top_k and loss != "fkl":
        raise DistillError(f"top_k={top_k} caches the teacher for forward KL only; use "
                           "loss='fkl' or top_k=0")
    if loss in WHITE_BOX:
        vs, vt = student.config.vocab_size, teacher.config.vocab_size
        if vs != vt:
            raise DistillError(f"the student's vocabulary ({vs}) differs from the teacher's "
                               f"({vt}): white-box loss {loss!r} compares logits token by token; "
                               "use loss='seqkd' (text only) for a teacher of another family")
    if not 0.0 <= alpha <= 1.0:
        raise DistillError(f"alpha={alpha} must be in [0, 1]")
    timer = {"teacher": 0.0, "row": 0}
    result = DistillResult(loss=loss, train=TrainResult(steps=0),
                           tokens_seen=steps * batch_size * seq_len)
    cache = None
    if top_k:
        from edgellm.distill.teacher import check_top_k, teacher_topk

        check_top_k(top_k, teacher.config.vocab_size)
        t0 = time.perf_counter()
        # what train() will draw, where the teacher is
        data = train_windows(tokens, steps * batch_size, seq_len, seed).to(model_device(teacher))
        parts = [teacher_topk(teacher, data[i:i + batch_size], k=top_k, temperature=T)
                 for i in range(0, len(data), batch_size)]
        cache = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), data)
        result.seconds_teacher_cache = time.perf_counter() - t0
        result.cache_bytes = cache[0].numel() * 4 + cache[1].numel() * 4

    pairs = list(layer_pairs) if layer_pairs is not None else \
        [(i, i) for i in range(len(decoder_layers(student)))]

    def teacher_logits(batch, capture=None):
        t0 = time.perf_counter()
        with torch.no_grad():
            z = teacher(input_ids=batch, use_cache=False).logits  # (B, T, V)
        timer["teacher"] += time.perf_counter() - t0
        return z

    def loss_fn(model, batch):
        row = timer["row"]  # first training window of this (micro-)batch
        timer["row"] += len(batch)
        if loss in ("ce", "seqkd"):
            return model(input_ids=batch, labels=batch, use_cache=False).loss
        cap_s = cap_t = None
        if loss == "hidden":
            cap_s = _Capture(model, [s for s, _ in pairs])
            cap_t = _Capture(teacher, [t for _, t in pairs])
        try:
            z_s = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            if cache is not None:
                rows = slice(row, row + len(batch))
                if not torch.equal(cache[2][rows], batch):
                    raise DistillError("the top-k cache is out of step with the training windows")
                return topk_forward_kl(z_s, cache[0][rows], cache[1][rows], temperature=T)
            z_t = teacher_logits(batch)
            if loss == "fkl":
                return forward_kl(z_s, z_t, temperature=T)
            if loss == "rkl":
                return reverse_kl(z_s, z_t, temperature=T)
            if loss == "skew":
                return skew_kl(z_s, z_t, alpha=alpha, temperature=T)
            if loss == "mixed":
                return alpha * ce_loss(z_s, batch) + (1 - alpha) * forward_kl(z_s, z_t,
                                                                             temperature=T)
            hs = [cap_s.out[s] for s, _ in pairs]
            ht = [cap_t.out[t].detach() for _, t in pairs]
            return forward_kl(z_s, z_t, temperature=T) + hidden_weight * hidden_loss(
                hs, ht, kind=hidden_kind)
        finally:
            for cap in (cap_s, cap_t):
                if cap is not None:
                    cap.close()

    for name, p in student.named_parameters():
        p.requires_grad_(not ("embed" in name or "lm_head" in name))
    try:
        result.train = train(student, tokens, steps=steps, batch_size=batch_size,
                             seq_len=seq_len, lr=lr, loss_fn=loss_fn, after_step=after_step,
                             schedule=schedule, warmup_steps=warmup_steps, seed=seed,
                             micro_batch_size=micro_batch_size, progress=progress,
                             desc=f"distill {loss}")
    finally:
        for p in student.parameters():
            p.requires_grad_(False)
    result.seconds = result.train.seconds
    result.seconds_teacher = timer["teacher"]
    result.extra["micro_batch_size"] = micro_batch_size
    return result


@torch.no_grad()
def mean_entropy(model, tokens: torch.Tensor, *, ctx: int = 512, batch_size: int = 1) -> float:
    """Mean entropy (nats) of the model's next-token distributions over non-overlapping
    windows of ``tokens`` (every position): low entropy = confident, mode-seeking."""
    from edgellm.distill.losses import entropy

    ids = tokens[: len(tokens) // ctx * ctx].view(-1, ctx).to(model_device(model))  # (n, ctx)
    total, n = 0.0, 0
    for i in range(0, len(ids), batch_size):
        logits = model(input_ids=ids[i:i + batch_size], use_cache=False).logits
        total += entropy(logits).item() * logits.shape[0] * logits.shape[1]
        n += logits.shape[0] * logits.shape[1]
    return total / max(n, 1)


def distill_record(model_name: str = DEFAULT_MODEL, *, student: str = "drop-layers",
                   ratio: float = 0.2, loss: str = "fkl", temperature: float = 1.0,
                   top_k: int = 0, alpha: float = 0.5, steps: int = 40, batch_size: int = 4,
                   seq_len: int = 256, lr: float = DEFAULT_LR, schedule: str = DEFAULT_SCHEDULE,
                   warmup_steps: int = 0, hidden_kind: str = "mse", hidden_weight: float = 1.0,
                   calib: str = "pydoc", n_samples: int = 8, calib_seq_len: int = 256,
                   train_data: str = "pydoc", seqkd: dict | None = None,
                   baseline_loss: str | None = None, time_steps: int = 0,
                   micro_batch_size: int | None = 1,
                   evaluate: bool = False,
                   eval_settings=None, out: str | None = None, save_as: str | None = None,
                   seed: int = 0, progress: bool = False, device: str | None = None) -> dict:
    """Load the teacher ``model_name``, build the ``student`` (``ratio``), distill it with
    ``loss`` and measure it: the record ``edgellm distill`` prints (teacher on ``device``).

    With ``evaluate``: against the teacher on the evaluation split, before (``ppl_base``) and
    after (``ppl``, ``kl_mean``, ``delta_nll`` ± ``delta_nll_stderr`` vs the teacher,
    ``top1_agreement``), the teacher's ``ppl_teacher``, and the mean prediction entropy of
    student and teacher (``entropy_mean``, ``entropy_teacher``).  ``baseline_loss`` trains a
    second copy of the same student with that loss on the same windows and reports the paired
    ``delta_nll_vs_baseline`` (this run minus the baseline, with its standard error).
    ``seqkd`` (for ``loss="seqkd"``): the keywords of :func:`edgellm.distill.seqkd.seqkd_tokens`.
    ``time_steps`` > 0 times one step of each kind on the first training batch
    (:func:`step_times`, that many repeats); with ``top_k`` the record also gets the teacher
    memory per token (full and top-k) and the truncation KL of the top-k cache on that batch.
    ``out`` saves the student (safetensors), ``save_as`` under a derived-model name
    (:func:`edgellm.models.save_derived`).
    """
    from edgellm.data import get_calibration, get_tokens
    from edgellm.distill.students import layer_map, make_student
    from edgellm.distill.teacher import topk_of_logits
    from edgellm.measure import peak_rss_bytes, protocol
    from edgellm.metrics import EvalSettings, evaluate_paired
    from edgellm.models import load_model
    from edgellm.records import record

    check_loss(loss)
    ev = eval_settings or EvalSettings()
    t_start = time.perf_counter()
    teacher, tok = load_model(model_name, quiet=not progress, device=device)
    if top_k:
        from edgellm.distill.teacher import check_top_k

        check_top_k(top_k, teacher.config.vocab_size)  # before the student is built
    ids = None if student == "none" else get_calibration(calib, n_samples, calib_seq_len, seed,
                                                         tokenizer=tok)
    model, info = make_student(teacher, student, ratio=ratio, calib=ids, progress=progress)
    rec = {"model": model_name, **info, "loss": loss, "temperature": temperature,
           "top_k": top_k, "alpha": alpha if loss in ("mixed", "skew") else None,
           "schedule": schedule, "warmup_steps": warmup_steps, "train_data": train_data,
           "hidden_kind": hidden_kind if loss == "hidden" else None,
           "hidden_weight": hidden_weight if loss == "hidden" else None,
           "calib": calib, "n_samples": n_samples, "calib_seq_len": calib_seq_len}
    eval_tokens = get_tokens(ev.data, tok, ev.split, ev.max_tokens) if evaluate else None
    if evaluate:
        before = evaluate_paired(model, teacher, tok, progress=progress, **ev.kwargs())
        rec.update(ppl_base=before["ppl"], kl_mean_base=before["kl_mean"],
                   ppl_teacher=before["ppl_base"])
    if loss == "seqkd":
        from edgellm.distill.seqkd import seqkd_tokens

        tokens, gen_info = seqkd_tokens(tok, **(seqkd or {}), seed=seed, progress=progress)
        rec.update(gen_info)
    else:
        tokens = get_tokens(train_data, tok, "train")
    after_step, masks = None, None
    if student == "nm":
        from edgellm.prune.recover import reapply_masks, zero_masks

        masks = zero_masks(model)

        def after_step(m):
            reapply_masks(m, masks)
    if top_k:
        from edgellm.distill.teacher import bytes_per_token, check_top_k, truncation_kl

        V = teacher.config.vocab_size
        check_top_k(top_k, V)
        first = train_windows(tokens, batch_size, seq_len, seed).to(model_device(teacher))
        with torch.no_grad():
            z_t = teacher(input_ids=first, use_cache=False).logits  # (B, T, V)
            z_s = model(input_ids=first, use_cache=False).logits
            lp, idx = topk_of_logits(z_t, top_k, temperature=temperature)
            full = forward_kl(z_s, z_t, temperature=temperature).item()
            cut = topk_forward_kl(z_s, lp, idx, temperature=temperature).item()
            rec.update(truncation_kl_mean=truncation_kl(z_t, top_k, temperature=temperature)
                       .mean().item(), teacher_tail_mass_mean=(1 - lp.exp().sum(-1)).mean().item(),
                       fkl_full_first_batch=full, fkl_topk_first_batch=cut,
                       teacher_bytes_per_token=bytes_per_token(V),
                       teacher_bytes_per_token_topk=bytes_per_token(V, top_k),
                       teacher_cache_bytes_full=bytes_per_token(V) * steps * batch_size * seq_len)
        del z_t, z_s
    if time_steps:
        from edgellm.distill.teacher import step_times

        rec.update(step_times(model, teacher, train_windows(tokens, batch_size, seq_len,
                                                            seed).to(model_device(teacher)),
                              temperature=temperature, top_k=top_k or 64, lr=lr,
                              repeats=time_steps))
    kw = dict(temperature=temperature, alpha=alpha, steps=steps, batch_size=batch_size,
              seq_len=seq_len, lr=lr, schedule=schedule, warmup_steps=warmup_steps, seed=seed,
              after_step=after_step, micro_batch_size=micro_batch_size, progress=progress)
    pairs = list(enumerate(layer_map(info)))
    res = distill(model, teacher, tokens, loss=loss, top_k=top_k, hidden_kind=hidden_kind,
                  hidden_weight=hidden_weight, layer_pairs=pairs, **kw)
    rec.update(res.info())
    rec["train_tokens_per_s"] = res.tokens_seen / res.seconds if res.seconds else None
    rec["speed_protocol"] = {"train_tokens_per_s": protocol(
        "train", batch=batch_size, seq_len=seq_len, steps=steps,
        teacher="top-k cache" if top_k else ("live" if loss in WHITE_BOX else "none"))}
    rec.update(ppl=None, kl_mean=None)
    if evaluate:
        after = evaluate_paired(model, teacher, tok, progress=progress, **ev.kwargs())
        rec.update({k: after[k] for k in (
            "ppl", "ppl_stderr", "nll", "kl_mean", "kl_stderr", "kl_p99", "delta_nll",
            "delta_nll_stderr", "top1_agreement", "n_tokens", "protocol", "ctx", "data",
            "split", "data_sha256", "max_tokens", "chunks") if k in after})
        rec["delta_nll_reference"] = "teacher"
        rec["entropy_mean"] = mean_entropy(model, eval_tokens, ctx=ev.ctx)
        rec["entropy_teacher"] = mean_entropy(teacher, eval_tokens, ctx=ev.ctx)
    if baseline_loss:
        check_loss(baseline_loss)
        if baseline_loss in ("seqkd",):
            raise DistillError("baseline_loss: use ce, fkl, rkl, skew, mixed or hidden")
        # the same student again (its construction is deterministic), not a copy kept in memory
        baseline, _ = make_student(teacher, student, ratio=ratio, calib=ids)
        b = distill(baseline, teacher, get_tokens(train_data, tok, "train"), loss=baseline_loss,
                    top_k=0, layer_pairs=pairs, **kw)
        rec.update(baseline_loss=baseline_loss, baseline_loss_last=b.info()["loss_last"])
        if evaluate:
            # paired on the same tokens: NLL(this student) − NLL(the baseline student)
            cmp = evaluate_paired(model, baseline, tok, progress=progress, **ev.kwargs())
            rec.update(ppl_baseline=cmp["ppl_base"], delta_nll_vs_baseline=cmp["delta_nll"],
                       delta_nll_vs_baseline_stderr=cmp["delta_nll_stderr"])
        del baseline
    if out or save_as:
        _save(model, tok, rec, out=out, save_as=save_as)
    rec["seconds"] = time.perf_counter() - t_start
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=seed, model=model_name)


def _save(model, tok, rec: dict, *, out=None, save_as=None) -> None:
    import os

    from edgellm.records import write_folder

    if rec["student"] == "lowrank":
        raise DistillError("a low-rank student is not a plain Hugging Face model; save it with "
                           "edgellm lowrank --out instead")
    about = {k: rec[k] for k in ("model", "student", "ratio", "loss", "steps", "lr", "kept")}
    if out:
        with write_folder(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        rec.update(out=str(out),
                   file_bytes=os.path.getsize(os.path.join(out, "model.safetensors")))
    if save_as:
        from edgellm.models import save_derived

        folder = save_derived(save_as, model, tok, **about)
        rec.update(saved_as=save_as, saved_folder_bytes=sum(
            p.stat().st_size for p in folder.iterdir() if p.is_file()))
