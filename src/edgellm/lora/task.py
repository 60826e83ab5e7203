"""A fine-tuning task with a generation-based metric: name the standard-library function.

``funcname`` (function calling from a description, as in Octopus v2, Chen & Li 2024): the prompt
is the first sentence of a Python standard-library callable's docstring, the answer its dotted
name::

    prompt  "Join two or more pathname components, inserting '/' as needed."
    answer  "os.path.join"          (aliases: "posixpath.join")

Built from the running interpreter, on every machine, by :func:`build_funcname`: the public
functions, classes and methods of the fixed module list :data:`MODULES` (names starting with
``_``, exceptions, undocumented objects and docstrings mentioning "deprecated" are skipped).
Every dotted name bound to the same object is an alias (``os.remove`` = ``posix.remove``;
``builtins.`` is dropped: ``len``, ``str.split``).  Objects whose first sentences are identical
become one item whose aliases are all their names, so no prompt is in both splits.  The split is
by item: an item is ``test`` when the first byte of sha256(prompt) is below 52 (about 20 %).

The standard library differs between Python versions and platforms, so the built file's sha256
is pinned in ``datasets/registry.json`` (with the Python it was built with) and checked; a
different stdlib is an error that says how to go on (``$EDGELLM_FUNCNAME_UNPINNED=1``, or your
own task with ``--task PATH``).

A user's task is a JSONL file, one ``{"prompt": str, "answer": str, "split": "train"|"test"}``
per line (optional ``"aliases": [str, ...]``); a malformed line is an error naming the line.

Metric: ``accuracy`` = exact match of the normalised generation (first line, whitespace,
backticks and quotes, a trailing call ``(...)`` and a leading ``builtins.`` removed) with any
alias; ``format_valid`` = the normalised generation is a dotted name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import EdgeLLMError

TASKS = ("funccall", "funcname")
SPLITS = ("train", "test")
TEST_BYTE = 52  # an item is in test when sha256(prompt)[0] < 52: ~20 % of the items

# Cross-platform, non-deprecated modules (no posix-/windows-only modules such as pwd, fcntl,
# winreg; no modules deprecated in 3.11 such as imghdr, cgi, asynchat).
MODULES = (
    "abc argparse array ast asyncio base64 binascii bisect builtins bz2 calendar cmath code codecs "
    "collections colorsys concurrent.futures configparser contextlib copy cProfile csv dataclasses "
    "datetime decimal difflib dis doctest email.message email.utils enum filecmp fileinput fnmatch "
    "fractions ftplib functools gc getopt getpass gettext glob graphlib gzip hashlib heapq hmac "
    "html http.client importlib importlib.util inspect io ipaddress itertools json keyword "
    "linecache locale logging lzma marshal math mimetypes multiprocessing numbers operator os "
    "os.path pathlib pickle pkgutil platform plistlib pprint pstats queue quopri random re "
    "reprlib runpy sched secrets select selectors shlex shutil signal smtplib socket sqlite3 stat "
    "statistics string struct subprocess sys sysconfig tarfile tempfile textwrap threading time "
    "timeit token tokenize trace traceback types typing unicodedata unittest urllib.parse "
    "urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib "
    "zoneinfo"
).split()

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")     # "sin(x)" lines some C docstrings start with
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"])\.(\s|$)")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class TaskError(EdgeLLMError, ValueError):
    """An unknown task, a malformed task file, or a task built from a different stdlib."""


@dataclass
class Item:
    """One example: ``prompt``, the canonical ``answer``, every correct ``aliases`` (answer
    included) and its ``split`` (``train`` or ``test``)."""

    prompt: str
    answer: str
    split: str
    aliases: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.answer not in self.aliases:
            self.aliases = [self.answer, *self.aliases]


@dataclass
class Task:
    """A task: its ``name`` (what ``--task`` accepts), items, the sha256 of its file, whether
    answers are dotted names (then ``format_valid`` checks that form), and the instruction the
    instructed prompt styles use as system prompt."""

    name: str
    items: list[Item]
    sha256: str
    dotted_names: bool = True
    instruction: str | None = None   # the system prompt of the instructed styles (None: funcname's)

    def split(self, split: str) -> list[Item]:
        return [it for it in self.items if it.split == split]

    def subset(self, split: str, n: int | None = None) -> list[Item]:
        """The first ``n`` items of ``split`` in sha256(prompt) order: a fixed pseudo-random
        sample (the file is sorted by prompt, so its first items are not representative)."""
        items = self.split(split)
        if not n:
            return items
        return sorted(items, key=lambda it: sha256_text(it.prompt))[:n]


# --------------------------------------------------------------------------------------------
# building funcname from the running interpreter


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring, on one line (signature lines skipped)."""
    paras = doc.strip().split("\n\n")
    while paras and all(_SIGNATURE.match(ln.strip()) for ln in paras[0].splitlines() if ln.strip()):
        paras = paras[1:]
    if not paras:
        return None
    text = " ".join(paras[0].split())
    m = _SENTENCE_END.search(text)
    return text[:m.start() + 1] if m else text


