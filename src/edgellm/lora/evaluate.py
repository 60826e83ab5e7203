"""Scoring a model on a task: exact match and format validity of greedy generations, the
answer perplexity, and the base model's cached scores (``accuracy_base``), which every
``edgellm finetune --eval`` compares with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def evaluate_task(model, tokenizer, task, *, style: str, max_examples: int | None = None,
                  batch_size: int = 32, progress: bool = False, decoding: str = "free") -> dict:
    """Generate the test answers with prompt ``style`` and score them; add the answers' PPL
    (teacher-forced, with the training prompt).  ``correct`` (per item) and ``correct_bits``
    (the same as a string of 0/1, for records) allow paired comparisons on the same items.  ``decoding="grammar"`` constrains answers to
    dotted names (:mod:`edgellm.lora.grammar`; only for tasks whose answers are dotted names)."""
    from edgellm.lora.chat import TRAIN_STYLE, Prompting, answer_nll, generate_batched
    from edgellm.lora.task import score

    items = task.subset("test", max_examples)
    train_items = task.split("train")
    t0 = time.perf_counter()
    prompting = Prompting.from_style(style, train_items, instruction=task.instruction)
    gens = generate_batched(model, tokenizer, prompting,
                            [it.prompt for it in items], batch_size=batch_size, progress=progress,
                            decoding=decoding)
    rec = score(gens, items, dotted_names=task.dotted_names)
    rec["correct_bits"] = "".join("1" if c else "0" for c in rec["correct"])  # paired comparisons
    nll = answer_nll(model, tokenizer, Prompting.from_style(TRAIN_STYLE, train_items), items)
    rec.update(ppl=nll["ppl"], answer_tokens=nll["n_tokens"], prompt_style=style, decoding=decoding,
               eval_seconds=time.perf_counter() - t0,
               examples=[{"prompt": it.prompt, "answer": it.answer, "output": g}
                         for it, g in list(zip(items, gens, strict=True))[:8]])
    return rec


def base_decoding(task) -> str:
    """How the base model answers: constrained to dotted names where the task's answers are
    dotted names (the best it can do without training), free otherwise."""
    return "grammar" if task.dotted_names else "free"


def base_cache_key(model_name: str, task, style: str, max_examples, decoding: str = "free") -> Path:
    import hashlib

    from edgellm.paths import cache_dir

    key = hashlib.sha256(json.dumps([model_name, task.sha256, style, max_examples, decoding]).encode())
    return cache_dir() / "tasks" / f"base-{key.hexdigest()[:16]}.json"


def base_scores(model, tokenizer, task, *, model_name: str, max_examples=None,
                progress: bool = False) -> dict:
    """The best-prompted base model on the task (``accuracy_base``, ``ppl_base``), answers
    constrained by :func:`base_decoding`; cached by model, task sha256, prompt, decoding and size,
    so a sweep measures it once."""
    from edgellm.lora.chat import BEST_BASE_STYLE

    decoding = base_decoding(task)
    path = base_cache_key(model_name, task, BEST_BASE_STYLE, max_examples, decoding)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:  # two runs of a sweep in parallel: the second waits for the first's numbers
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: both may measure it
            pass
        if path.is_file():
            return json.loads(path.read_text())
        rec = evaluate_task(model, tokenizer, task, style=BEST_BASE_STYLE,
                            max_examples=max_examples, progress=progress, decoding=decoding)
        return store_base(path, rec)


def store_base(path: Path, rec: dict) -> dict:
    from edgellm.records import write_json

    out = {"accuracy_base": rec["accuracy"], "accuracy_base_se": rec["accuracy_se"],
           "format_valid_base": rec["format_valid"], "ppl_base": rec["ppl"],
           "base_prompt_style": rec["prompt_style"], "base_decoding": rec["decoding"],
           "correct_bits_base": rec.get("correct_bits")}
    write_json(out, path)
    return out
