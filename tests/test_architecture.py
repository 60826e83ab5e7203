"""The package's structure: no import cycles, imports run one way, small modules, a light import.

Layers (see the README): the shared core imports nothing above it; technique families import
the shared core (and each other), never the CLI, the lessons or the course; ``cli/``,
``lessons/`` and ``course/`` sit on top.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "edgellm"
CORE = {"paths", "errors", "records", "data", "models", "controls", "calib", "hessian", "metrics", "windows", "measure", "allocation", "devices",
        "results", "train"}
FAMILIES = {"quant", "prune", "distill", "lowrank", "lora", "qat", "deploy", "kernels",
            "pipeline"}
TOP = {"cli", "lessons", "course"}
MAX_LINES = 400
WHY_LONG = "over 400 lines because"


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (packages by __init__)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source (top level, inside
    functions, under ``if TYPE_CHECKING``), relative imports resolved.  ``from pkg import x`` is
    an import of ``pkg.x`` when that is a module, else of ``pkg`` (its ``__init__``)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    here = name if is_package(name) else name.rpartition(".")[0]  # the package `.` refers to
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # the longest prefix that is a module of ours: `import a.b.c` loads a.b.c
                for k in range(len(parts), 0, -1):
                    if ".".join(parts[:k]) in MODULES:
                        found.add(".".join(parts[:k]))
                        break
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.add(sub)
                elif target in MODULES:
                    found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Edges ``module -> imported module``.  A module importing its own parent package counts
    (that runs the parent's ``__init__``); a package ``__init__`` importing modules inside its
    own package (its re-exports) does not, since every submodule import runs it anyway."""
    graph = {}
    for name in MODULES:
        edges = imports_of(name)
        if is_package(name):
            edges = {t for t in edges if not t.startswith(name + ".")}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None  # the top package edgellm itself
    if parts[1] in CORE:
        return "core"
    if parts[1] in FAMILIES:
        return "family"
    if parts[1] in TOP:
        return parts[1]
    return None


# --------------------------------------------------------------------------------------------


def test_the_walker_sees_every_kind_of_import():
    """imports_of() on a few real modules: absolute, inside functions, and `from pkg import mod`."""
    graph = import_graph()
    assert "edgellm.hessian" in graph["edgellm.quant.gptq"]           # top-level absolute import
    assert "edgellm.models" in graph["edgellm.cli.core"]              # imported inside a function
    assert "edgellm.quant.gptq" not in graph["edgellm.quant.gptq"]
    assert all(t in MODULES for edges in graph.values() for t in edges)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_one_way():
    """Shared core -> nothing above it; families -> never cli, lessons or course; neither
    imports the top package ``edgellm`` (whose __init__ pulls in the course helpers)."""
    bad = []
    for name, edges in import_graph().items():
        mine = layer(name)
        if mine not in ("core", "family"):
            continue
        forbidden = TOP | ({"family"} if mine == "core" else set())
        for target in sorted(edges):
            theirs = layer(target)
            if target == PACKAGE or theirs in forbidden:
                bad.append(f"{name} ({mine}) imports {target} ({theirs or 'the package'})")
    assert bad == [], "; ".join(bad)


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_are_small_or_say_why(name):
    path = MODULES[name]
    n_lines = len(path.read_text().splitlines())
    if n_lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert WHY_LONG in doc.lower(), (
        f"{path.relative_to(SRC)} has {n_lines} lines: split it, or say in its docstring "
        f"'{WHY_LONG.capitalize()} ...'")


def test_import_edgellm_is_light():
    """``import edgellm`` loads neither bitsandbytes nor torchao nor transformers' model code,
    and installs no logging filters (those are set only when a model is loaded)."""
    code = (
        "import json, logging, sys\n"
        "import edgellm\n"
        "loggers = [logging.root] + [l for l in logging.root.manager.loggerDict.values()\n"
        "                            if isinstance(l, logging.Logger)]\n"
        "print(json.dumps({\n"
        "    'heavy': sorted(m for m in sys.modules\n"
        "                    if m.split('.')[0] in ('bitsandbytes', 'torchao')\n"
        "                    or m.startswith(('transformers.models.', 'transformers.modeling_'))),\n"
        "    'filters': sorted(f'{l.name}: {f!r}' for l in loggers for f in l.filters)\n"
        "                + sorted(f'{l.name} handler: {f!r}' for l in loggers\n"
        "                         for h in l.handlers for f in h.filters),\n"
        "}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], got["heavy"]
    assert got["filters"] == [], got["filters"]


def test_lessons_and_labs_never_import_the_command_line():
    """Notebooks use the library (``edgellm.lessons``, the technique packages); the command line
    is shown as a command, never imported."""
    root = SRC.parent
    offenders = []
    for nb_path in sorted([*root.glob("notebooks/*.ipynb"), *root.glob("solutions/*.ipynb")]):
        cells = json.loads(nb_path.read_text())["cells"]
        for i, cell in enumerate(cells):
            src = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
            if "from edgellm.cli" in src or "import edgellm.cli" in src:
                offenders.append(f"{nb_path.relative_to(root)} cell {i}")
    assert not offenders, f"import the library, not edgellm.cli: {offenders}"