def _public_objects(modname: str, module) -> list[tuple[str, object]]:
    """(dotted name, object) of the public functions, classes and class methods of a module:
    names in ``__all__`` when it has one, else objects defined in the module itself."""
    import inspect

    out = []
    public = getattr(module, "__all__", None)
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        is_class = inspect.isclass(obj)
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)
                                        or is_class):
            continue
        if is_class and issubclass(obj, BaseException):
            continue
        if (name not in public) if public is not None else (
                getattr(obj, "__module__", None) != modname):
            continue
        out.append((f"{modname}.{name}", obj))
        if is_class:
            for attr, member in sorted(vars(obj).items()):
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if not attr.startswith("_") and inspect.isroutine(member):
                    out.append((f"{modname}.{name}.{attr}", member))
    return out


def _short(name: str) -> str:
    return name.removeprefix("builtins.")


def build_funcname() -> list[dict]:
    """Build the ``funcname`` items from this interpreter's standard library (deterministic for
    one Python build): ``[{"prompt", "answer", "aliases", "split"}, ...]`` sorted by prompt."""
    import importlib
    import inspect
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = {m: importlib.import_module(m) for m in MODULES}
    names: dict[int, list[str]] = {}
    objects: dict[int, object] = {}
    for modname, module in modules.items():
        for dotted, obj in _public_objects(modname, module):
            names.setdefault(id(obj), []).append(_short(dotted))
            objects[id(obj)] = obj
    by_prompt: dict[str, list[str]] = {}
    for key, obj in objects.items():
        home = f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', '')}"
        owner = sys.modules.get(getattr(obj, "__module__", None) or "")
        if ("." not in getattr(obj, "__qualname__", ".") and owner is not None
                and not home.startswith("_") and getattr(owner, obj.__qualname__, None) is obj):
            names[key].append(_short(home))         # where it is defined: posixpath.join
        doc = inspect.getdoc(obj)
        if not doc or "deprecated" in doc.lower():
            continue
        prompt = first_sentence(doc)
        if prompt is None or not 15 <= len(prompt) <= 200:
            continue
        by_prompt.setdefault(prompt, []).extend(names[key])
    items = []
    for prompt in sorted(by_prompt):
        aliases = list(dict.fromkeys(by_prompt[prompt]))     # first-seen order, no repeats
        test = hashlib.sha256(prompt.encode("utf-8")).digest()[0] < TEST_BYTE
        items.append({"prompt": prompt, "answer": aliases[0], "aliases": aliases,
                      "split": "test" if test else "train"})
    return items


def items_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(it, sort_keys=True, ensure_ascii=False) + "\n" for it in items)


def build_funcname_file(path: str | os.PathLike) -> Path:
    """Build ``funcname`` in a fresh interpreter (``python -I``: no module imported before it
    changes the result) and write it (atomically) to ``path``."""
    from edgellm.records import write_text

    code = "import sys; from edgellm.lora.task import build_funcname, items_jsonl; " \
           "sys.stdout.write(items_jsonl(build_funcname()))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         encoding="utf-8", env=env, check=False)
    if out.returncode != 0:
        raise TaskError(f"building the funcname task failed:\n{out.stderr[-2000:]}")
    return write_text(out.stdout, path)


