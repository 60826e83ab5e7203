"""What ``grade`` measures on the exported file itself, the verdict per criterion and the score.

Nothing is taken from the recipe: the size is the file's, the perplexity and the task accuracy
come from llama.cpp running the file, the speed from timing it (:mod:`edgellm.pipeline.budgets`
says how each is measured).  The base model's task accuracy is measured once by the same
evaluator and cached.

The leaderboard score of a file within its budget is the mean headroom over the four criteria,
in percent::

    score = 100 · mean(1 − size/max_bytes,  1 − min_decode/decode,
                       1 − ΔNLL/ln(max_ppl_ratio),  accuracy − accuracy_base)

(each term is ≥ 0 for a file that passes; smaller, faster, better files score higher); a file
over budget scores 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def verdict(value: float, limit: float, se: float, *, higher_is_better: bool) -> str:
    """``pass`` / ``fail`` when ``value`` is more than two standard errors ``se`` on one side of
    ``limit``, ``not resolved`` when it is within them."""
    margin = (value - limit) if higher_is_better else (limit - value)
    if abs(margin) <= 2 * se:
        return "not resolved"
    return "pass" if margin > 0 else "fail"


def paired_accuracy(correct: list[bool], correct_base: list[bool]) -> dict:
    """The accuracy difference on the same items and its paired standard error
    (``sqrt(var(d)/n)`` with ``d_i = c_i − b_i``)."""
    n = len(correct)
    d = [int(a) - int(b) for a, b in zip(correct, correct_base, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return {"accuracy_delta": mean, "accuracy_delta_se": math.sqrt(var / n)}


def task_generations(gguf, *, style: str, items: int, max_new_tokens: int = 16,
                     threads: int = 2, progress: bool = False) -> dict:
    """The funccall task run by llama.cpp on ``gguf`` (greedy, free decoding): accuracy, its
    standard error, format validity and ``correct`` per item."""
    from edgellm.deploy.llamacpp import llamacpp_greedy
    from edgellm.lora.chat import Prompting, prompt_ids
    from edgellm.lora.task import load_task, score
    from edgellm.models import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL, quiet=True)
    task = load_task("funccall")
    subset = task.subset("test", items)
    prompting = Prompting.from_style(style, task.split("train"), instruction=task.instruction)
    rows = [prompt_ids(tok, prompting, it.prompt) for it in subset]
    out = llamacpp_greedy(gguf, rows, eos=tok.eos_token_id, max_new_tokens=max_new_tokens,
                          threads=threads, progress=progress)
    rec = score([tok.decode(x, skip_special_tokens=True) for x in out], subset,
                dotted_names=task.dotted_names)
    rec.update(task="funccall", task_sha256=task.sha256, prompt_style=style,
               decoding="free", runtime="llamacpp", max_new_tokens=max_new_tokens)
    return rec


def base_task(*, style: str, items: int, max_new_tokens: int = 16, threads: int = 2,
              progress: bool = False) -> dict:
    """:func:`task_generations` of the default model's F32 GGUF, cached by the evaluator's
    settings and the task's sha256 (``cache_dir()/pipeline/base/``)."""
    import hashlib

    from edgellm.deploy.export_quant import cached_f32
    from edgellm.lora.task import load_task
    from edgellm.models import DEFAULT_MODEL, load_model
    from edgellm.paths import cache_dir
    from edgellm.records import write_json

    key = json.dumps([DEFAULT_MODEL, load_task("funccall").sha256, style, items,
                      max_new_tokens], sort_keys=True)
    path = cache_dir() / "pipeline" / "base" / f"task-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tok = load_model(DEFAULT_MODEL, quiet=True)
    f32 = cached_f32(model, tok)
    del model
    rec = task_generations(f32, style=style, items=items, max_new_tokens=max_new_tokens,
                           threads=threads, progress=progress)
    rec["model"] = DEFAULT_MODEL
    write_json(rec, path)
    return rec


def quality(gguf, *, ppl_eval: dict, task_eval: dict, threads: int = 1,
            progress: bool = False) -> dict:
    """Perplexity of ``gguf`` (llama.cpp) against the fp32 default model (PyTorch) on the same
    tokens, and its task accuracy against the base model's (same items): deterministic
    functions of the file, each cached by its sha256 and the evaluator's settings
    (``cache_dir()/pipeline/quality/``), so a grade that stops half-way keeps what it measured.
    ``threads`` only changes how long it takes (one thread suffers least from other jobs)."""
    from edgellm.models import sha256_file

    gguf = Path(gguf)
    sha = sha256_file(gguf)
    rec = _cached("ppl", [sha, ppl_eval], lambda: _ppl(gguf, ppl_eval, threads, progress))
    kw = dict(items=task_eval["items"], max_new_tokens=task_eval["max_new_tokens"],
              threads=threads, progress=progress)
    mine = _cached("task", [sha, task_eval], lambda: task_generations(
        gguf, style=task_eval["style"], **kw))
    base = base_task(style=task_eval["base_style"], **kw)
    rec.update(accuracy=mine["accuracy"], accuracy_se=mine["accuracy_se"],
               format_valid=mine["format_valid"], n_task_items=mine["n_test"],
               accuracy_base=base["accuracy"], accuracy_base_se=base["accuracy_se"],
               task=mine["task"], task_sha256=mine["task_sha256"],
               prompt_style=mine["prompt_style"], base_prompt_style=base["prompt_style"],
               eval_threads=threads, **paired_accuracy(mine["correct"], base["correct"]))
    return rec


