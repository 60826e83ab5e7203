"""Speculative decoding, greedy: a cheap proposer guesses ``gamma`` tokens, the target checks
them all in one forward pass and keeps the longest prefix it agrees with, plus its own next token.

Decoding at batch 1 is memory-bound (lesson 11): one forward pass over ``gamma + 1`` tokens reads
the weights once, about the cost of one token.  If the proposer is right often enough, the target
produces several tokens per pass.  With a per-token acceptance rate ``α`` (independent guesses)
and ``γ`` drafted tokens per step, the expected tokens per target step is (Leviathan, Kalman &
Matias, 2023, eq. 1)::

    E[tokens / step] = (1 − α^(γ+1)) / (1 − α)

and, when one draft step costs ``c`` target steps, the speedup over plain decoding is
``E / (γ·c + 1)``.  Greedy verification makes the output *identical* to plain greedy decoding of
the target (Chen et al., 2023; Leviathan et al., 2023): every token kept is the target's argmax.

Two proposers:

* :class:`DraftModel`: a smaller model sharing the tokenizer (here the default model with half
  its layers dropped, distilled in lesson 07), with its own KV cache;
* :class:`PromptLookup`: no model at all: the last ``n`` tokens are looked up earlier in the
  sequence (prompt included) and the tokens that followed are proposed (Saxena, 2023, "prompt
  lookup decoding"; llama.cpp's n-gram drafts): free, and right when the output copies the input.

Everything here works on token id lists and a Hugging Face causal LM with a ``DynamicCache``
(rolled back after a rejection).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from edgellm.deploy.adapters import first_difference
from edgellm.errors import EdgeLLMError


class SpeculativeError(EdgeLLMError, ValueError):
    """Settings speculative decoding cannot run with (γ < 1, a draft with another vocabulary)."""


# --------------------------------------------------------------------------------------------
# the formulas


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """``(1 − α^(γ+1)) / (1 − α)``: tokens one target step yields when each of ``gamma`` drafted
    tokens is accepted independently with probability ``alpha`` (the ``γ + 1`` at α = 1)."""
    if gamma < 1:
        raise SpeculativeError(f"gamma={gamma}: draft at least one token per step")
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Speedup over plain decoding when one draft step costs ``cost_ratio`` target steps and the
    verification pass costs one target step: ``E[tokens/step] / (γ·c + 1)``."""
    return expected_tokens_per_step(alpha, gamma) / (gamma * cost_ratio + 1.0)


def simulate_tokens_per_step(alpha: float, gamma: int, *, steps: int = 10_000,
                             seed: int = 0) -> float:
    """Monte-Carlo check of :func:`expected_tokens_per_step`: each step accepts drafted tokens
    one by one with probability ``alpha`` until the first rejection (or all ``gamma``), then
    adds the target's own token."""
    rng = random.Random(seed)
    total = 0
    for _ in range(steps):
        n = 0
        while n < gamma and rng.random() < alpha:
            n += 1
        total += n + 1
    return total / steps


# --------------------------------------------------------------------------------------------
# proposers


