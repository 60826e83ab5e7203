"""``funccall``: function calling with the tools in the prompt, built from ``funcname``.

On a device, a function-calling model is shown the functions it may call and picks one (Octopus
v2, Chen & Li 2024, fine-tunes a 2B model to do exactly this).  Each ``funcname`` item becomes ::

    prompt  "Functions: os.path.join, os.path.split, os.path.basename, … (6 in all)
             Which one: Join two or more pathname components, inserting '/' as needed."
    answer  "os.path.join"

The five other candidates are drawn **from the same split** (a test prompt never lists a name
that training taught as an answer, so "pick the unfamiliar name" cannot score), from the same
top-level module first (``os.path.*`` next to ``os.path.join``: hard negatives), then from the
whole split; their order is shuffled.  Every draw is seeded by sha256(prompt), so the task is
fixed once ``funcname`` is (its sha256 is pinned with funcname's in ``datasets/registry.json``).

Why this task and not ``funcname`` itself: naming the function from its description alone needs
the name to be in the model's weights.  SmolLM2-135M rarely has it (1.5 % exact match with the
best prompt), and LoRA on 2,300 examples cannot add the names of 543 unseen functions
(``results/09_funcname.json``).  With the tools listed, the task is the skill LoRA *can* teach:
read the description, match it to a name.  The best-prompted base model (few-shot, grammar-
constrained) picks the right one of six on 20 % of the test items, and LoRA rank 8 after 60 steps
on 45 % (``results/09_task.json``).  ``edgellm.lora.task.load_task("funccall")`` loads it.
"""

from __future__ import annotations

import hashlib
import random

N_CANDIDATES = 6
INSTRUCTION = ("You call Python standard-library functions. Given a list of functions and a "
               "description, reply with the name of the function that does what is described, "
               "and nothing else.")


def candidates(item, pool_by_module: dict[str, list[str]], pool: list[str],
               n: int = N_CANDIDATES) -> list[str]:
    """The ``n`` names listed for ``item``: its answer and ``n - 1`` others of its split (same
    top-level module first), shuffled; seeded by sha256(prompt)."""
    g = random.Random(hashlib.sha256(item.prompt.encode("utf-8")).hexdigest())
    module = item.answer.split(".")[0]
    same = [a for a in pool_by_module.get(module, []) if a not in item.aliases]
    picked = g.sample(same, min(n - 1, len(same)))
    while len(picked) < n - 1:
        c = g.choice(pool)
        if c not in item.aliases and c not in picked:
            picked.append(c)
    names = [*picked, item.answer]
    g.shuffle(names)
    return names


def funccall_items(funcname_items, n: int = N_CANDIDATES) -> list:
    """``funcname`` items with the tool list in the prompt (same answers, aliases, splits; the
    items are of the input's own class, :class:`edgellm.lora.task.Item`)."""
    out = []
    for split in ("train", "test"):
        items = [it for it in funcname_items if it.split == split]
        pool = sorted({it.answer for it in items})
        by_module: dict[str, list[str]] = {}
        for name in pool:
            by_module.setdefault(name.split(".")[0], []).append(name)
        for it in items:
            tools = ", ".join(candidates(it, by_module, pool, n))
            out.append(type(it)(f"Functions: {tools}\nWhich one: {it.prompt}", it.answer, split,
                                list(it.aliases)))
    return out
