"""The funcname task: built deterministically from the stdlib, split by item, sha-pinned; a user's
JSONL task with line-numbered errors; the exact-match metric with aliases and format_valid."""

import json
import platform

import pytest

from edgellm.lora import task as T
from edgellm.lora.task import (
    Item,
    TaskError,
    first_sentence,
    load_task,
    normalise,
    parse_jsonl,
    score,
)


@pytest.mark.fast
def test_first_sentence_skips_signatures_and_joins_lines():
    assert first_sentence("sin(x)\n\nReturn the sine of x (measured in radians).") == \
        "Return the sine of x (measured in radians)."
    assert first_sentence("Join two paths,\ninserting '/' as needed. More text.") == \
        "Join two paths, inserting '/' as needed."
    assert first_sentence("f(a, b)") is None


@pytest.mark.fast
@pytest.mark.parametrize("text,want", [
    ("os.path.join", "os.path.join"), ("  `os.path.join`\nexplanation", "os.path.join"),
    ("os.path.join(a, b)", "os.path.join"), ("builtins.len", "len"), ('"math.sin".', "math.sin"),
    ("The function is os.path.join", "The function is os.path.join"),
])
def test_normalise(text, want):
    assert normalise(text) == want


@pytest.mark.fast
def test_score_counts_any_alias_and_format():
    items = [Item("Join paths.", "os.path.join", "test", ["posixpath.join"]),
             Item("Length.", "len", "test"), Item("Sine.", "math.sin", "test")]
    s = score(["posixpath.join", "builtins.len", "the sine function"], items)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["n_test"] == 3
    assert s["format_valid"] == pytest.approx(2 / 3)
    assert s["accuracy_se"] == pytest.approx((2 / 3 * 1 / 3 / 3) ** 0.5)
    assert s["correct"] == [True, True, False]


@pytest.mark.fast
@pytest.mark.parametrize("line,reason", [
    ("{not json", "line 2: not JSON"),
    ('["a", "b"]', "line 2: a JSON list"),
    ('{"prompt": "p", "split": "train"}', "line 2: 'answer' is missing"),
    ('{"prompt": "p", "answer": "a", "split": "dev"}', "line 2: split 'dev'"),
    ('{"prompt": "p", "answer": "a", "split": "test", "aliases": "b"}', "line 2: 'aliases'"),
])
def test_malformed_task_file_names_line_and_reason(tmp_path, line, reason):
    good = json.dumps({"prompt": "Add two numbers.", "answer": "operator.add", "split": "train"})
    path = tmp_path / "task.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(TaskError, match=reason):
        load_task(str(path))


@pytest.mark.fast
def test_user_task_loads(tmp_path):
    rows = [{"prompt": "Add two numbers.", "answer": "operator.add", "split": "train"},
            {"prompt": "Sine of x.", "answer": "math.sin", "split": "test", "aliases": ["cmath.sin"]}]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = load_task(str(path))
    assert [it.split for it in t.items] == ["train", "test"] and t.dotted_names
    assert t.split("test")[0].aliases == ["math.sin", "cmath.sin"]
    assert t.subset("test", 1) == t.split("test") and t.subset("train") == t.split("train")
    with pytest.raises(TaskError, match="unknown task"):
        load_task("nonesuch")
    with pytest.raises(TaskError, match="no items"):
        parse_jsonl("\n\n", "empty.jsonl")


@pytest.fixture(scope="module")
def funcname(tmp_path_factory):
    # built from the stdlib, no model: a cache of its own keeps it in the fast tier
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_task("funcname")


@pytest.mark.skipif(platform.python_version() != T._registry()["sha256"]["python"],
                    reason="the pinned funcname task is built by another Python")
