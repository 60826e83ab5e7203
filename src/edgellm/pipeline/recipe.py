"""Recipes: a YAML or JSON file that chains the course's tools, checked before anything runs.

::

    name: phone
    budget: phone                 # the budget `grade` checks when --budget is not given
    model: smollm2-135m           # where the chain starts (a Hugging Face model: `hf`)
    seed: 0
    steps:
      - kind: distill             # hf -> hf: prune MLP channels, recover by KD from the teacher
        student: channels
        ratio: 0.3
      - kind: lora                # hf -> hf: a task adapter, merged into the weights
        task: funccall
      - kind: export              # hf -> gguf: llama.cpp's converter + llama-quantize
        type: Q4_0
        token_embedding_type: Q4_0
      - kind: bench               # gguf -> gguf (the same file): decode speed in llama.cpp

Every step kind says what it takes and what it gives (:data:`KINDS`): a Hugging Face model
folder (``hf``), a folder of our quantizer's codes (``quantized``, what ``edgellm quantize --out``
writes) or a GGUF file (``gguf``).  :func:`check_recipe` fills every setting's default, rejects
an unknown step kind or setting, and a step that cannot take what the step before it gives.

The recipe's hash (:func:`recipe_hash`) is the sha256 of the canonical JSON of the checked recipe
(defaults filled in) and the package version: any setting changes it, while ``name``,
``description`` and ``budget`` (which change no output) do not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.pipeline.errors import PipelineError


@dataclass(frozen=True)
class StepKind:
    """A step kind: what it ``takes`` (one of ``hf``, ``quantized``, ``gguf``), what it
    ``gives``, its settings with their defaults, and ``passthrough`` when it gives its input on
    unchanged (a measurement)."""

    takes: tuple[str, ...]
    gives: str
    settings: dict = field(default_factory=dict)
    passthrough: bool = False
    about: str = ""


ARTIFACTS = {"hf": "Hugging Face model folder", "quantized": "folder of quantized codes "
             "(edgellm quantize --out)", "gguf": "GGUF file"}

KINDS: dict[str, StepKind] = {
    "prune": StepKind(("hf",), "hf", {
        "method": "wanda", "structured": "channels", "ratio": 0.3, "sparsity": None,
        "calib": "pydoc", "n_samples": 8, "seq_len": 256, "recover_steps": 0,
        "recover_batch": 2, "recover_seq_len": 256}, about="edgellm prune (structured)"),
    "distill": StepKind(("hf",), "hf", {
        "student": "channels", "ratio": 0.3, "loss": "fkl", "steps": 40, "batch_size": 4,
        "seq_len": 256, "lr": 1e-4, "temperature": 1.0, "calib": "pydoc", "n_samples": 8,
        "calib_seq_len": 256, "train_data": "pydoc"}, about="edgellm distill"),
    "lora": StepKind(("hf",), "hf", {
        "task": "funccall", "rank": 8, "targets": "all", "steps": 60, "lr": 1e-3,
        "batch_size": 8, "seq_len": 128}, about="edgellm finetune --method lora, merged"),
    "quantize": StepKind(("hf",), "quantized", {
        "method": "gptq", "bits": 4, "group_size": 32, "sym": True, "calib": "pydoc",
        "n_samples": 8, "seq_len": 512}, about="edgellm quantize --out"),
    "qat": StepKind(("hf",), "quantized", {
        "bits": 4, "group_size": 32, "steps": 40, "batch_size": 4, "seq_len": 256,
        "lr": 5e-5}, about="edgellm qat --out"),
    "export": StepKind(("hf", "quantized"), "gguf", {
        "type": "Q4_0", "token_embedding_type": None, "imatrix_calib": None,
        "imatrix_chunks": 128}, about="edgellm export --format gguf"),
    "bench": StepKind(("gguf",), "gguf", {
        "threads": 2, "prompt_tokens": 128, "gen_tokens": 128, "repeats": 3},
        passthrough=True, about="edgellm bench-runtime --runtime llamacpp"),
}

TOP_KEYS = {"name": None, "description": "", "budget": None, "model": "smollm2-135m",
            "seed": 0, "steps": None}
NOT_HASHED = ("name", "description", "budget")  # they change no output
# in FAST mode every training step count is capped here (the lesson's notebook budget)
FAST_CAPS = {"steps": 2, "recover_steps": 2, "imatrix_chunks": 4, "n_samples": 2,
             "repeats": 1, "gen_tokens": 16}


def load_recipe(path) -> dict:
    """The recipe in ``path`` (``.yaml``, ``.yml`` or ``.json``), parsed and checked."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PipelineError(f"{path}: no such recipe file; give a .yaml or .json recipe "
                            "(recipes/phone.yaml is the reference)")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PipelineError(f"{path}: not valid JSON ({e})") from None
    elif p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise PipelineError(f"{path}: not valid YAML{at} "
                                f"({getattr(e, 'problem', None) or e})") from None
    else:
        raise PipelineError(f"{path}: a recipe is a .yaml, .yml or .json file")
    recipe = check_recipe(data, source=str(path))
    if recipe["name"] is None:
        recipe["name"] = p.stem
    return recipe


