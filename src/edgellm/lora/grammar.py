"""Grammar-constrained greedy decoding: the model may only write a dotted Python name.

A small model asked for ``os.path.join`` often answers with code or a sentence instead; the
answer is then wrong for a reason (format) that has nothing to do with what the model knows.
Constrained decoding, as llama.cpp's GBNF grammars or Outlines do it, removes that reason: at
every step the tokens that would break the grammar get a logit of −∞, so greedy decoding picks
the most likely token *among the ones that keep the answer well-formed*.  The grammar here is the
regular language ::

    name  := ident ("." ident)*          ident := [A-Za-z_][A-Za-z0-9_]*

and the answer may end only after a complete name.  Where the model would leave the grammar
(a space, a newline, ``(``, end of turn: any token that cannot continue the name), the name is
finished: the end-of-turn token gets the probability of all those tokens together
(``logsumexp`` of their logits), so the model stops exactly where its own first choice would have
ended the name, as :func:`edgellm.lora.task.normalise` would cut a free answer.  Because the language is
regular with two states (expecting an identifier start / inside an identifier), one boolean
mask per state over the vocabulary is all the processor needs; a token's state after it is
emitted depends only on its last character.

The base model's baseline (``accuracy_base``) uses it: the best prompt *and* a well-formed
answer, so a fine-tuned model's gain cannot come from output format alone.
"""

from __future__ import annotations

import re

import torch

_START = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.?")  # after "" or "."
_INSIDE = re.compile(r"[A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.?")          # after a letter

DECODINGS = ("free", "grammar")


def vocab_masks(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(start_ok, inside_ok, ends_dot)``, bool (V,): the tokens allowed when an identifier
    must start (nothing written yet, or a ``.`` last), those allowed inside an identifier, and
    the tokens whose text ends with ``.``."""
    n = len(tokenizer)
    texts = [tokenizer.decode([i]) for i in range(n)]
    special = set(tokenizer.all_special_ids)
    start = torch.tensor([i not in special and bool(_START.fullmatch(t)) for i, t in enumerate(texts)])
    inside = torch.tensor([i not in special and bool(t) and bool(_INSIDE.fullmatch(t))
                           for i, t in enumerate(texts)])
    dot = torch.tensor([t.endswith(".") for t in texts])
    return start, inside, dot


class DottedNameProcessor:
    """A ``transformers`` logits processor for :func:`generate_batched`: only tokens that keep
    each row's new text a prefix of a dotted name, end-of-turn only after a complete name.

    ``prompt_len`` is the (left-padded) prompt width; tokens after it are the answer.
    """

    def __init__(self, tokenizer, prompt_len: int, masks=None):
        self.start, self.inside, self.dot = masks if masks is not None else vocab_masks(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.prompt_len = prompt_len

    def allowed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Bool (B, V): the tokens each row may write next."""
        B = input_ids.shape[0]
        if input_ids.shape[1] <= self.prompt_len:          # nothing written yet
            return self.start.expand(B, -1)
        last = input_ids[:, -1]
        need_start = self.dot[last.clamp(max=len(self.dot) - 1)]  # (B,) last token ended with "."
        allowed = torch.where(need_start[:, None], self.start, self.inside).clone()
        allowed[:, self.eos] = ~need_start                 # stop only after a complete name
        return allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # the masks live on the CPU; the scores where the model runs
        allowed = self.allowed(input_ids.to(self.start.device)).to(scores.device)
        if scores.shape[1] > allowed.shape[1]:  # lm_head rows beyond the tokenizer: never allowed
            pad = torch.zeros(allowed.shape[0], scores.shape[1] - allowed.shape[1],
                              dtype=torch.bool, device=scores.device)
            allowed = torch.cat([allowed, pad], dim=1)
        can_end = allowed[:, self.eos]                       # (B,) inside a complete name
        leave = ~allowed
        leave[:, self.eos] = True                            # end of turn leaves the name too
        end = torch.logsumexp(scores.masked_fill(~leave, float("-inf")), dim=-1)  # (B,)
        out = scores.masked_fill(~allowed, float("-inf"))
        out[:, self.eos] = torch.where(can_end, end, out[:, self.eos])
        return out