def _cached(what: str, key, compute) -> dict:
    import hashlib

    from edgellm.paths import cache_dir
    from edgellm.records import write_json

    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "pipeline" / "quality" / f"{what}-{h}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rec = compute()
    write_json(rec, path)
    return rec


def _ppl(gguf: Path, ppl_eval: dict, threads: int, progress: bool) -> dict:
    from edgellm.deploy.export_quant import evaluate_gguf
    from edgellm.models import DEFAULT_MODEL, load_model

    reference, tok = load_model(DEFAULT_MODEL, quiet=True)
    ppl = evaluate_gguf(gguf, reference, tok, threads=threads, progress=progress, **ppl_eval)
    rec = {k: ppl[k] for k in ("ppl", "ppl_stderr", "ppl_base", "ppl_base_stderr", "delta_nll",
                               "delta_nll_stderr", "kl_mean", "top1_agreement", "n_tokens",
                               "protocol", "ctx", "data", "split", "data_sha256") if k in ppl}
    rec["ppl_ratio"] = rec["ppl"] / rec["ppl_base"]
    return rec


def speed(gguf, *, threads: int = 2, bench: dict) -> dict:
    """Decode (and prefill) speed of ``gguf`` in llama.cpp at ``threads``, measured now (never
    cached: a speed is the machine's state as much as the file's)."""
    import os

    from edgellm.deploy.apply import bench_runtime

    load = os.getloadavg()       # other jobs on the machine slow every timing: say so
    b = bench_runtime("llamacpp", str(gguf), threads=threads, with_llama_bench=True, **bench)
    lb = b.get("llama_bench") or {}
    protocols = {k: v for k, v in b["speed_protocol"].items()
                 if k in ("decode_tokens_per_s", "prefill_tokens_per_s",
                          "decode_bound_tokens_per_s")}
    if lb:
        protocols["llama_bench_decode_tokens_per_s"] = lb["speed_protocol"]["decode_tokens_per_s"]
    return {"decode_tokens_per_s": b["decode_tokens_per_s"],
            "prefill_tokens_per_s": b["prefill_tokens_per_s"],
            "decode_bound_tokens_per_s": b["decode_bound_tokens_per_s"],
            "llama_bench_decode_tokens_per_s": lb.get("decode_tokens_per_s"),
            "llama_bench_decode_stddev": lb.get("decode_stddev"),
            "cpu": b.get("cpu"), "threads": threads,
            "load_average_before_timing": [round(x, 2) for x in load],
            "speed_protocol": protocols}


def verdicts(m: dict, budget) -> dict:
    """Per criterion: the measured value, the limit, the point-estimate ``ok`` and the
    ``verdict`` (:func:`verdict`); the speed's standard error is llama-bench's spread over
    its repeats where it reported one (else 0: a single timing resolves nothing finer)."""
    speed_se = m.get("llama_bench_decode_stddev") or 0.0
    rows = {
        "size_bytes": (m["size_bytes"], budget.max_bytes, 0.0, False),
        "decode_tokens_per_s": (m["decode_tokens_per_s"], budget.min_decode_tokens_per_s,
                                speed_se, True),
        "delta_nll": (m["delta_nll"], budget.max_delta_nll, m["delta_nll_stderr"], False),
        "accuracy_delta": (m["accuracy_delta"], budget.min_accuracy_delta,
                           m["accuracy_delta_se"], True),
    }
    out = {}
    for name, (value, limit, se, up) in rows.items():
        ok = value >= limit if up else value <= limit
        out[name] = {"value": value, "limit": limit, "se": se, "ok": bool(ok),
                     "verdict": verdict(value, limit, se, higher_is_better=up)}
    return out


def score(m: dict, budget, within: bool) -> float:
    """The leaderboard score (module docstring): 0 over budget, else the mean headroom in %."""
    if not within:
        return 0.0
    parts = (1 - m["size_bytes"] / budget.max_bytes,
             1 - budget.min_decode_tokens_per_s / m["decode_tokens_per_s"],
             1 - max(m["delta_nll"], 0.0) / budget.max_delta_nll,
             m["accuracy_delta"] - budget.min_accuracy_delta)
    return 100 * sum(parts) / len(parts)
