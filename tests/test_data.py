"""Corpora, splits and calibration windows."""

import platform

import pytest
import torch

from edgellm.data import (
    CorpusError,
    corpus_info,
    corpus_names,
    get_calibration,
    load_text,
    pydoc_text,
    sha256_text,
)


def test_registry_lists_corpora():
    assert {"pydoc", "stdlib", "wikitext2"} <= set(corpus_names())


def test_pydoc_splits_are_deterministic_contiguous_and_cover_the_text():
    parts = [load_text("pydoc", s) for s in ("train", "validation", "test")]
    whole = pydoc_text()
    assert "\n\n".join(parts) == whole  # cut at paragraph breaks, nothing lost
    fractions = [len(p) / len(whole) for p in parts]
    assert fractions[0] == pytest.approx(0.8, abs=0.02) and fractions[2] == pytest.approx(0.1, abs=0.02)
    assert sha256_text(load_text("pydoc", "test")) == sha256_text(parts[2])


def test_unknown_corpus_and_split():
    with pytest.raises(CorpusError, match="unknown corpus 'wiki'; registered corpora: pydoc, stdlib, wikitext2"):
        load_text("wiki")
    with pytest.raises(CorpusError, match="unknown split 'dev'"):
        load_text("pydoc", "dev")


def test_user_text_file(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("my own text, ünïcode")
    assert load_text(str(p), "test") == "my own text, ünïcode"


def test_wikitext2_from_a_local_file(tmp_path, monkeypatch):
    (tmp_path / "wiki.test.raw").write_text(" = Valkyria Chronicles = \n")
    monkeypatch.setenv("EDGELLM_WIKITEXT2", str(tmp_path))
    load_text.cache_clear()
    assert load_text("wikitext2", "test").startswith(" = Valkyria")
    monkeypatch.setenv("EDGELLM_WIKITEXT2", str(tmp_path / "nope.raw"))
    load_text.cache_clear()
    with pytest.raises(CorpusError, match="is not a file"):
        load_text("wikitext2", "test")


def test_wikitext2_offline_says_what_to_do(monkeypatch):
    monkeypatch.delenv("EDGELLM_WIKITEXT2", raising=False)
    load_text.cache_clear()
    with pytest.raises(CorpusError, match="set EDGELLM_WIKITEXT2"):
        load_text("wikitext2", "test")


@pytest.mark.integration
def test_calibration_windows_are_reproducible_and_from_train(default_model):
    _, tok = default_model
    a = get_calibration("pydoc", n_samples=4, seq_len=32, seed=0, tokenizer=tok)
    b = get_calibration("pydoc", n_samples=4, seq_len=32, seed=0, tokenizer=tok)
    c = get_calibration("pydoc", n_samples=4, seq_len=32, seed=1, tokenizer=tok)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    train = tok(load_text("pydoc", "train"), add_special_tokens=False)["input_ids"]
    s = " ".join(map(str, train))
    for row in a.tolist():
        assert " ".join(map(str, row)) in s
    with pytest.raises(CorpusError, match="needs at least"):
        get_calibration("pydoc", n_samples=1, seq_len=10**6, tokenizer=tok)


def _fake_stdlib(tmp_path, monkeypatch, files):
    """A stdlib folder in tmp_path holding ``files`` {path: text}, pinned in a fake registry."""
    from edgellm import data

    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    entry = {"files": list(files), "sha256": {"python": "3.11.7",
                                              "files": {r: sha256_text(t) for r, t in files.items()}}}
    monkeypatch.setattr(data, "corpus_info", lambda name: entry)
    monkeypatch.delenv("EDGELLM_STDLIB_UNPINNED", raising=False)
    return entry


def test_stdlib_text_joins_the_listed_files_in_order(tmp_path, monkeypatch):
    from edgellm.data import stdlib_text

    _fake_stdlib(tmp_path, monkeypatch, {"b.py": "x = 1\n", "json/a.py": "def f():\n    pass\n"})
    assert stdlib_text(tmp_path) == "# file: b.py\nx = 1\n\n\n# file: json/a.py\ndef f():\n    pass\n"


def test_stdlib_hash_mismatch_and_missing_file_are_clear_errors(tmp_path, monkeypatch):
    from edgellm.data import stdlib_text

    _fake_stdlib(tmp_path, monkeypatch, {"a.py": "a = 1\n", "b.py": "b = 2\n"})
    (tmp_path / "b.py").write_text("b = 3\n")  # a different Python's version of the file
    with pytest.raises(CorpusError, match=r"pinned to the files of Python 3\.11\.7, but 1 of 2 "
                                          r"differ .*: b\.py\. .*EDGELLM_STDLIB_UNPINNED=1"):
        stdlib_text(tmp_path)
    assert stdlib_text(tmp_path, verify=False).endswith("b = 3\n")
    monkeypatch.setenv("EDGELLM_STDLIB_UNPINNED", "1")
    assert stdlib_text(tmp_path).endswith("b = 3\n")
    (tmp_path / "a.py").unlink()
    with pytest.raises(CorpusError, match=r"needs a\.py, which is not in"):
        stdlib_text(tmp_path)


def test_stdlib_registry_lists_pure_python_modules():
    from edgellm.data import corpus_info

    info = corpus_info("stdlib")
    assert len(info["files"]) >= 20 and len(set(info["files"])) == len(info["files"])
    assert all(f.endswith(".py") for f in info["files"])
    assert set(info["sha256"]["files"]) == set(info["files"])


@pytest.mark.skipif(platform.python_version() != corpus_info("stdlib")["sha256"]["python"],
                    reason="the stdlib corpus is pinned to another Python version")
def test_stdlib_corpus_matches_its_pinned_hash_and_splits():
    info = corpus_info("stdlib")["sha256"]
    load_text.cache_clear()
    whole = load_text("stdlib", "all")
    assert sha256_text(whole) == info["all"]
    parts = [load_text("stdlib", s) for s in ("train", "validation", "test")]
    assert "\n\n".join(parts) == whole
    assert {s: len(p) for s, p in zip(("train", "validation", "test"), parts, strict=True)} == \
        {k: v for k, v in info["chars"].items() if k != "all"}
    assert "# file: argparse.py\n" in parts[0] and "def " in parts[2]  # code, not prose
