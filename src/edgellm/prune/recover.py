"""Recovery: a short fine-tune of a pruned model on the train split (plain or LoRA via peft).

Two modes, because they interact differently with the zeros:

* ``lora=False`` (default for unstructured / N:M): every decoder linear and norm is trained,
  and after each optimizer step the pruned weights are set back to zero (``masks``), so the
  sparsity pattern survives exactly.
* ``lora=True`` (LLM-Pruner's recipe for structurally pruned models): low-rank adapters on all
  decoder linears through ``peft``, merged into the weights at the end.  Merging a dense
  ``B·A`` update fills the zeros of an unstructured mask, so with ``masks`` the mask is
  re-applied after merging (which throws part of the adapter's gain away).

The tied embedding / lm_head stays frozen in both modes.  Compare with a *control*: the
unpruned model fine-tuned with the same steps on the same data (:func:`finetune` on a copy of
the dense model), so that recovery is not confused with adaptation to the corpus.
"""

from __future__ import annotations

import torch

from edgellm.models import LINEAR_ROLES
from edgellm.prune.masks import PruneError
from edgellm.train import TrainResult, train, train_windows  # noqa: F401  (train_windows re-exported)


def zero_masks(model) -> dict[str, torch.Tensor]:
    """``{name: keep-mask}`` of the decoder linears' current nonzeros (to keep zeros at zero)."""
    from edgellm.prune.layers import prunable_linears

    return {n: lin.weight.detach() != 0 for n, lin in prunable_linears(model).items()}


def reapply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    """Set the pruned weights (``False`` in ``masks[name]``) back to exactly zero, in place."""
    from edgellm.prune.layers import prunable_linears

    with torch.no_grad():
        for n, lin in prunable_linears(model).items():
            lin.weight.mul_(masks[n])


def finetune(model, tokens: torch.Tensor, *, steps: int = 20, batch_size: int = 2,
             seq_len: int = 256, lr: float | None = None, lora: bool = False, lora_r: int = 8,
             masks: dict[str, torch.Tensor] | None = None, seed: int = 0,
             progress: bool = False) -> TrainResult:
    """Fine-tune a pruned ``model`` in place for ``steps`` AdamW steps of next-token loss
    (:func:`edgellm.train.train`); return its :class:`~edgellm.train.TrainResult`.

    ``tokens`` 1-D LongTensor (the train split); batches are ``batch_size`` random windows of
    ``seq_len`` tokens (the same windows for the same ``seed``, so a control run sees the same
    data).  ``lr`` defaults to 2e-5 (plain) or 2e-4 (LoRA).  ``masks`` ``{name: keep-mask}``
    keep pruned weights at zero (after every step; with LoRA, after merging).
    """
    if steps < 0:
        raise PruneError(f"steps={steps} must be >= 0")
    lr = (2e-4 if lora else 2e-5) if lr is None else lr
    if steps == 0:
        return TrainResult(steps=0, lr=lr, batch_size=batch_size, seq_len=seq_len)
    torch.manual_seed(seed)  # LoRA's adapters are initialised from it
    target = model
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, bias="none",
                         target_modules=list(LINEAR_ROLES))
        target = get_peft_model(model, cfg)
    else:  # every decoder weight; the tied embedding / lm_head stays frozen
        for name, p in model.named_parameters():
            p.requires_grad_(not ("embed" in name or "lm_head" in name))
    keep_zeros = (lambda m: reapply_masks(model, masks)) if masks and not lora else None
    try:
        result = train(target, tokens, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                       after_step=keep_zeros, seed=seed, progress=progress, desc="recover")
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    if lora:
        model = target.merge_and_unload()
        if masks:
            reapply_masks(model, masks)
    return result
