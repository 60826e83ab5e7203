"""``edgellm finetune`` and ``edgellm eval-task``: LoRA / QLoRA / full fine-tuning on a task with
a generation-based metric, and any model or adapter evaluated on it.

::

    edgellm finetune --method lora --rank 8 --targets all --steps 150 --lr 1e-3 --eval --json
    edgellm finetune --method qlora --rank 8 --out adapters/funcname-qlora --eval
    edgellm eval-task --model smollm2-135m --adapter adapters/funcname-qlora --json
    edgellm eval-task --task my_task.jsonl --max-examples 100

``--task`` is ``funccall`` (a description and six candidate standard-library functions, answer
the dotted name of the right one; see ``edgellm.lora.funccall``), ``funcname`` (the description
alone; ``edgellm.lora.task``) or a JSONL file of ``{"prompt", "answer", "split"}`` lines.  Training
batches are chat-template examples with the loss on the answer tokens only.  With ``--eval`` the
base model is scored with the best prompt found for it (few-shot, chat template) and, where
answers are dotted names, grammar-constrained decoding (``edgellm.lora.grammar``: its
``accuracy_base``, ``ppl_base``) and the tuned model with its training prompt (``accuracy``,
``ppl``): greedy generation, exact match with any alias (``accuracy`` is a fraction in [0, 1],
``accuracy_se`` its binomial standard error), ``format_valid`` the fraction of answers that
are dotted names, ``ppl`` the perplexity of the held-out answers given their prompts.
``train_tokens_per_s``: protocol ``train`` (non-padding tokens / training seconds).
``--out DIR`` (a new or empty folder) receives the adapter in peft's format, written then renamed.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from edgellm.cli.common import (
    add_json_arg,
    add_model_arg,
    add_seed_arg,
    check_cpu_only,
    check_model_name,
    check_out_dir,
)
from edgellm.lora.apply import METHODS, TARGETS


def _add_task_arg(p) -> None:
    p.add_argument("--task", default="funcname",
                   help="funccall (pick the function from a list), funcname (name it from the "
                        "description alone), or a JSONL file of {prompt, answer, split} lines")
    p.add_argument("--max-examples", type=int, help="score N test items (a fixed sample: the first N in sha256(prompt) order)")


def add_parsers(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA / QLoRA / full fine-tuning on a task",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, help="the base model (registry name, saved folder or hub id)")
    p.add_argument("--base", help="alias of --model: the base model to fine-tune")
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, scaling 1)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rsLoRA)")
    p.add_argument("--targets", default="all", help="qv, attn or all (attention + MLP linears)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=8, help="training examples per step")
    p.add_argument("--seq-len", type=int, default=128, help="longest training example in tokens")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, more time)")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="control run: train on answers of other prompts (format only)")
    _add_task_arg(p)
    p.add_argument("--out", help="save the adapter to this new (or empty) folder")
    p.add_argument("--eval", action="store_true", help="score base and tuned model on the test split")
    p.add_argument("--eval-llamacpp", action="store_true",
                   help="with --eval: also run the adapter in llama.cpp (GGUF LoRA, and merged), "
                        "compared token for token with HF + peft")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (--eval-llamacpp)")
    p.add_argument("--eval-merged", action="store_true",
                   help="with --eval and --method qlora/loftq: also score the adapter merged into "
                        "the 4-bit base (kept in fp32, and re-quantized to NF4)")
    add_seed_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("eval-task", help="score a model (and adapter) on a task by generation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--adapter", help="an adapter folder (edgellm finetune --out, or peft's)")
    _add_task_arg(p)
    p.add_argument("--prompt", choices=["plain", "zeroshot", "fewshot", "fewshot8"],
                   help="prompt style (default: the best one for a bare model, the training "
                        "prompt for an adapter)")
    p.add_argument("--decoding", choices=["free", "grammar"],
                   help="grammar: answers constrained to dotted names (default for a bare model "
                        "on a dotted-name task); free: anything (default with --adapter)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="prompts generated at once")
    p.add_argument("--runtime", default="torch", choices=["torch", "llamacpp"],
                   help="llamacpp: the adapter runs in llama.cpp (base F32 GGUF + GGUF LoRA), "
                        "compared token for token with HF + peft on the same prompts")
    p.add_argument("--merge", action="store_true",
                   help="with --runtime llamacpp: merge the adapter and run the merged GGUF")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (--runtime llamacpp)")
    add_json_arg(p)
    p.set_defaults(func=run_eval_task)


def _check_task(args) -> None:
    from edgellm.lora.layers import LoRAError
    from edgellm.lora.task import TASKS, load_task

    if args.max_examples is not None and args.max_examples < 1:
        raise LoRAError(f"--max-examples {args.max_examples}: give a positive number")
    if args.task not in TASKS:
        load_task(args.task)   # a user's file: parsed now, so a bad line fails before the load


def check_finetune_args(args) -> None:
    """Every bad value fails here, before the model is loaded."""
    from edgellm.deploy.adapters import LLAMACPP_METHODS
    from edgellm.lora.apply import check_bnb, check_lora_args
    from edgellm.lora.layers import INT4_METHODS, MERGE_METHODS, LoRAError
    from edgellm.train import check_settings

    if args.base:
        args.model = args.base
    check_lora_args(method=args.method, rank=args.rank, alpha=args.alpha, targets=args.targets,
                    dropout=args.dropout)
    check_settings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                   lr=args.lr, schedule="linear", warmup_steps=0, max_grad_norm=1.0)
    if args.steps < 1:
        raise LoRAError("--steps must be >= 1")
    if args.method in ("qlora", "loftq"):
        check_cpu_only(args.device, f"--method {args.method} (bitsandbytes' NF4 on the CPU)")
    check_model_name(args.model)
    _check_task(args)
    if args.out:
        check_out_dir(args.out, "--out", empty=True)
        if args.method == "full":
            raise LoRAError("--out saves an adapter; a full fine-tune has none (drop --out)")
    if args.eval_llamacpp:
        if not args.eval:
            raise LoRAError("--eval-llamacpp compares the evaluations: add --eval")
        if args.method not in LLAMACPP_METHODS:
            raise LoRAError(f"--eval-llamacpp runs a plain LoRA adapter in llama.cpp; "
                            f"--method {args.method} is not one (use one of "
                            f"{', '.join(LLAMACPP_METHODS)})")
        if args.threads < 1:
            raise LoRAError(f"--threads {args.threads}: give a positive number")
    if args.eval_merged and (args.method not in MERGE_METHODS or not args.eval):
        raise LoRAError("--eval-merged scores the adapter merged into the 4-bit base: it needs "
                        f"--eval and --method {' / '.join(MERGE_METHODS)}")
    if args.out and args.method in INT4_METHODS:
        raise LoRAError(f"--method {args.method} trains on our INT4 base, which peft cannot "
                        "load: it saves no adapter (drop --out)")
    if args.method in ("qlora", "loftq"):
        check_bnb()
    if args.method != "full":
        _check_rank_from_config(args.model, args.rank, args.targets)


def _check_rank_from_config(name: str, rank: int, targets: str) -> None:
    """An impossible rank fails now, from config.json (when it can be read without loading)."""
    from edgellm.lora.layers import LoRAError
    from edgellm.models import REGISTRY
    from edgellm.paths import cache_dir

    folder = (cache_dir() / "models" / name if name in REGISTRY else Path(name).expanduser())
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return
    import json

    cfg = json.loads(cfg_path.read_text())
    try:
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or hidden // heads
    except (KeyError, TypeError, ZeroDivisionError):
        return  # not a Llama-style config: apply_lora checks the loaded model
    shapes = {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden),
              "v_proj": (kv * hd, hidden), "o_proj": (hidden, heads * hd),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    role, shape = min(((r, shapes[r]) for r in TARGETS[targets]), key=lambda rs: min(rs[1]))
    if rank > min(shape):
        raise LoRAError(f"rank={rank} is larger than {role} ({shape[0]}×{shape[1]}) allows: "
                        f"use a rank ≤ {min(shape)}")


def run_finetune(args) -> dict:
    from edgellm.lora.apply import finetune

    check_finetune_args(args)
    if args.eval_llamacpp:
        from edgellm.deploy.adapters import finetune_on_device

        finetune = partial(finetune_on_device, threads=args.threads)
    return finetune(args.model, method=args.method, rank=args.rank, alpha=args.alpha,
                    targets=args.targets, dropout=args.dropout, rslora=args.rslora,
                    steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    seq_len=args.seq_len, task=args.task,
                    grad_checkpointing=args.grad_checkpointing, out=args.out,
                    evaluate=args.eval, max_examples=args.max_examples,
                    shuffle_labels=args.shuffle_labels, seed=args.seed,
                    eval_merged=args.eval_merged, device=args.device,
                    progress=not args.json)


def run_eval_task(args) -> dict:
    from edgellm.lora.apply import eval_task, read_adapter_meta
    from edgellm.lora.layers import LoRAError

    if args.runtime == "llamacpp":
        check_cpu_only(args.device, "--runtime llamacpp")
    check_model_name(args.model)
    _check_task(args)
    if args.eval_batch_size < 1:
        raise LoRAError(f"--eval-batch-size {args.eval_batch_size}: give a positive number")
    if args.adapter:
        meta = read_adapter_meta(args.adapter)
        base = (meta.get("base") or {}).get("base_model")
        if base is not None and base != args.model:
            raise LoRAError(f"--adapter {args.adapter} was made for base model {base!r}, not "
                            f"{args.model!r}; pass --model {base}")
    if args.runtime == "llamacpp":
        if not args.adapter:
            raise LoRAError("--runtime llamacpp runs an adapter in llama.cpp: give --adapter DIR")
        if args.prompt is not None or args.decoding not in (None, "free"):
            raise LoRAError("--runtime llamacpp uses the adapter's training prompt and free "
                            "decoding; drop --prompt / --decoding")
        if args.threads < 1:
            raise LoRAError(f"--threads {args.threads}: give a positive number")
        from edgellm.deploy.adapters import eval_task_llamacpp

        return eval_task_llamacpp(args.model, adapter=args.adapter, task=args.task,
                                  merge=args.merge, max_examples=args.max_examples,
                                  batch_size=args.eval_batch_size, threads=args.threads,
                                  progress=not args.json)
    if args.merge:
        raise LoRAError("--merge applies to --runtime llamacpp (the merged GGUF); drop it")
    return eval_task(args.model, adapter=args.adapter, task=args.task, style=args.prompt,
                     max_examples=args.max_examples, batch_size=args.eval_batch_size,
                     progress=not args.json, decoding=args.decoding, device=args.device)
