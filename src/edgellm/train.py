"""One training loop for every technique that fine-tunes: pruning recovery today, knowledge
distillation, LoRA and quantization-aware training in the lessons to come.

    for step in range(steps):
        batch = windows[step]                      # (B, T) token ids from the train split
        loss = loss_fn(model, batch)               # next-token loss, KD loss, QAT loss …
        loss.backward()
        clip ‖g‖ to max_grad_norm                  # optional
        lr ← schedule(step);  AdamW step           # Loshchilov & Hutter, 2019
        after_step(model)                          # e.g. put pruned weights back to zero

Batches are random windows of a 1-D token stream, reproducible by ``seed``, so two runs (a
pruned model and its dense control) see exactly the same data.  What a technique adds is a
``loss_fn(model, batch) -> loss`` (distillation compares with a teacher; QAT's model holds fake
quantizers) and an ``after_step(model)`` hook (pruning keeps its masks).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgellm.devices import model_device, to_device
from edgellm.errors import EdgeLLMError

SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINT = "trainer.pt"


class TrainError(EdgeLLMError, ValueError):
    """Training settings or data that cannot be used; the message says what to do."""


def train_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows (n, seq_len) of a 1-D token tensor, reproducible by ``seed``."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise TrainError(f"training tokens must be a 1-D token stream, got shape "
                         f"{tuple(tokens.shape)}; flatten them (tokens.reshape(-1))")
    if len(tokens) <= seq_len:
        raise TrainError(f"{len(tokens)} training tokens are too few for seq_len={seq_len}; "
                         "use a shorter seq_len or more text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def lm_loss(model, batch: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``batch`` (B, T) token ids: a 0-d tensor.

    ``mask`` (B, T) bool, when given, says which tokens count as targets (``False``: a prompt,
    padding…); Hugging Face ignores label ``-100``.
    """
    labels = batch if mask is None else batch.masked_fill(~mask.bool(), -100)
    return model(input_ids=batch, labels=labels, use_cache=False).loss


