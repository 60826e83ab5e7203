"""Prompts, chat-template batching with the loss on the answer only, batched greedy generation.

One example in the chat template (SmolLM2's ChatML)::

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n          ┐
    <|im_start|>user\\n{prompt}<|im_end|>\\n             │ prompt ids   (mask 0)
    <|im_start|>assistant\\n                          ┘
    os.path.join<|im_end|>                            ← answer ids   (mask 1: the only targets)

Batches are **left-padded**: every answer then ends at the last position, so the loss needs the
logits of the last ``K`` positions only (``logits_to_keep``: the 49k-way lm_head is ~20 % of
SmolLM2-135M's forward cost per token), and generation appends to aligned rows.  Position ids
count real tokens only (``cumsum(attention_mask) - 1``), as in Hugging Face ``generate``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgellm.devices import model_device, to_device

SYSTEM = ("You name Python standard-library functions. Given a description, reply with the "
          "function's full dotted name only, for example os.path.join or str.split.")

# prompt styles: what the base model is asked (the best one is eval-task's default for the base)
STYLES = {
    "plain": {"system": None, "shots": 0},          # the model's own default system prompt
    "zeroshot": {"system": SYSTEM, "shots": 0},
    "fewshot": {"system": SYSTEM, "shots": 3},
    "fewshot8": {"system": SYSTEM, "shots": 8, "distinct_modules": True},
}
BEST_BASE_STYLE = "fewshot"   # the best of plain / zeroshot / fewshot measured on 120 test items
TRAIN_STYLE = "plain"         # what fine-tuning trains on: the shortest prompt (no instructions)


@dataclass(frozen=True)
class Prompting:
    """How prompts are written: ``system`` prompt (None: the template's default) and ``shots``
    (prompt, answer) pairs from the train split put before the question as earlier turns."""

    system: str | None
    shots: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_style(cls, style: str, train_items=(), *, instruction: str | None = None) -> Prompting:
        """The prompting of ``style``; ``instruction`` replaces :data:`SYSTEM` (the funcname
        instruction) as the system prompt of the instructed styles."""
        from edgellm.lora.task import TaskError

        if style not in STYLES:
            raise TaskError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")
        s = STYLES[style]
        pool = sorted(train_items, key=lambda it: it.prompt)
        if s.get("distinct_modules"):  # one example per top-level module: no prefix to copy
            random.Random(0).shuffle(pool)
            firsts, picked = set(), []
            for it in pool:
                if it.answer.split(".")[0] not in firsts and len(picked) < s["shots"]:
                    firsts.add(it.answer.split(".")[0])
                    picked.append(it)
            shots = picked
        else:
            shots = random.Random(0).sample(pool, min(s["shots"], len(pool))) if s["shots"] else []
        system = s["system"] if s["system"] is None or instruction is None else instruction
        return cls(system, tuple((it.prompt, it.answer) for it in shots))

    def messages(self, prompt: str) -> list[dict]:
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        for q, a in self.shots:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompting: Prompting, prompt: str) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header."""
    text = tokenizer.apply_chat_template(prompting.messages(prompt), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of the answer and the end-of-turn token (both are targets)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_example(tokenizer, prompting: Prompting, prompt: str, answer: str):
    """``(ids, mask)``: the prompt and answer ids, ``mask`` 1 on the answer ids."""
    p, a = prompt_ids(tokenizer, prompting, prompt), answer_ids(tokenizer, answer)
    return p + a, [0] * len(p) + [1] * len(a)


def left_pad(rows: list[list[int]], pad_id: int, masks: list[list[int]] | None = None) -> dict:
    """Left-pad token rows into a batch: ``input_ids`` (B, T), ``attention_mask`` (B, T),
    ``position_ids`` (B, T) counting real tokens from 0, and ``loss_mask`` (B, T) bool when
    ``masks`` are given."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        attn[i, T - len(r):] = 1
    out = {"input_ids": ids, "attention_mask": attn,
           "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}
    if masks is not None:
        lm = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, m in enumerate(masks):
            lm[i, T - len(m):] = torch.tensor(m, dtype=torch.bool)
        out["loss_mask"] = lm
    return out


def answer_batches(tokenizer, prompting: Prompting, items, *, steps: int, batch_size: int,
                   seq_len: int, seed: int = 0, shuffle_labels: bool = False) -> list[dict]:
    """``steps`` left-padded batches of ``batch_size`` training examples, drawn by epochs in a
    seeded order; examples longer than ``seq_len`` tokens are cut from the left (the answer is
    kept).  ``shuffle_labels`` pairs each prompt with another item's answer (the control run:
    what the output format alone buys)."""
    items = list(items)
    g = random.Random(seed)
    answers = [it.answer for it in items]
    if shuffle_labels:
        g.shuffle(answers)
    encoded = []
    for it, ans in zip(items, answers, strict=True):
        ids, mask = encode_example(tokenizer, prompting, it.prompt, ans)
        encoded.append((ids[-seq_len:], mask[-seq_len:]))
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(len(encoded)))
        g.shuffle(epoch)
        order += epoch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for s in range(steps):
        rows = [encoded[i] for i in order[s * batch_size:(s + 1) * batch_size]]
        batches.append(left_pad([r[0] for r in rows], pad, [r[1] for r in rows]))
    return batches


def answer_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict the answer tokens of a left-padded batch, and those tokens.

    Only the last ``K`` positions go through the lm_head, ``K`` = the longest answer + 1.
    Returns ``logits`` (B, K-1, V) and ``targets`` (B, K-1), -100 where not an answer token.
    """
    batch = to_device(batch, model_device(model))                # a no-op on the model's device
    ids, mask = batch["input_ids"], batch["loss_mask"]           # (B, T)
    first = mask.float().argmax(dim=1)                            # first answer position per row
    K = int((ids.shape[1] - first).max()) + 1                     # answer span + the token before it
    out = model(input_ids=ids, attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=K, use_cache=False)
    logits = out.logits[:, :-1]                                   # (B, K-1, V): predicts positions T-K+1 …
    targets = ids[:, -K + 1:].masked_fill(~mask[:, -K + 1:], -100)  # (B, K-1)
    return logits, targets


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch (0-d): the loss LoRA trains."""
    logits, targets = answer_logits(model, batch)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


@torch.inference_mode()
def answer_nll(model, tokenizer, prompting: Prompting, items, *, batch_size: int = 16) -> dict:
    """Total NLL of the answers given the prompts (teacher forcing): ``ppl`` = exp(mean NLL per
    answer token) over ``n_tokens`` answer tokens (end-of-turn included)."""
    import math

    total, n = 0.0, 0
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        enc = [encode_example(tokenizer, prompting, it.prompt, it.answer) for it in chunk]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = left_pad([e[0] for e in enc], pad, [e[1] for e in enc])
        logits, targets = answer_logits(model, batch)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=-100, reduction="sum")
        total += float(nll)
        n += int((targets != -100).sum())
    return {"ppl": math.exp(total / n), "nll": total / n, "n_tokens": n}


@torch.inference_mode()
def generate_batched(model, tokenizer, prompting: Prompting, prompts: list[str], *,
                     max_new_tokens: int = 16, batch_size: int = 32, progress: bool = False,
                     decoding: str = "free", ids: bool = False) -> list:
    """Greedy answers to ``prompts`` (decoded, special tokens dropped), generated ``batch_size``
    at a time from left-padded rows, prompts sorted by length to pad little.  ``ids``: the
    generated token ids instead (up to, not including, the end-of-turn token).

    ``decoding="grammar"`` constrains every answer to a dotted Python name
    (:class:`edgellm.lora.grammar.DottedNameProcessor`); ``"free"`` lets the model write
    anything."""
    from edgellm.lora.grammar import DECODINGS, DottedNameProcessor, vocab_masks

    if decoding not in DECODINGS:
        from edgellm.lora.task import TaskError

        raise TaskError(f"unknown decoding {decoding!r}; use one of {', '.join(DECODINGS)}")
    masks = vocab_masks(tokenizer) if decoding == "grammar" else None
    rows = [prompt_ids(tokenizer, prompting, p) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[str] = [""] * len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", leave=False)
    for s in starts:
        idx = order[s:s + batch_size]
        batch = to_device(left_pad([rows[i] for i in idx], pad), model_device(model))
        extra = {}
        if masks is not None:
            from transformers import LogitsProcessorList

            width = batch["input_ids"].shape[1]
            extra["logits_processor"] = LogitsProcessorList(
                [DottedNameProcessor(tokenizer, width, masks=masks)])
        gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, **extra)
        new = gen[:, batch["input_ids"].shape[1]:]                 # (b, new tokens)
        for i, row in zip(idx, new, strict=True):
            out[i] = (until_eos(row.tolist(), tokenizer.eos_token_id, pad) if ids
                      else tokenizer.decode(row, skip_special_tokens=True))
    return out


def until_eos(ids: list[int], eos: int, pad: int | None = None) -> list[int]:
    """``ids`` cut before the first end-of-turn (or padding) token."""
    for n, t in enumerate(ids):
        if t == eos or t == pad:
            return ids[:n]
    return ids