def test_funcname_is_pinned_split_by_item_and_big_enough(funcname):
    pinned = T._registry()["sha256"]
    assert funcname.sha256 == pinned["all"]
    train, test = funcname.split("train"), funcname.split("test")
    assert len(train) >= 1000 and len(test) >= 500
    assert {"all": len(funcname.items), "train": len(train), "test": len(test)} == pinned["items"]
    assert not {it.prompt for it in train} & {it.prompt for it in test}
    by_prompt = {it.prompt: it for it in funcname.items}
    join = next(it for it in funcname.items if it.answer == "os.path.join")
    assert "posixpath.join" in join.aliases
    assert all(T.NAME.match(a) for it in funcname.items for a in it.aliases)
    assert len(by_prompt) == len(funcname.items)            # identical prompts merged
    sample = funcname.subset("test", 120)                    # spread over the alphabet
    assert len(sample) == 120 and len({it.prompt[0] for it in sample}) > 10


@pytest.mark.skipif(platform.python_version() != T._registry()["sha256"]["python"],
                    reason="the pinned funcname task is built by another Python")
def test_funcname_build_is_reproducible(tmp_path):
    a = T.build_funcname_file(tmp_path / "a.jsonl").read_text()
    assert T.sha256_text(a) == T._registry()["sha256"]["all"]


def test_a_different_stdlib_is_a_clear_error(monkeypatch, tmp_path):
    from edgellm import paths

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    monkeypatch.delenv("EDGELLM_FUNCNAME_UNPINNED", raising=False)
    path = T.funcname_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"prompt": "x y z", "answer": "a.b", "split": "test"}) + "\n")
    with pytest.raises(TaskError, match="EDGELLM_FUNCNAME_UNPINNED=1.*--task PATH"):
        T.load_funcname()
    assert not path.exists()                                   # rebuilt next time
    path.write_text(json.dumps({"prompt": "x y z", "answer": "a.b", "split": "test"}) + "\n")
    monkeypatch.setenv("EDGELLM_FUNCNAME_UNPINNED", "1")
    assert len(T.load_funcname().items) == 1
    assert paths.cache_dir() == tmp_path


@pytest.mark.fast
def test_funccall_lists_the_answer_among_same_split_candidates():
    from edgellm.lora.funccall import N_CANDIDATES, funccall_items

    base = [Item(f"Description {i}.", name, split) for i, (name, split) in enumerate([
        ("os.path.join", "train"), ("os.path.split", "train"), ("os.getcwd", "train"),
        ("math.sin", "train"), ("json.dumps", "train"), ("re.sub", "train"), ("len", "train"),
        ("os.path.basename", "test"), ("math.cos", "test"), ("json.loads", "test"),
        ("re.match", "test"), ("str.split", "test"), ("zlib.crc32", "test")])]
    items = funccall_items(base)
    assert [it.answer for it in items] == [it.answer for it in base]   # same answers, splits
    assert [it.split for it in items] == [it.split for it in base]
    names = {s: {it.answer for it in base if it.split == s} for s in ("train", "test")}
    for it in items:
        listed = it.prompt.splitlines()[0].removeprefix("Functions: ").split(", ")
        assert len(listed) == N_CANDIDATES == len(set(listed)) and it.answer in listed
        assert set(listed) <= names[it.split]          # no name of the other split is listed
        assert it.prompt.endswith(f"Which one: {base[items.index(it)].prompt}")
    join = next(it for it in items if it.answer == "os.path.join")
    listed = join.prompt.splitlines()[0].split(": ")[1].split(", ")
    assert {"os.path.split", "os.getcwd"} <= set(listed)           # same module first
    assert funccall_items(base) == items                           # seeded: the same every time


@pytest.mark.skipif(platform.python_version() != T._registry()["sha256"]["python"],
                    reason="the pinned funcname task is built by another Python")
def test_funccall_is_pinned(funcname, monkeypatch):
    from edgellm.lora.funccall import INSTRUCTION

    monkeypatch.setattr(T, "load_funcname", lambda: funcname)
    task = T.load_funccall()
    assert task.sha256 == T._registry()["sha256"]["funccall"]
    assert task.instruction == INSTRUCTION and len(task.split("test")) == 543