def _check_value(where: str, key: str, value, default):
    """``value`` has the type of ``default`` (an int where a float is expected is fine)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise PipelineError(f"{where}: {key}={value!r} should be a {type(default).__name__} "
                            f"(default {default!r})")
    return value


def check_recipe(data, *, source: str = "recipe") -> dict:
    """The recipe ``data`` (a parsed dict) checked, with every default filled in."""
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: a recipe is a mapping with 'model' and 'steps' "
                            f"(got {type(data).__name__})")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise PipelineError(f"{source}: unknown key {unknown[0]!r}; a recipe has "
                            f"{', '.join(TOP_KEYS)}")
    recipe = {k: data.get(k, v) for k, v in TOP_KEYS.items()}
    if not isinstance(recipe["model"], str) or not recipe["model"]:
        raise PipelineError(f"{source}: model must be a registry name or a model folder")
    _check_value(source, "seed", recipe["seed"], 0)
    steps = recipe["steps"]
    if not isinstance(steps, list) or not steps:
        raise PipelineError(f"{source}: steps must be a non-empty list of steps, each with "
                            f"a kind ({', '.join(KINDS)})")
    if recipe["budget"] is not None:
        from edgellm.pipeline.budgets import get_budget

        get_budget(recipe["budget"])
    checked, gives, prev = [], "hf", "the recipe's model"
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict) or "kind" not in step:
            raise PipelineError(f"{source}: step {i} must be a mapping with a 'kind' "
                                f"({', '.join(KINDS)})")
        kind = step["kind"]
        if kind not in KINDS:
            raise PipelineError(f"{source}: step {i} has unknown kind {kind!r}; known kinds: "
                                f"{', '.join(KINDS)}")
        spec = KINDS[kind]
        where = f"{source}: step {i} ({kind})"
        if gives not in spec.takes:
            raise PipelineError(
                f"{where} takes a {' or '.join(ARTIFACTS[t] for t in spec.takes)}, but "
                f"{prev} gives a {ARTIFACTS[gives]} ({gives}); reorder the steps")
        bad = sorted(set(step) - {"kind"} - set(spec.settings))
        if bad:
            raise PipelineError(f"{where}: unknown setting {bad[0]!r}; its settings: "
                                f"{', '.join(spec.settings)}")
        settings = {k: _check_value(where, k, step.get(k, d), d) for k, d in spec.settings.items()}
        check_settings(kind, settings, where)
        checked.append({"kind": kind, **settings})
        gives, prev = spec.gives, f"step {i} ({kind})"
    recipe["steps"] = checked
    return recipe


def check_settings(kind: str, s: dict, where: str) -> None:
    """The values a technique would reject after minutes of work, rejected now."""
    for key in ("steps", "batch_size", "seq_len", "n_samples", "rank", "threads",
                "prompt_tokens", "gen_tokens", "repeats", "imatrix_chunks"):
        if key in s and s[key] is not None and s[key] < 1:
            raise PipelineError(f"{where}: {key}={s[key]} must be >= 1")
    if kind in ("distill", "prune") and s.get("ratio") is not None and not 0 < s["ratio"] < 1:
        raise PipelineError(f"{where}: ratio={s['ratio']} must be in (0, 1)")
    if kind == "export":
        from edgellm.deploy.export import CONVERTER_TYPES
        from edgellm.deploy.llamacpp_quant import QUANT_TYPES, TENSOR_TYPES

        known = (*CONVERTER_TYPES, *QUANT_TYPES)
        if str(s["type"]).upper() not in known:
            raise PipelineError(f"{where}: type={s['type']!r}; use one of {', '.join(known)}")
        t = s["token_embedding_type"]
        if t is not None and str(t).upper() not in TENSOR_TYPES:
            raise PipelineError(f"{where}: token_embedding_type={t!r}; use one of "
                                f"{', '.join(TENSOR_TYPES)}")
    if kind in ("quantize", "qat") and s["bits"] not in (2, 3, 4, 8):
        raise PipelineError(f"{where}: bits={s['bits']}; use 2, 3, 4 or 8")


def fast_recipe(recipe: dict) -> dict:
    """The same recipe with every step count, sample count and repeat capped
    (:data:`FAST_CAPS`): what FAST mode runs (its hash differs, so nothing is mixed up)."""
    steps = [{k: (min(v, FAST_CAPS[k]) if k in FAST_CAPS and isinstance(v, int) else v)
              for k, v in s.items()} for s in recipe["steps"]]
    return {**recipe, "steps": steps, "fast": True}


def recipe_hash(recipe: dict) -> str:
    """sha256 (hex) of the canonical JSON of the checked ``recipe`` and the package version."""
    from importlib import metadata

    try:
        version = metadata.version("edgellm")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree without install
        version = "unknown"
    body = {k: v for k, v in recipe.items() if k not in NOT_HASHED}
    text = json.dumps({"recipe": body, "edgellm": version}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
