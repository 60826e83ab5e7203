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

import time

import torch

from edgellm.prune.masks import PruneError


def zero_masks(model) -> dict[str, torch.Tensor]:
    """``{name: keep-mask}`` of the decoder linears' current nonzeros (to keep zeros at zero)."""
    from edgellm.prune.layers import prunable_linears

    return {n: lin.weight.detach() != 0 for n, lin in prunable_linears(model).items()}


def train_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows (n, seq_len) of a 1-D token tensor, reproducible by ``seed``."""
    if len(tokens) <= seq_len:
        raise PruneError(f"{len(tokens)} training tokens are too few for seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def finetune(model, tokens: torch.Tensor, *, steps: int = 20, batch_size: int = 2,
             seq_len: int = 256, lr: float | None = None, lora: bool = False, lora_r: int = 8,
             masks: dict[str, torch.Tensor] | None = None, seed: int = 0,
             progress: bool = False) -> dict:
    """Fine-tune ``model`` in place for ``steps`` AdamW steps of next-token loss.

    ``tokens`` 1-D LongTensor (the train split); batches are ``batch_size`` random windows of
    ``seq_len`` tokens (the same windows for the same ``seed``, so a control run sees the same
    data).  ``lr`` defaults to 2e-5 (plain) or 2e-4 (LoRA).  ``masks`` ``{name: keep-mask}``
    keep pruned weights at zero.  Returns losses per step, seconds, trainable parameters.
    """
    from edgellm.prune.layers import prunable_linears

    if steps < 0:
        raise PruneError(f"steps={steps} must be >= 0")
    if steps == 0:
        return {"steps": 0, "losses": [], "seconds": 0.0, "trainable_params": 0}
    torch.manual_seed(seed)
    lr = (2e-4 if lora else 2e-5) if lr is None else lr
    data = train_windows(tokens, steps * batch_size, seq_len, seed)  # (steps·B, T)
    target = model
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, bias="none",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"])
        target = get_peft_model(model, cfg)
        params = [p for p in target.parameters() if p.requires_grad]
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not ("embed" in name or "lm_head" in name))
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lins = prunable_linears(model) if masks else {}
    losses, t0 = [], time.perf_counter()
    target.train()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="recover", leave=False)
    try:
        for step in it:
            ids = data[step * batch_size:(step + 1) * batch_size]  # (B, T)
            loss = target(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks and not lora:
                with torch.no_grad():
                    for n, lin in lins.items():
                        lin.weight.mul_(masks[n])  # pruned weights back to exactly zero
            losses.append(loss.item())
    finally:
        target.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    if lora:
        model = target.merge_and_unload()
        if masks:
            with torch.no_grad():
                for n, lin in prunable_linears(model).items():
                    lin.weight.mul_(masks[n])
    return {"steps": steps, "losses": losses, "seconds": time.perf_counter() - t0,
            "trainable_params": sum(p.numel() for p in params), "lr": lr, "lora": lora,
            "batch_size": batch_size, "seq_len": seq_len}
