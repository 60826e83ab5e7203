"""Speculative decoding: the formula against a simulation, the proposers, and the one property
that makes greedy speculation safe: its output equals plain greedy decoding, whatever the draft."""

from __future__ import annotations

import json

import pytest
import torch

from edgellm.deploy.adapters import first_difference
from edgellm.deploy.speculative import (
    DraftModel,
    PromptLookup,
    SpeculativeError,
    check_vocab,
    compare,
    expected_speedup,
    expected_tokens_per_step,
    greedy,
    simulate_tokens_per_step,
    speculative,
)
from edgellm.models import tiny_llama


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("gamma", [1, 4])
def test_formula_matches_simulation(alpha, gamma):
    e = expected_tokens_per_step(alpha, gamma)
    sim = simulate_tokens_per_step(alpha, gamma, steps=40_000, seed=1)
    assert sim == pytest.approx(e, rel=0.02)
    assert 1.0 <= e <= gamma + 1


def test_formula_edges_and_speedup():
    assert expected_tokens_per_step(0.0, 5) == 1.0
    assert expected_tokens_per_step(1.0, 3) == 4.0
    assert expected_tokens_per_step(0.5, 1) == pytest.approx(1.5)
    # a free draft (cost 0) gives E; a draft as costly as the target can never pay at γ ≥ 1
    assert expected_speedup(0.7, 4, 0.0) == pytest.approx(expected_tokens_per_step(0.7, 4))
    assert expected_speedup(0.99, 4, 1.0) < 1.0
    with pytest.raises(SpeculativeError, match="gamma"):
        expected_tokens_per_step(0.5, 0)


def test_prompt_lookup_proposes_what_followed():
    pl = PromptLookup(max_ngram=2)
    seq = [5, 6, 7, 8, 9, 1, 5, 6]
    assert pl.propose(seq, 3) == [7, 8, 9]             # bigram (5, 6) seen before
    assert pl.propose(seq, 10) == [7, 8, 9, 1, 5, 6]   # bounded by the sequence
    assert pl.propose([1, 2, 3, 4], 3) == []            # nothing recurs
    assert PromptLookup(max_ngram=3).propose([1, 2, 9, 1, 2, 3, 4, 1, 2], 2) == [3, 4]  # latest


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


def _prompt(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def test_self_draft_accepts_everything(target):
    prompt = _prompt()
    res = speculative(target, prompt, 20, DraftModel(target), gamma=4)
    assert res["ids"] == greedy(target, prompt, 20)
    assert res["drafted"] > 0 and res["accepted"] == res["drafted"]
    assert res["accept_hist"][4] >= 3                # full acceptance: γ + 1 tokens per step
    assert res["target_steps"] <= 5


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_any_draft_keeps_greedy_output(target, gamma):
    """A draft that knows nothing (another random model) must not change a single token."""
    other = tiny_llama(seed=7)
    for seed in range(3):
        prompt = _prompt(seed=seed)
        ref = greedy(target, prompt, 17)
        for proposer in (DraftModel(other), PromptLookup()):
            res = speculative(target, prompt, 17, proposer, gamma=gamma)
            assert res["ids"] == ref
            assert sum(res["accept_hist"]) == res["target_steps"]


def test_draft_cache_rolls_back(target):
    """The draft's cache after a rejection holds exactly the accepted prefix."""
    d = DraftModel(tiny_llama(seed=3))
    seq = _prompt(10)
    first = d.propose(seq, 3)
    again = d.propose(seq + first[:1] + [0], 3)      # one accepted, then the target's own token
    fresh = DraftModel(d.model).propose(seq + first[:1] + [0], 3)
    assert again == fresh


def test_compare_counts(target):
    prompts = [_prompt(seed=s) for s in range(2)]
    res = compare(target, prompts, DraftModel(target), gamma=3, new_tokens=12)
    assert res["identical"] and res["first_difference"] == [None, None]
    assert res["acceptance_rate"] == 1.0
    assert res["tokens_per_step"] == pytest.approx(24 / res["target_steps"])
    assert res["tokens_per_step"] > 2


def test_draft_with_another_vocabulary(target):
    with pytest.raises(SpeculativeError, match="tokenizer"):
        check_vocab(target, tiny_llama(vocab_size=128))


@pytest.mark.integration
def test_cli_prompt_lookup_on_the_default_model():
    from edgellm.cli import run_record

    rec = run_record(["speculative", "--draft", "prompt-lookup", "--prompts", "2",
                      "--new-tokens", "24", "--gamma", "3", "--json"])
    json.dumps(rec)
    assert rec["identical"] is True
    assert rec["acceptance_rate"] > 0 and rec["tokens_per_step"] > 1
    assert rec["speed_protocol"]["speedup"]["name"] == "generate"
    assert rec["tokens_per_step"] == pytest.approx(48 / rec["target_steps"])