def keep_first(cache, n: int) -> None:
    """Roll a ``DynamicCache`` back to its first ``n`` positions (``crop`` takes the number of
    positions to remove, as a negative count)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


@dataclass
class PromptLookup:
    """Propose the tokens that followed the most recent earlier occurrence of the sequence's last
    ``n`` tokens, trying ``n = max_ngram … min_ngram``; nothing when no n-gram recurs."""

    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "prompt-lookup"

    def reset(self, prompt: list[int]) -> None:
        pass

    def propose(self, seq: list[int], gamma: int) -> list[int]:
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):     # most recent match first
                if seq[start:start + n] == tail:
                    follow = seq[start + n:start + n + gamma]
                    if follow:
                        return follow
        return []


@dataclass
class DraftModel:
    """A small causal LM drafting greedily with its own KV cache; the cache is rolled back to
    the tokens the target accepted before each proposal."""

    model: torch.nn.Module
    name: str = "draft"
    _cache: object = field(default=None, repr=False)
    _cached: list[int] = field(default_factory=list, repr=False)

    def reset(self, prompt: list[int]) -> None:
        self._cache, self._cached = None, []

    @torch.inference_mode()
    def propose(self, seq: list[int], gamma: int) -> list[int]:
        from transformers import DynamicCache

        keep = 0                                    # longest prefix the cache still holds
        while keep < min(len(self._cached), len(seq) - 1) and self._cached[keep] == seq[keep]:
            keep += 1
        if self._cache is None:
            self._cache = DynamicCache()
        keep_first(self._cache, keep)
        self._cached = list(seq[:keep])
        feed, out = seq[keep:], []
        for _ in range(gamma):
            logits = self.model(input_ids=torch.tensor([feed]), past_key_values=self._cache,
                                use_cache=True).logits                      # (1, len(feed), V)
            self._cached += feed
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            feed = [nxt]
        return out


# --------------------------------------------------------------------------------------------
# decoding


@torch.inference_mode()
def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain greedy decoding with the KV cache: ``new_tokens`` ids after ``prompt`` (no stop)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache, ids = out.past_key_values, [int(out.logits[0, -1].argmax())]
    while len(ids) < new_tokens:
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True)
        ids.append(int(out.logits[0, -1].argmax()))
    return ids


@torch.inference_mode()
def speculative(model, prompt: list[int], new_tokens: int, proposer, *, gamma: int = 4) -> dict:
    """Greedy speculative decoding of ``new_tokens`` ids after ``prompt``.

    Invariant: the target's cache holds every token of ``seq`` but the last.  Each step feeds
    ``[seq[-1], d_1 … d_k]`` (k ≤ γ drafted), keeps the ``n`` drafted tokens that equal the
    target's argmax at the position before them, appends the target's next token and crops the
    cache back.  Returns ``ids``, ``target_steps``, ``drafted``, ``accepted`` and ``accept_hist``
    (how many steps accepted 0, 1, …, γ tokens)."""
    if gamma < 1:
        raise SpeculativeError(f"gamma={gamma}: draft at least one token per step")
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache = out.past_key_values
    seq = list(prompt) + [int(out.logits[0, -1].argmax())]
    proposer.reset(list(prompt))
    steps = drafted = accepted = 0
    hist = [0] * (gamma + 1)
    while len(seq) - len(prompt) < new_tokens:
        draft = proposer.propose(seq, min(gamma, new_tokens - (len(seq) - len(prompt))))
        logits = model(input_ids=torch.tensor([[seq[-1], *draft]]), past_key_values=cache,
                       use_cache=True).logits[0]                          # (k + 1, V)
        choice = logits.argmax(-1).tolist()                               # target's argmax
        n = 0
        while n < len(draft) and draft[n] == choice[n]:
            n += 1
        seq += draft[:n] + [choice[n]]
        keep_first(cache, len(seq) - 1)
        steps, drafted, accepted = steps + 1, drafted + len(draft), accepted + n
        hist[n] += 1
    return {"ids": seq[len(prompt):len(prompt) + new_tokens], "target_steps": steps,
            "drafted": drafted, "accepted": accepted, "accept_hist": hist}


def check_vocab(target, draft) -> None:
    """A draft model must share the target's vocabulary (the same ids mean the same tokens)."""
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise SpeculativeError(f"the draft's vocabulary ({vd} ids) is not the target's ({vt}): "
                               "a draft must share the target's tokenizer; use a compressed copy "
                               "of the target (smollm2-135m-draft) or --draft prompt-lookup")


def compare(model, prompts: list[list[int]], proposer, *, gamma: int = 4,
            new_tokens: int = 64, progress=None) -> dict:
    """Plain greedy and speculative decoding of every prompt, timed alternately (prefill
    included, wall seconds), with acceptance counted over all prompts.

    Returns ``acceptance_rate`` (accepted / drafted), ``tokens_per_step`` (new tokens per target
    forward pass), the formula's ``tokens_per_step_expected`` at that α, ``speedup`` (plain
    seconds / speculative seconds), ``identical`` (every prompt's ids equal plain greedy's) and
    ``first_difference`` (per prompt)."""
    plain_s = spec_s = 0.0
    steps = drafted = accepted = 0
    hist = [0] * (gamma + 1)
    diffs = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        ref = greedy(model, prompt, new_tokens)
        t1 = time.perf_counter()
        res = speculative(model, prompt, new_tokens, proposer, gamma=gamma)
        t2 = time.perf_counter()
        plain_s, spec_s = plain_s + (t1 - t0), spec_s + (t2 - t1)
        steps, drafted, accepted = (steps + res["target_steps"], drafted + res["drafted"],
                                    accepted + res["accepted"])
        hist = [h + r for h, r in zip(hist, res["accept_hist"], strict=True)]
        diffs.append(first_difference(ref, res["ids"]))
        if progress:
            progress(i + 1, len(prompts))
    n_new = new_tokens * len(prompts)
    alpha = accepted / drafted if drafted else 0.0
    return {"acceptance_rate": alpha, "tokens_per_step": n_new / steps,
            "tokens_per_step_expected": expected_tokens_per_step(alpha, gamma),
            "speedup": plain_s / spec_s, "identical": all(d is None for d in diffs),
            "first_difference": diffs, "target_steps": steps, "drafted": drafted,
            "accepted": accepted, "accept_hist": hist, "seconds_plain": plain_s,
            "seconds_speculative": spec_s, "decode_tokens_per_s": n_new / spec_s,
            "decode_tokens_per_s_base": n_new / plain_s}