def lr_factor(step: int, steps: int, *, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``steps``: a linear warm-up over
    ``warmup_steps``, then ``constant`` (1), ``linear`` decay to 0 or ``cosine`` decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    done = (step - warmup_steps) / max(1, steps - warmup_steps)  # in [0, 1)
    if schedule == "linear":
        return 1.0 - done
    return 0.5 * (1.0 + math.cos(math.pi * done))


@dataclass
class TrainResult:
    """What :func:`train` did.

    ``losses``      the loss of each step (before its update)
    ``lrs``         the learning rate of each step
    ``grad_norms``  the total gradient norm of each step before clipping (``[]`` unless
                    ``max_grad_norm`` is set)
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    lr: float = 0.0
    batch_size: int = 0
    seq_len: int = 0


def check_settings(*, steps: int, batch_size: int, seq_len: int, lr: float, schedule: str,
                   warmup_steps: int, max_grad_norm: float | None) -> None:
    """Reject bad training settings before any work (raises :class:`TrainError`)."""
    if steps < 0:
        raise TrainError(f"steps={steps} must be >= 0")
    if batch_size < 1 or seq_len < 2:
        raise TrainError(f"batch_size={batch_size} must be >= 1 and seq_len={seq_len} >= 2")
    if not lr > 0:
        raise TrainError(f"lr={lr} must be > 0 (e.g. 2e-5 for full fine-tuning, 2e-4 for LoRA)")
    if schedule not in SCHEDULES:
        raise TrainError(f"schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise TrainError(f"warmup_steps={warmup_steps} must be >= 0")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise TrainError(f"max_grad_norm={max_grad_norm} must be > 0 (or None: no clipping)")


def save_checkpoint(folder, *, step: int, model, optimizer, losses: list[float]) -> Path:
    """Write the trainable weights, the optimizer state and the step to ``folder/trainer.pt``.

    Written to a temporary file in the same folder, then renamed over the old checkpoint, so the
    folder always holds a whole checkpoint, even if the run is killed while saving.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": step, "losses": list(losses), "optimizer": optimizer.state_dict(),
             "model": {n: t.detach().clone() for n, t in model.state_dict().items()
                       if n in trainable}}
    path = folder / CHECKPOINT
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(folder) -> dict:
    """Read :func:`save_checkpoint`'s file: ``{"step", "losses", "optimizer", "model"}``."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}; train with checkpoint_dir={folder!s} first")
    return torch.load(path, weights_only=True)


def train(model, tokens: torch.Tensor, *, steps: int = 20, batch_size: int = 2,
          seq_len: int = 256, lr: float = 2e-5, params=None, loss_fn=None, loss_mask=None,
          after_step=None, weight_decay: float = 0.0, schedule: str = "constant",
          warmup_steps: int = 0, max_grad_norm: float | None = None, seed: int = 0,
          progress: bool = False, desc: str = "train", checkpoint_dir=None,
          checkpoint_every: int = 0, batches=None,
          micro_batch_size: int | None = None) -> TrainResult:
    """Train ``model`` in place for ``steps`` AdamW steps; return a :class:`TrainResult`.

    ``tokens`` 1-D LongTensor (a train split); step ``i`` uses ``batch_size`` random windows of
    ``seq_len`` tokens (:func:`train_windows`, the same for the same ``seed``).
    ``params`` the parameters to train (default: those of ``model`` with ``requires_grad``).
    ``loss_fn(model, batch) -> loss`` (default :func:`lm_loss`); ``loss_mask(batch) -> (B, T)
    bool`` selects the target tokens of the default loss.  ``after_step(model)`` runs after each
    optimizer step.  ``schedule`` (``constant``, ``linear``, ``cosine``) after
    ``warmup_steps`` of linear warm-up; ``max_grad_norm`` clips the total gradient norm.
    ``checkpoint_dir`` receives a checkpoint every ``checkpoint_every`` steps (0: at the end
    only).  ``micro_batch_size`` splits each (B, T) batch into chunks of that many windows,
    each with its own forward and backward, gradients accumulated (``loss_fn`` must return a
    mean over windows): the same step in less memory.  ``batches``, when given, replaces the random windows: step ``i`` passes
    ``batches[i]`` (e.g. a dict of left-padded ``input_ids`` and an answer ``loss_mask``) to
    ``loss_fn``, and ``tokens`` may be None.  The model is left in ``eval()`` mode.
    """
    check_settings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, schedule=schedule,
                   warmup_steps=warmup_steps, max_grad_norm=max_grad_norm)
    if loss_fn is not None and loss_mask is not None:
        raise TrainError("loss_mask applies to the default next-token loss; with your own "
                         "loss_fn, mask the targets inside it")
    if batches is not None and loss_fn is None:
        raise TrainError("pre-built batches need a loss_fn(model, batch) that reads them")
    if loss_fn is None:
        loss_fn = lm_loss if loss_mask is None else (
            lambda m, b: lm_loss(m, b, mask=loss_mask(b)))
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    result = TrainResult(steps=steps, trainable_params=sum(p.numel() for p in params), lr=lr,
                         batch_size=batch_size, seq_len=seq_len)
    if steps == 0:
        return result
    if not params:
        raise TrainError("no trainable parameters: set requires_grad on the weights to train, "
                         "or pass params=[...]")
    torch.manual_seed(seed)
    if batches is not None:
        if len(batches) < steps:
            raise TrainError(f"{len(batches)} batches for {steps} steps; give one per step")
    else:
        data = train_windows(tokens, steps * batch_size, seq_len, seed)  # (steps·B, T)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = model_device(model)  # batches go where the model is: the same loop on a GPU
    t0 = time.perf_counter()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False)
    model.train()
    try:
        for step in it:
            batch = to_device(batches[step] if batches is not None
                              else data[step * batch_size:(step + 1) * batch_size],
                              device)  # (B, T), or the caller's dict of tensors
            step_lr = lr * lr_factor(step, steps, schedule=schedule, warmup_steps=warmup_steps)
            for group in opt.param_groups:
                group["lr"] = step_lr
            opt.zero_grad(set_to_none=True)
            if micro_batch_size and batches is None and micro_batch_size < len(batch):
                loss = 0.0
                for chunk in batch.split(micro_batch_size):  # (b, T) each, b ≤ micro_batch_size
                    part = loss_fn(model, chunk) * (len(chunk) / len(batch))
                    part.backward()  # gradients add up in .grad
                    loss = loss + part.detach()
            else:
                loss = loss_fn(model, batch)
                loss.backward()
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                result.grad_norms.append(float(norm))
            opt.step()
            if after_step is not None:
                after_step(model)
            result.losses.append(loss.item())
            result.lrs.append(step_lr)
            if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, step=step + 1, model=model, optimizer=opt,
                                losses=result.losses)
    finally:
        model.eval()
    if checkpoint_dir is not None:
        save_checkpoint(checkpoint_dir, step=steps, model=model, optimizer=opt,
                        losses=result.losses)
    opt.zero_grad(set_to_none=True)  # the last step's gradients are not needed any more
    result.seconds = time.perf_counter() - t0
    return result
