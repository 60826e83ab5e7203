"""The grader of lab 13's open task: a pipeline recipe that meets a device budget.

The recipe is checked first (YAML, known steps, each step's input the previous step's output:
seconds); with ``measure`` it is run (or its cached outputs reused) and its exported GGUF graded
by :func:`edgellm.pipeline.apply.grade`, which measures size, perplexity, task accuracy and
decode speed on the file itself.  ``value`` is the number of budget criteria the file misses
(target 0); the leaderboard score is in ``details``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from edgellm.course.labchecks import Verdict
from edgellm.errors import EdgeLLMError


def recipe_task(text: str, *, budget: str = "phone", measure: bool = True,
                progress: bool = False) -> Verdict:
    """Grade a recipe given as YAML text against ``budget``."""
    from edgellm.pipeline.apply import grade
    from edgellm.pipeline.recipe import load_recipe

    violations, details = [], {}
    with tempfile.TemporaryDirectory(prefix="edgellm-recipe-") as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text or "", encoding="utf-8")
        try:
            recipe = load_recipe(path)
        except EdgeLLMError as e:
            return Verdict("recipe under a budget", math.nan, 0.0, 0.0,
                           [str(e).replace(str(path), "the recipe")])
    details["steps"] = " → ".join(s["kind"] for s in recipe["steps"])
    if not measure:
        return Verdict("recipe under a budget", math.nan, 0.0, 0.0, violations,
                       {**details, "measured": "no (FAST mode: the recipe is only checked)"})
    rec = grade(recipe, budget=budget, progress=progress)
    missed = [k for k, row in rec["verdicts"].items() if not row["ok"]]
    details.update(size_mib=rec["size_bytes"] / 2**20, ppl=rec["ppl"],
                   ppl_ratio=rec["ppl"] / rec["ppl_base"], accuracy=rec["accuracy"],
                   accuracy_base=rec["accuracy_base"],
                   decode_tokens_per_s=rec["decode_tokens_per_s"], score=rec["score"],
                   missed=", ".join(missed) or "none")
    return Verdict("recipe under a budget", float(len(missed)), 0.0, float(len(rec["verdicts"])),
                   violations, details)
