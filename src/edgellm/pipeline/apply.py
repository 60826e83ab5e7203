"""``pipeline``: the library entry point of the capstone: run a recipe, grade its file.

:func:`run_recipe` runs the steps of a recipe (:mod:`edgellm.pipeline.recipe`) one after the
other, step ``i`` into ``cache_dir()/pipeline/<hash of the recipe cut after step i>/<NN-kind>/``
(the last step's folder is the whole recipe's hash, which also holds ``run.json``): written in a
temporary folder and renamed when the step succeeded, with a manifest (size and sha256 of every
file).  A step whose folder is complete is reused, so a second run (or ``grade`` after ``run``)
costs nothing, and a recipe that changes only its later steps reuses the earlier ones; a step
that fails raises :class:`StepFailed`, which names it, and leaves the earlier steps' folders in
place.

:func:`grade` runs (or reuses) the recipe, then measures the final GGUF itself against a budget
(:mod:`edgellm.pipeline.budgets`, :mod:`edgellm.pipeline.grading`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from edgellm.pipeline.recipe import KINDS, PipelineError, fast_recipe, load_recipe, recipe_hash
from edgellm.pipeline.steps import ARTIFACT, STEP_FUNCTIONS, scrub, trim

RECORD = "record.json"


class StepFailed(PipelineError):
    """A step of a recipe raised: the message names the step and what is kept."""


def run_dir(recipe: dict, n_steps: int | None = None) -> Path:
    """``cache_dir()/pipeline/<first 16 hex digits of the hash>`` of ``recipe`` cut after
    ``n_steps`` steps (default: all of them): where step ``n_steps`` is written."""
    from edgellm.paths import cache_dir

    cut = recipe if n_steps is None else {**recipe, "steps": recipe["steps"][:n_steps]}
    return cache_dir() / "pipeline" / recipe_hash(cut)[:16]


def complete(folder: Path, gives: str, passthrough: bool) -> bool:
    """The step folder holds its record, its output and a manifest that matches them."""
    from edgellm.models import verify_manifest

    if not (folder / RECORD).is_file() or verify_manifest(folder) is not None:
        return False
    if passthrough:
        return True
    out = folder / ARTIFACT[gives]
    if out.is_dir():
        return verify_manifest(out) is None
    return out.is_file()


def _write_step(kind: str, source, folder: Path, settings: dict, *, base: Path, seed: int,
                progress: bool) -> dict:
    from edgellm.models import write_manifest
    from edgellm.records import write_folder, write_json

    spec = KINDS[kind]
    t0 = time.perf_counter()
    with write_folder(folder) as tmp:
        rec = STEP_FUNCTIONS[kind](source, tmp, settings, seed=seed, progress=progress)
        rec["seconds_step"] = time.perf_counter() - t0   # the whole step, kept when reused
        # paths inside the temporary folder become the step's name, the rest of the run folder
        # and the cache relative: no machine path in a record
        rec = scrub(rec, {str(tmp): folder.name, str(base) + "/": "", str(base): "."})
        write_json(rec, tmp / RECORD)
        out = tmp / ARTIFACT[spec.gives]
        if out.is_dir():
            write_manifest(out)
        write_manifest(tmp, step=folder.name)          # last: marks the folder complete
    return rec


def run_recipe(recipe, *, fast: bool = False, progress: bool = False) -> dict:
    """Run (or reuse) every step of ``recipe`` (a path or a checked recipe dict); return the run
    record: ``steps`` (each step's record, trimmed), ``output`` (the last step's output,
    relative to the cache), ``gives``, ``size_bytes`` of the output file, where the recipe had
    a ``bench`` step its ``decode_tokens_per_s``, ``seconds_per_step`` (what each step cost
    when it ran, reused or not), ``seconds_this_run`` and ``reused``.  ``fast``: every step
    count capped (:func:`edgellm.pipeline.recipe.fast_recipe`), a different hash."""
    recipe = load_recipe(recipe) if not isinstance(recipe, dict) else recipe
    if fast:
        recipe = fast_recipe(recipe)
    h = recipe_hash(recipe)
    base = run_dir(recipe)
    cache = base.parent.parent
    t_start = time.perf_counter()
    source, gives = recipe["model"], "hf"
    steps, seconds, reused = {}, {}, []
    n = len(recipe["steps"])
    for i, step in enumerate(recipe["steps"], 1):
        kind = step["kind"]
        spec = KINDS[kind]
        settings = {k: v for k, v in step.items() if k != "kind"}
        name = f"{i:02d}-{kind}"
        folder = run_dir(recipe, i) / name
        t0 = time.perf_counter()
        if complete(folder, spec.gives, spec.passthrough):
            rec = json.loads((folder / RECORD).read_text())
            reused.append(name)
        else:
            if folder.exists():   # a folder a crash left without its manifest: never trusted
                shutil.rmtree(folder)
            if progress:
                print(f"[pipeline {recipe['name']} {i}/{n}] {kind}", flush=True)
            try:
                rec = _write_step(kind, source, folder, settings, base=cache,
                                  seed=recipe["seed"], progress=progress)
            except Exception as e:   # any failure of the technique: name the step, keep the rest
                kept = (f"steps 1-{i - 1} are kept in {cache / 'pipeline'} and are reused "
                        "on the next run" if i > 1 else "no earlier step to keep")
                raise StepFailed(f"recipe {recipe['name']!r} stopped at step {i} ({kind}): "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                 f"; {kept}") from e
        seconds[name] = time.perf_counter() - t0
        steps[name] = trim(rec)
        steps[name].setdefault("seconds_step", rec.get("seconds"))
        if not spec.passthrough:
            source = folder / ARTIFACT[spec.gives]
        gives = spec.gives
    out = Path(source)
    bench = [r for k, r in steps.items() if k.endswith("-bench")]
    result = {
        "recipe": recipe["name"], "recipe_hash": h, "fast": fast, "model": recipe["model"],
        "steps": steps, "gives": gives,
        "output": (str(out.relative_to(cache)) if out.is_relative_to(cache) else str(out)),
        "size_bytes": out.stat().st_size if out.is_file() else None,
        "decode_tokens_per_s": bench[-1].get("decode_tokens_per_s") if bench else None,
        # what each step cost when it ran (kept in its record, so a reused step still says),
        # and what this call spent on it (about 0 when reused)
        "seconds_per_step": {k: r["seconds_step"] for k, r in steps.items()},
        "seconds_this_run": seconds, "reused": reused,
        "seconds": time.perf_counter() - t_start}
    if bench:
        result["speed_protocol"] = {"decode_tokens_per_s":
                                    bench[-1]["speed_protocol"]["decode_tokens_per_s"]}
    from edgellm.records import record, write_json

    base.mkdir(parents=True, exist_ok=True)
    write_json({**result, "path": None}, base / "run.json")
    result["path"] = out   # the output on this machine (the CLI leaves it out of its record)
    return record(result, seed=recipe["seed"])


def grade(recipe, *, budget: str | None = None, threads: int | None = None,
          fast: bool = False, progress: bool = False) -> dict:
    """Run (or reuse) ``recipe``, then measure its GGUF against ``budget`` (default: the
    recipe's ``budget``): ``size_bytes``, ``ppl`` / ``ppl_base`` (and the paired ``delta_nll``),
    ``accuracy`` / ``accuracy_base`` (same items), ``decode_tokens_per_s`` at the budget's
    threads, a ``verdicts`` table, ``within_budget`` (every point estimate meets its limit) and
    the ``score``.  ``fast``: FAST mode, fewer tokens, items and repeats; its verdicts are
    ``not resolved`` whatever the numbers (it is a smoke test, not a grade)."""
    from edgellm.pipeline import grading
    from edgellm.pipeline.budgets import BENCH, EVAL_THREADS, PPL_EVAL, TASK_EVAL, get_budget

    recipe = load_recipe(recipe) if not isinstance(recipe, dict) else recipe
    name = budget or recipe.get("budget")
    if name is None:
        raise PipelineError(f"recipe {recipe['name']!r} names no budget: give --budget "
                            "(e.g. phone)")
    b = get_budget(name)
    threads = threads or b.threads
    t0 = time.perf_counter()
    ran = run_recipe(recipe, fast=fast, progress=progress)
    if ran["gives"] != "gguf":
        raise PipelineError(f"recipe {recipe['name']!r} ends with a {ran['gives']} output; "
                            "grading measures a GGUF file: end it with an export step")
    gguf = ran.pop("path")
    ppl_eval, task_eval, bench = dict(PPL_EVAL), dict(TASK_EVAL), dict(BENCH)
    if fast:
        ppl_eval["max_tokens"], task_eval["items"] = 1024, 8
        bench.update(gen_tokens=16, repeats=1)
    t1 = time.perf_counter()
    m = {"size_bytes": gguf.stat().st_size,
         **grading.quality(gguf, ppl_eval=ppl_eval, task_eval=task_eval,
                           threads=EVAL_THREADS, progress=progress)}
    t2 = time.perf_counter()
    m.update(grading.speed(gguf, threads=threads, bench=bench))
    table = grading.verdicts(m, b)
    within = all(row["ok"] for row in table.values())
    if fast:
        for row in table.values():
            row["verdict"] = "not resolved"
    rec = {**ran, **m, "budget": b.name, "budget_limits": b.info(), "verdicts": table,
           "within_budget": within, "score": grading.score(m, b, within), "fast": fast,
           "ppl_eval": ppl_eval, "task_eval": task_eval, "bench": bench,
           "seconds_run": ran["seconds"], "seconds_quality": t2 - t1,
           "seconds_speed": time.perf_counter() - t2, "seconds": time.perf_counter() - t0}
    return rec
