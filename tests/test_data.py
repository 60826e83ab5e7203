"""Corpora, splits and calibration windows."""

import pytest
import torch

from edgellm.data import (
    CorpusError,
    corpus_names,
    get_calibration,
    load_text,
    pydoc_text,
    sha256_text,
)


def test_registry_lists_corpora():
    assert {"pydoc", "wikitext2"} <= set(corpus_names())


def test_pydoc_splits_are_deterministic_contiguous_and_cover_the_text():
    parts = [load_text("pydoc", s) for s in ("train", "validation", "test")]
    whole = pydoc_text()
    assert "\n\n".join(parts) == whole  # cut at paragraph breaks, nothing lost
    fractions = [len(p) / len(whole) for p in parts]
    assert fractions[0] == pytest.approx(0.8, abs=0.02) and fractions[2] == pytest.approx(0.1, abs=0.02)
    assert sha256_text(load_text("pydoc", "test")) == sha256_text(parts[2])


def test_unknown_corpus_and_split():
    with pytest.raises(CorpusError, match="unknown corpus 'wiki'; registered corpora: pydoc, wikitext2"):
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