# --------------------------------------------------------------------------------------------
# loading


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_jsonl(text: str, source: str) -> list[Item]:
    """Items of a task file; a malformed line raises :class:`TaskError` naming line and reason."""
    items = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}, line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not JSON ({e.msg}); each line must be an object "
                            '{"prompt": ..., "answer": ..., "split": "train" or "test"}') from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: a JSON {type(obj).__name__}, not an object with prompt, "
                            "answer and split")
        for key in ("prompt", "answer", "split"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise TaskError(f"{where}: {key!r} is missing or not a non-empty string")
        if obj["split"] not in SPLITS:
            raise TaskError(f"{where}: split {obj['split']!r}; use one of {', '.join(SPLITS)}")
        aliases = obj.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise TaskError(f"{where}: 'aliases' must be a list of strings")
        items.append(Item(obj["prompt"], obj["answer"], obj["split"], list(aliases)))
    if not items:
        raise TaskError(f"{source}: no items; give one JSON object per line")
    return items


def _registry() -> dict:
    from edgellm.data import corpus_info

    return corpus_info("funcname")


def funcname_path() -> Path:
    """The built ``funcname`` file in the cache (built on first use)."""
    from edgellm.paths import cache_dir

    return cache_dir() / "tasks" / f"funcname-py{sys.version_info[0]}{sys.version_info[1]}.jsonl"


def load_funcname(*, verify: bool | None = None) -> Task:
    """The ``funcname`` task: built into the cache once, its sha256 checked against the registry
    (unless ``verify`` is False or ``$EDGELLM_FUNCNAME_UNPINNED`` is set)."""
    import platform

    path = funcname_path()
    if not path.is_file():
        build_funcname_file(path)
    text = path.read_text(encoding="utf-8")
    sha = sha256_text(text)
    pinned = _registry()["sha256"]
    if verify is None:
        verify = not os.environ.get("EDGELLM_FUNCNAME_UNPINNED")
    if verify and sha != pinned["all"]:
        path.unlink()  # rebuilt next time (e.g. after the interpreter changed)
        raise TaskError(
            f"the funcname task built from this Python's standard library "
            f"({platform.python_version()}, {platform.system()}) has sha256 {sha[:12]}…, but "
            f"the recorded results used the one built by Python {pinned['python']} on "
            f"{pinned['platform']} ({pinned['all'][:12]}…). Run under that Python, set "
            "EDGELLM_FUNCNAME_UNPINNED=1 to use this build anyway (results record its "
            "task_sha256), or pass your own task file with --task PATH")
    return Task("funcname", parse_jsonl(text, str(path)), sha)


def load_funccall() -> Task:
    """The ``funccall`` task (:mod:`edgellm.lora.funccall`), built from the pinned ``funcname``;
    its own sha256 is checked too."""
    from edgellm.lora.funccall import INSTRUCTION, funccall_items

    items = funccall_items(load_funcname().items)
    text = items_jsonl([{"prompt": it.prompt, "answer": it.answer, "aliases": it.aliases,
                         "split": it.split} for it in items])
    sha = sha256_text(text)
    pinned = _registry()["sha256"].get("funccall")
    if pinned and sha != pinned and not os.environ.get("EDGELLM_FUNCNAME_UNPINNED"):
        raise TaskError(f"the funccall task built here has sha256 {sha[:12]}…, not the pinned "
                        f"{pinned[:12]}… (edgellm.lora.funccall changed?); set "
                        "EDGELLM_FUNCNAME_UNPINNED=1 to use it anyway")
    return Task("funccall", items, sha, instruction=INSTRUCTION)


def load_task(task: str) -> Task:
    """A task by name (``funccall``, ``funcname``) or the path of a JSONL task file."""
    if task == "funccall":
        return load_funccall()
    if task in TASKS:
        return load_funcname()
    path = Path(task).expanduser()
    if not path.is_file():
        raise TaskError(f"unknown task {task!r}; use {', '.join(TASKS)} or the path of a JSONL "
                        'file of {"prompt", "answer", "split"} lines')
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{task}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    items = parse_jsonl(text, task)
    dotted = all(NAME.match(a) for it in items for a in it.aliases)
    return Task(str(path), items, sha256_text(text), dotted_names=dotted)


# --------------------------------------------------------------------------------------------
# scoring


def normalise(text: str) -> str:
    """The answer in a generation: first non-empty line, without backticks, quotes, a trailing
    call ``(...)``, a final period or a leading ``builtins.``."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    s = lines[0] if lines else ""
    s = s.strip().strip("`'\"").strip()
    s = re.sub(r"\(.*\)$", "", s).rstrip(".").strip().strip("`'\"").strip()
    return _short(s)


def is_valid(text: str, *, dotted_names: bool = True) -> bool:
    """``format_valid`` of one normalised generation."""
    return bool(NAME.match(text)) if dotted_names else bool(text)


def score(generations: list[str], items: list[Item], *, dotted_names: bool = True) -> dict:
    """``accuracy`` (exact match with any alias), its standard error, ``format_valid``, ``n_test``."""
    import math

    if len(generations) != len(items):
        raise TaskError(f"{len(generations)} generations for {len(items)} items")
    preds = [normalise(g) for g in generations]
    hits = [p in {_short(a) for a in it.aliases} for p, it in zip(preds, items, strict=True)]
    n = len(items)
    acc = sum(hits) / n if n else 0.0
    return {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n) if n else 0.0,
            "format_valid": sum(is_valid(p, dotted_names=dotted_names) for p in preds) / max(n, 1),
            "n_test": n, "correct": hits}


if __name__ == "__main__":  # python -m edgellm.lora.task OUT.jsonl
    build_funcname_file(sys.argv[1])
