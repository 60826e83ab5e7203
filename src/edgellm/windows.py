"""Which tokens an evaluation protocol feeds to the model and which it scores.

The protocols themselves (``gptq``, ``sliding``, ``llamacpp``) are described in
:mod:`edgellm.metrics`, which scores these windows; here are the windows, the text positions
they score, and the restriction of one protocol's per-token values to another's positions
(lesson 01 uses it to show that the gap between ``sliding`` and ``llamacpp`` comes from *which*
tokens are scored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import EdgeLLMError

PROTOCOLS = {
    "gptq": "non-overlapping windows of ctx tokens, every token after the first scored "
            "(GPTQ/AWQ/SparseGPT/Wanda evaluation code)",
    "sliding": "windows of ctx tokens moved by stride, each token scored once with up to ctx-1 "
               "tokens of context (transformers docs)",
    "llamacpp": "llama.cpp llama-perplexity: chunks of ctx tokens, second half of each chunk "
                "scored, BOS first only if the tokenizer adds one",
}


class EvalError(EdgeLLMError, ValueError):
    """Bad evaluation settings: unknown protocol, ctx too large, text too short."""


@dataclass(frozen=True)
class Window:
    """Feed ``tokens[start:end]``; logits at positions ``first … end-start-2`` are scored."""
    start: int
    end: int
    first: int

    @property
    def n_scored(self) -> int:
        return self.end - self.start - 1 - self.first


def windows(n_tokens: int, protocol: str = "gptq", ctx: int = 512, stride: int | None = None,
            chunks: int | None = None) -> list[Window]:
    """The windows a protocol feeds to the model over ``n_tokens`` tokens."""
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if ctx < 2:
        raise EvalError(f"ctx={ctx} is too small; a window needs at least 2 tokens")
    need = {"gptq": ctx, "sliding": 2, "llamacpp": 2 * ctx}[protocol]
    if n_tokens < need:
        raise EvalError(
            f"the text has {n_tokens} tokens; protocol {protocol!r} with ctx={ctx} needs at least "
            f"{need}. Use more text (another split or corpus), a smaller --ctx, or drop --max-tokens."
        )
    if protocol == "gptq":
        out = [Window(i * ctx, (i + 1) * ctx, 0) for i in range(n_tokens // ctx)]
    elif protocol == "llamacpp":
        out = [Window(i * ctx, (i + 1) * ctx, ctx // 2) for i in range(n_tokens // ctx)]
    else:
        stride = ctx // 2 if stride is None else stride
        if not 1 <= stride <= ctx:
            raise EvalError(f"stride={stride} must be between 1 and ctx={ctx}")
        out, prev_end = [], 0
        for begin in range(0, n_tokens, stride):
            end = min(begin + ctx, n_tokens)
            n_new = end - prev_end  # tokens not scored by an earlier window
            # stride == ctx: the first token of a window has no context inside it and is skipped
            out.append(Window(begin, end, 0 if begin == 0 else max(0, end - begin - n_new - 1)))
            prev_end = end
            if end == n_tokens:
                break
    return out[:chunks] if chunks else out


def scored_positions(n_tokens: int, protocol: str = "gptq", ctx: int = 512,
                     stride: int | None = None, chunks: int | None = None) -> torch.Tensor:
    """Index in the text of every token a protocol scores: LongTensor ``(N_scored,)``, in the
    order of :func:`token_logprobs`'s per-token outputs (window ``w`` scores tokens
    ``w.start + w.first + 1 … w.end - 1``)."""
    wins = windows(n_tokens, protocol, ctx, stride, chunks)
    return torch.cat([torch.arange(w.start + w.first + 1, w.end) for w in wins])


def llamacpp_positions(n_tokens: int, ctx: int = 512) -> torch.Tensor:
    """The text positions ``llama-perplexity`` scores: the second half of each full ``ctx`` chunk,
    ``512·i + 257 … 512·i + 511`` at ctx 512 (LongTensor ``(N_scored,)``)."""
    return scored_positions(n_tokens, "llamacpp", ctx)


def restrict_to_positions(values: torch.Tensor, positions: torch.Tensor,
                          keep: torch.Tensor) -> torch.Tensor:
    """The entries of ``values`` (one per scored token, ``(N,)``, scored at text ``positions``)
    whose position is in ``keep``; e.g. ``sliding``'s per-token NLL restricted to
    :func:`llamacpp_positions`.  Every position in ``keep`` must have been scored."""
    positions, keep = torch.as_tensor(positions), torch.as_tensor(keep)
    if values.shape[0] != positions.shape[0]:
        raise EvalError(f"{values.shape[0]} values for {positions.shape[0]} positions; give the "
                        "scored_positions of the same protocol, ctx, stride and text length")
    mask = torch.isin(positions, keep)
    if int(mask.sum()) != len(torch.unique(keep)):
        raise EvalError(f"{len(torch.unique(keep)) - int(mask.sum())} of the positions to keep were "
                        "never scored; use a protocol that scores them all (sliding, stride <= ctx/2)")
    return values[mask]
