"""LoRA on a model: from scratch (:func:`apply_lora`), through peft (DoRA, PiSSA, LoftQ, rsLoRA),
QLoRA on a bitsandbytes NF4 base, adapters saved in peft's format, and :func:`finetune`, the
library entry point of ``edgellm finetune``.

Which linears get an adapter (``targets``)::

    qv    q_proj, v_proj                         (the original LoRA paper's choice)
    attn  q_proj, k_proj, v_proj, o_proj
    all   the attention and MLP linears (gate_proj, up_proj, down_proj too; QLoRA's choice)

The tied embedding / lm_head is never adapted.  Methods (``method``)::

    lora   our LoRALinear (edgellm.lora.layers), saved in peft's format
    dora   peft, use_dora (Liu et al. 2024: magnitude and direction trained apart)
    pissa  peft, init_lora_weights="pissa" (Meng et al. 2024: A, B from W's top singular vectors)
    loftq  QLoRA with LoftQ's initialisation (Li et al. 2023; edgellm.lora.loftq: base and A, B
           fitted together to W, so the adapter starts at the 4-bit error; peft's needs a GPU)
    qlora  bitsandbytes NF4 base (+ double quantization), prepare_model_for_kbit_training, peft
           LoRA (Dettmers et al. 2023)
    qalora    QA-LoRA (Xu et al. 2023; edgellm.lora.qalora): an INT4 asymmetric g64 base and a
              group-pooled adapter whose merge only moves each group's offset
    int4-lora plain LoRA on the same INT4 base (its merge must re-quantize)
    full   every parameter trained (the reference)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from edgellm.devices import check_cpu_only
from edgellm.lora.adapters import (  # noqa: F401  (re-exported)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EDGELLM_META,
    adapter_bytes,
    adapter_param_bytes,
    adapter_state_dict,
    base_fingerprint,
    check_adapter_base,
    keep_initial_adapter,
    read_adapter_meta,
    save_adapter,
)
from edgellm.lora.evaluate import (  # noqa: F401
    base_cache_key,
    base_scores,
    evaluate_task,
    store_base,
)
from edgellm.lora.layers import (  # noqa: F401  (re-exported)
    INT4_METHODS,
    MERGE_METHODS,
    METHODS,
    TARGETS,
    LoRAError,
    LoRALinear,
    check_lora_args,
    check_rank,
    lora_layers,
    lora_scaling,
    target_linears,
)
from edgellm.lora.loftq import loftq_weights, set_initial_adapter
from edgellm.lora.peftlib import (  # noqa: F401  (re-exported)
    apply_peft,
    apply_qlora,
    check_bnb,
    peft_config,
)
from edgellm.lora.qalora import apply_qalora


def _set_module(model, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model, *, rank: int = 8, alpha: float | None = None, targets: str = "all",
               dropout: float = 0.0, rslora: bool = False, seed: int = 0) -> dict[str, LoRALinear]:
    """Freeze ``model`` and put a :class:`LoRALinear` around every targeted linear (in place).

    ``alpha`` defaults to ``rank`` (scaling 1).  ``A`` is drawn from a generator seeded by
    ``seed``, layer after layer in module order.  Returns ``{name: LoRALinear}``.
    """
    check_rank(model, rank, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    out = {}
    for name, lin in target_linears(model, targets).items():
        out[name] = LoRALinear(lin, rank, alpha, dropout=dropout, rslora=rslora)
        _set_module(model, name, out[name])
    return out


def merge_lora(model) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_adapter(model, folder):
    """Put a saved adapter on ``model``: ours (plain LoRA) as :class:`LoRALinear` layers, any
    other peft adapter (DoRA …) with ``PeftModel.from_pretrained``.  Returns the model."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    meta = check_adapter_base(model, folder)
    cfg = meta["peft"]
    plain = (cfg.get("peft_type") == "LORA" and not cfg.get("use_dora")
             and cfg.get("init_lora_weights") in (True, None))
    if not plain:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    roles = set(cfg["target_modules"])
    targets = next((t for t, r in TARGETS.items() if set(r) == roles), None)
    if targets is None:
        raise LoRAError(f"{folder}: target_modules {sorted(roles)} is not one of qv, attn, all")
    apply_lora(model, rank=cfg["r"], alpha=cfg["lora_alpha"], targets=targets,
               rslora=bool(cfg.get("use_rslora")))
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    for name, m in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            t = state.get(f"base_model.model.{name}.{part}.weight")
            if t is None or t.shape != getattr(m, part).shape:
                raise LoRAError(f"{folder}: {part} of {name} is missing or has the wrong shape; "
                                "the adapter does not match this model")
            getattr(m, part).data.copy_(t)
    return model


# --------------------------------------------------------------------------------------------
# the library entry point


def prepare(model, *, method: str, rank: int, alpha, targets: str, dropout: float,
            rslora: bool, seed: int, grad_checkpointing: bool):
    """Make ``model`` trainable the ``method`` way; returns ``(model, adapter_config)``."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        cfg = None
    elif method == "lora":
        apply_lora(model, rank=rank, alpha=alpha, targets=targets, dropout=dropout,
                   rslora=rslora, seed=seed)
        cfg = peft_config(rank=rank, alpha=alpha, targets=targets, dropout=dropout,
                          rslora=rslora, base=model.config._name_or_path)
    elif method in ("qlora", "loftq"):
        inits = None
        if method == "loftq":
            check_bnb()
            check_rank(model, rank, targets)
            inits = loftq_weights(model, rank=rank, targets=targets,
                                  scaling=lora_scaling(rank, rank if alpha is None else alpha,
                                                       rslora=rslora))
        model = apply_qlora(model, rank=rank, alpha=alpha, targets=targets, dropout=dropout,
                            rslora=rslora, seed=seed, grad_checkpointing=grad_checkpointing)
        if inits is not None:
            set_initial_adapter(model, inits)
            model.edgellm_loftq_init = inits     # save_adapter expresses the adapter on NF4(W)
        cfg = model.peft_config["default"]
    elif method in INT4_METHODS:
        apply_qalora(model, rank=rank, alpha=alpha, targets=targets, dropout=dropout, seed=seed,
                     pooled=method == "qalora")
        cfg = None
    else:
        model = apply_peft(model, method=method, rank=rank, alpha=alpha, targets=targets,
                           dropout=dropout, rslora=rslora, seed=seed)
        cfg = model.peft_config["default"]
        if method == "pissa":
            keep_initial_adapter(model)
    if grad_checkpointing and method != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    return model, cfg


def finetune(model_name: str | None = None, *, method: str = "lora", rank: int = 8,
             alpha: float | None = None, targets: str = "all", dropout: float = 0.0,
             rslora: bool = False, steps: int = 100, lr: float = 5e-4, batch_size: int = 8,
             seq_len: int = 128, task: str = "funcname", grad_checkpointing: bool = False,
             out=None, evaluate: bool = True, max_examples: int | None = None,
             shuffle_labels: bool = False, seed: int = 0, progress: bool = False,
             eval_merged: bool = False, device: str | None = None) -> dict:
    """Fine-tune ``model_name`` on ``task`` and return the record of ``edgellm finetune``.

    Trains with :func:`edgellm.train.train` on left-padded chat-template batches, the loss on
    the answer tokens only (AdamW, linear decay after 10 % warm-up, gradient norm clipped to
    1).  With ``evaluate`` the base model (best prompt) and the tuned model (training prompt)
    are scored on the test split.  ``out`` receives the adapter (or, for ``full``, nothing:
    the record only).  ``eval_merged`` (QLoRA, LoftQ): also score the adapter merged into the
    4-bit base, kept in fp32 and re-quantized to NF4 (:mod:`edgellm.lora.merge`).
    ``device``: where the model is loaded and trained (:func:`edgellm.models.load_model`);
    the bitsandbytes methods (``qlora``, ``loftq``) run on the CPU only.
    """
    from edgellm.lora.chat import TRAIN_STYLE, Prompting, answer_batches, answer_loss
    from edgellm.lora.task import load_task
    from edgellm.measure import peak_rss_bytes, protocol
    from edgellm.models import DEFAULT_MODEL, load_model
    from edgellm.records import record
    from edgellm.train import train

    check_lora_args(method=method, rank=rank, alpha=alpha, targets=targets, dropout=dropout)
    if eval_merged and (method not in MERGE_METHODS or not evaluate):
        raise LoRAError("eval_merged scores an adapter merged into its 4-bit base: it needs "
                        f"evaluate and a method of {', '.join(MERGE_METHODS)}")
    if out is not None and method in INT4_METHODS:
        raise LoRAError(f"method {method} trains on our INT4 base, which peft cannot load: "
                        "it saves no adapter (drop out)")
    if method in ("qlora", "loftq"):
        check_bnb()
        check_cpu_only(device, f"method {method} (bitsandbytes' NF4 on the CPU)")
        device = "cpu"
    model_name = model_name or DEFAULT_MODEL
    t_start = time.perf_counter()
    the_task = load_task(task)
    if not the_task.split("train") or not the_task.split("test"):
        raise LoRAError(f"task {task!r} needs train and test items")
    model, tok = load_model(model_name, quiet=not progress, device=device)
    model, cfg = prepare(model, method=method, rank=rank, alpha=alpha, targets=targets,
                         dropout=dropout, rslora=rslora, seed=seed,
                         grad_checkpointing=grad_checkpointing)
    n_trainable = trainable_params(model)
    batches = answer_batches(tok, Prompting.from_style(TRAIN_STYLE), the_task.split("train"),
                             steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                             shuffle_labels=shuffle_labels)
    res = train(model, None, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                loss_fn=answer_loss, batches=batches, schedule="linear",
                warmup_steps=steps // 10, max_grad_norm=1.0, seed=seed, progress=progress,
                desc=f"{method} r={rank}")
    fed = sum(int(b["attention_mask"].sum()) for b in batches[:steps])
    rec = {"method": method, "task": task, "model": model_name, "rank": rank,
           "alpha": float(rank if alpha is None else alpha), "targets": targets,
           "dropout": dropout, "rslora": rslora, "steps": steps, "lr": lr,
           "batch_size": batch_size, "seq_len": seq_len, "shuffle_labels": shuffle_labels,
           "grad_checkpointing": grad_checkpointing, "trainable_params": n_trainable,
           "task_sha256": the_task.sha256, "train_prompt_style": TRAIN_STYLE,
           "loss_first": res.losses[0] if res.losses else None,
           "loss_last": sum(res.losses[-10:]) / len(res.losses[-10:]) if res.losses else None,
           "train_seconds": res.seconds,
           "train_tokens_per_s": fed / res.seconds if res.seconds else None,
           "speed_protocol": {"train_tokens_per_s": protocol(
               "train", batch=batch_size, seq_len=seq_len, steps=steps,
               tokens="non-padding tokens of the left-padded chat batches (prompt + answer)")}}
    if method == "full":
        rec["adapter_bytes"] = None
    else:
        rec["adapter_bytes"] = adapter_param_bytes(model)
    if evaluate:
        ev = evaluate_task(model, tok, the_task, style=TRAIN_STYLE, max_examples=max_examples,
                           progress=progress)
        rec.update({k: ev[k] for k in ("accuracy", "accuracy_se", "format_valid", "n_test", "decoding",
                                       "ppl", "examples", "eval_seconds", "correct_bits")})
        if eval_merged and method in INT4_METHODS:
            from edgellm.lora.merge import evaluate_merged_int4

            rec["merged"] = evaluate_merged_int4(model, tok, the_task, correct=ev["correct"],
                                                 style=TRAIN_STYLE, max_examples=max_examples,
                                                 progress=progress)
        elif eval_merged:
            from edgellm.lora.merge import evaluate_merged

            rec["merged"] = evaluate_merged(model, model_name, tok, the_task, correct=ev["correct"],
                                            style=TRAIN_STYLE, max_examples=max_examples,
                                            progress=progress)
    if out is not None and method != "full":
        save_adapter(model, out, config=cfg,
                     meta={"task": task, "method": method, "train_prompt_style": TRAIN_STYLE,
                           "task_sha256": the_task.sha256})
        rec["adapter_bytes"] = adapter_bytes(out)
        rec["out"] = str(out)
    rec["peak_rss_bytes"] = peak_rss_bytes()   # training and the tuned model's evaluation
    if evaluate:  # the best-prompted base model, freshly loaded (cached per model, task, prompt)
        del model
        base_model, _ = load_model(model_name, quiet=True, device=device)
        rec.update(base_scores(base_model, tok, the_task, model_name=model_name,
                               max_examples=max_examples, progress=progress))
    rec["seconds"] = time.perf_counter() - t_start
    return record(rec, seed=seed, protocol="greedy-exact-match", data=task)


def eval_task(model_name: str | None = None, *, adapter=None, task: str = "funcname",
              style: str | None = None, max_examples: int | None = None,
              batch_size: int = 32, progress: bool = False, decoding: str | None = None,
              device: str | None = None) -> dict:
    """The record of ``edgellm eval-task``: a model (and optionally an adapter) on a task.

    ``style`` defaults to the best base prompt for a bare model and to the adapter's training
    prompt for an adapter; ``decoding`` to the grammar for a bare model on a dotted-name task
    (:func:`edgellm.lora.evaluate.base_decoding`) and to free decoding for an adapter."""
    from edgellm.lora.chat import BEST_BASE_STYLE
    from edgellm.lora.evaluate import base_decoding
    from edgellm.lora.task import load_task
    from edgellm.measure import peak_rss_bytes
    from edgellm.models import DEFAULT_MODEL, load_model
    from edgellm.records import record

    model_name = model_name or DEFAULT_MODEL
    t0 = time.perf_counter()
    the_task = load_task(task)
    if not the_task.split("test"):
        raise LoRAError(f"task {task!r} has no test items")
    if decoding is None:
        decoding = "free" if adapter is not None else base_decoding(the_task)
    if decoding == "grammar" and not the_task.dotted_names:   # before the model load
        raise LoRAError(f"--decoding grammar needs a task whose answers are dotted names; "
                        f"{task!r} has other answers: use --decoding free")
    model, tok = load_model(model_name, quiet=not progress, device=device)
    if adapter is not None:
        meta = check_adapter_base(model, adapter)
        model = load_adapter(model, adapter)
        style = style or meta.get("train_prompt_style", BEST_BASE_STYLE)
    style = style or BEST_BASE_STYLE
    ev = evaluate_task(model, tok, the_task, style=style, max_examples=max_examples,
                       batch_size=batch_size, progress=progress, decoding=decoding)
    if adapter is None and style == BEST_BASE_STYLE and decoding == base_decoding(the_task):
        # finetune --eval reuses it as the baseline
        store_base(base_cache_key(model_name, the_task, style, max_examples, decoding), ev)
    rec = {"model": model_name, "adapter": None if adapter is None else str(adapter),
           "task": task, "task_sha256": the_task.sha256,
           **{k: v for k, v in ev.items() if k != "correct"},
           "peak_rss_bytes": peak_rss_bytes(), "seconds": time.perf_counter() - t0}
    return record(rec, protocol="greedy-exact-match", data=task)
