"""Evaluation: perplexity under named protocols, KL divergence to a reference, bits per byte.

Perplexity is ``exp`` of the mean negative log-likelihood (in nats) of the scored tokens,
``PPL = exp(-1/N · Σ log p(x_i | x_<i))``, which equals ``2**H`` with ``H`` in bits.  Papers
disagree mostly in *which* tokens are scored with *how much* context, so every number carries
the name of its protocol:

``gptq``
    Non-overlapping windows of ``ctx`` tokens; inside each window every token but the first is
    scored (the evaluation code of GPTQ, AWQ, SparseGPT and Wanda, on WikiText-2 with ctx 2048).
    The reference code multiplies each window's mean loss by ``ctx``; since all windows have
    the same length that gives the same perplexity as the mean over the scored tokens used here.
``sliding``
    Windows of ``ctx`` tokens moved by ``stride``; every token after the first is scored exactly
    once, with up to ``ctx - 1`` tokens of context (transformers docs, "Perplexity of
    fixed-length models").
``llamacpp``
    llama.cpp's ``llama-perplexity``: chunks of ``ctx`` tokens; a BOS token replaces the first
    token of each chunk only when the tokenizer adds one (SmolLM2's does not); only the second
    half of each chunk is scored (``ctx - 1 - ctx//2`` tokens per chunk), so every scored token has
    at least ``ctx//2`` tokens of context.  llama.cpp needs at least ``2·ctx`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from edgellm.devices import model_device, synchronize, to_device
from edgellm.measure import protocol as speed_protocol
from edgellm.windows import (  # noqa: F401  (re-exported: the protocols' public home)
    PROTOCOLS,
    EvalError,
    Window,
    llamacpp_positions,
    restrict_to_positions,
    scored_positions,
    windows,
)


def _batches(wins: list[Window], batch_size: int):
    """Consecutive windows of equal length, at most ``batch_size`` at a time."""
    batch = []
    for w in wins:
        if batch and (len(batch) == batch_size or w.end - w.start != batch[0].end - batch[0].start
                      or w.first != batch[0].first):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def check_ctx(model, ctx: int) -> None:
    limit = _max_positions(model)
    if limit is not None and ctx > limit:
        raise EvalError(f"ctx={ctx} exceeds the model's maximum of {limit} positions; "
                        f"use --ctx {limit} or less")


def forward_logits(model, ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Logits ``(B, keep or T, V)`` of a Hugging Face causal LM or any module mapping ids to logits,
    on the model's device (``ids`` are moved there first: the same code runs on a GPU)."""
    from transformers import PreTrainedModel

    ids = to_device(ids, model_device(model))

    if isinstance(model, PreTrainedModel):
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    out = model(ids)
    logits = getattr(out, "logits", out)
    return logits[:, -keep:] if keep else logits


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


@torch.inference_mode()
def token_logprobs(model, tokens: torch.Tensor, protocol: str = "gptq", ctx: int = 512, *,
                   stride: int | None = None, chunks: int | None = None, bos_id: int | None = None,
                   batch_size: int = 4, progress: bool = True, reference=None):
    """Score every token a protocol scores.

    Returns a dict of 1-D tensors over the N scored tokens: ``nll`` (nats, float64), ``target``
    ids, and, with a ``reference`` model, ``nll_ref``, ``kl`` = KL(P_ref ‖ P_model) and ``top1``
    (1.0 where both models' most likely next token agree).  Also ``n_windows``,
    ``n_fed`` (tokens through the model) and ``seconds``.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    check_ctx(model, ctx)
    wins = windows(len(tokens), protocol, ctx, stride, chunks)
    out = {k: [] for k in ("nll", "target", "nll_ref", "kl", "top1")}
    n_fed, t0 = 0, time.perf_counter()
    batches = list(_batches(wins, batch_size))
    for batch in _progress(batches, len(batches), f"{protocol} ctx={ctx}", progress):
        ids = torch.stack([tokens[w.start:w.end] for w in batch])  # (B, L)
        targets_src = ids.clone()
        if bos_id is not None and protocol == "llamacpp":
            ids[:, 0] = bos_id  # llama.cpp overwrites the first token of each chunk with BOS
        L, first = ids.shape[1], batch[0].first
        keep = L - first  # positions first … L-1; the last one predicts nothing we score
        logits = forward_logits(model, ids, keep)[:, :-1].float()  # (B, L-1-first, V)
        tgt = targets_src[:, first + 1:].to(logits.device)  # (B, L-1-first)
        # -log softmax at the target = logsumexp(logits) - logit[target]: no (B, T, V) copy
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        # per-token results come back to the CPU: (N,) vectors, small beside the logits
        out["nll"].append(nll.double().flatten().cpu())
        out["target"].append(tgt.flatten().cpu())
        if reference is not None:
            ref_logits = forward_logits(reference, ids, keep)[:, :-1].float().to(logits.device)
            # same formula as nll above, so identical models give identical nll and nll_ref
            nll_ref = (torch.logsumexp(ref_logits, -1)
                       - ref_logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
            out["nll_ref"].append(nll_ref.double().flatten().cpu())
            # one window at a time: the (T, V) temporaries of the KL, not (B, T, V) ones
            # (at B = 4, T = 511 each full-vocabulary copy is 0.4 GB)
            for b in range(ids.shape[0]):
                logp = logits[b].log_softmax(-1)
                logr = ref_logits[b].log_softmax(-1)
                kl = (logr.exp() * (logr - logp)).sum(-1)  # (L-1-first,)
                out["kl"].append(kl.double().clamp_min(0).cpu())
                out["top1"].append((logr.argmax(-1) == logp.argmax(-1)).double().cpu())
                del logp, logr, kl
        n_fed += ids.numel()
    res = {k: torch.cat(v) for k, v in out.items() if v}
    res.update(n_windows=len(wins), n_fed=n_fed, seconds=time.perf_counter() - t0)
    return res


def mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error, as llama.cpp computes it: sqrt((E[x²] − E[x]²) / (n − 1))."""
    x = x.double()
    n = x.numel()
    m = x.mean().item()
    var = max((x * x).mean().item() - m * m, 0.0)
    return m, (math.sqrt(var / (n - 1)) if n > 1 else float("nan"))


def ppl_from_nll(nll: torch.Tensor) -> dict:
    """Perplexity and its standard error (delta method, as llama.cpp prints ``PPL ± err``)."""
    m, se = mean_stderr(nll)
    ppl = math.exp(m)
    return {"ppl": ppl, "ppl_stderr": ppl * se, "nll": m, "nll_stderr": se}


def perplexity(model, tokens: torch.Tensor, protocol: str = "gptq", ctx: int = 512, *,
               stride: int | None = None, chunks: int | None = None, bos_id: int | None = None,
               batch_size: int = 4, progress: bool = True, byte_lengths: torch.Tensor | None = None,
               ) -> dict:
    """Perplexity of ``model`` on 1-D ``tokens`` under ``protocol``.

    Returns ``ppl``, ``ppl_stderr``, ``nll`` (mean, nats), ``n_tokens`` (scored), ``n_windows``,
    ``protocol``, ``ctx``, ``stride``, ``seconds``, ``eval_tokens_per_s`` (tokens fed per wall
    second, protocol ``"eval-wall"`` in ``speed_protocol``) and, given ``byte_lengths`` (bytes per
    vocabulary id), ``bits_per_byte``.
    """
    r = token_logprobs(model, tokens, protocol, ctx, stride=stride, chunks=chunks, bos_id=bos_id,
                       batch_size=batch_size, progress=progress)
    out = {**ppl_from_nll(r["nll"]), "n_tokens": r["nll"].numel(), "n_windows": r["n_windows"],
           "protocol": protocol, "ctx": ctx, "stride": stride if protocol == "sliding" else None,
           "seconds": r["seconds"], "eval_tokens_per_s": r["n_fed"] / r["seconds"],
           "speed_protocol": {"eval_tokens_per_s": speed_protocol(
               "eval-wall", batch=batch_size, ctx=ctx, ppl_protocol=protocol)}}
    if byte_lengths is not None:
        out["bits_per_byte"] = bits_per_byte(r["nll"], r["target"], byte_lengths)
    return out


def bits_per_byte(nll: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor) -> float:
    """Total information in bits divided by the UTF-8 bytes of the scored tokens."""
    n_bytes = byte_lengths[targets].sum().item()
    return nll.sum().item() / math.log(2) / n_bytes


def kl_divergence(model, reference, tokens: torch.Tensor, protocol: str = "gptq", ctx: int = 512,
                  *, stride: int | None = None, chunks: int | None = None,
                  bos_id: int | None = None, batch_size: int = 2, progress: bool = True) -> dict:
    """Token-level KL(P_reference ‖ P_model) on the windows of ``protocol``, like llama.cpp's KL mode.

    Returns ``kl_mean`` (nats), ``kl_stderr``, ``kl_median``, ``kl_p90``, ``kl_p99``, ``kl_max``,
    ``top1_agreement`` (fraction of positions where both argmaxes agree), ``ppl`` of the model,
    ``ppl_ref`` of the reference, ``n_tokens``, ``protocol``, ``ctx``, ``seconds``.
    """
    check_ctx(reference, ctx)
    r = token_logprobs(model, tokens, protocol, ctx, stride=stride, chunks=chunks, bos_id=bos_id,
                       batch_size=batch_size, progress=progress, reference=reference)
    return {**kl_summary(r["kl"]), "top1_agreement": r["top1"].mean().item(),
            "ppl": math.exp(r["nll"].mean().item()), "ppl_ref": math.exp(r["nll_ref"].mean().item()),
            "n_tokens": r["kl"].numel(), "protocol": protocol, "ctx": ctx, "seconds": r["seconds"]}


def kl_summary(kl: torch.Tensor) -> dict:
    """Mean (with its standard error), median, p90, p99 and max of per-token KL values (N,)."""
    m, se = mean_stderr(kl)
    q = torch.quantile(kl.float(), torch.tensor([0.5, 0.9, 0.99])).tolist()
    return {"kl_mean": m, "kl_stderr": se, "kl_median": q[0], "kl_p90": q[1], "kl_p99": q[2],
            "kl_max": kl.max().item()}


# --------------------------------------------------------------------------------------------
# tokens and bytes


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character GPT-2 style byte-level BPE uses for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each vocabulary id stands for (special tokens: 0), as a LongTensor (V,)."""
    alphabet = _byte_level_alphabet()
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    lengths = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.long)
    for piece, i in vocab.items():
        if i in special:
            continue
        if all(ch in alphabet for ch in piece):  # byte-level piece: one character per byte
            lengths[i] = len(piece)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


# --------------------------------------------------------------------------------------------
# speed and memory


# --------------------------------------------------------------------------------------------
# whole records: what the CLI prints and the lessons show


def evaluate_ppl(model, tokenizer, data: str = "pydoc", *, split: str = "test",
                 protocol: str = "gptq", ctx: int = 512, stride: int | None = None,
                 max_tokens: int | None = None, chunks: int | None = None, batch_size: int = 4,
                 progress: bool = True, model_name: str | None = None) -> dict:
    """Perplexity of a model on a corpus split, as a self-describing JSON-ready record."""
    from edgellm.data import get_tokens, load_text, sha256_text
    from edgellm.records import record

    tokens = get_tokens(data, tokenizer, split, max_tokens)
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    res = perplexity(model, tokens, protocol, ctx, stride=stride, chunks=chunks, bos_id=bos,
                     batch_size=batch_size, progress=progress,
                     byte_lengths=token_byte_lengths(tokenizer))
    return record(res, model=model_name or model.config._name_or_path, data=data, split=split,
                  data_sha256=sha256_text(load_text(data, split)), max_tokens=max_tokens,
                  chunks=chunks)


@dataclass(frozen=True)
class EvalSettings:
    """Which tokens an evaluation scores and how: corpus, split, protocol, context, how many
    tokens (``max_tokens``) or windows (``chunks``), windows per forward pass (``batch_size``)."""
    data: str = "pydoc"
    split: str = "test"
    protocol: str = "gptq"
    ctx: int = 512
    max_tokens: int | None = None
    chunks: int | None = None
    batch_size: int = 4

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`evaluate_paired`."""
        return dataclasses.asdict(self)


def evaluate_paired(model, reference, tok, *, data: str = "pydoc", split: str = "test",
                       protocol: str = "gptq", ctx: int = 512, stride: int | None = None,
                       max_tokens: int | None = None, chunks: int | None = None,
                       batch_size: int = 4, progress: bool = False) -> dict:
    """``model`` against ``reference`` on the same tokens: both perplexities, the paired ΔNLL
    with its standard error, KL(P_reference ‖ P_model) (mean, se, p99) and top-1 agreement.

    The one paired evaluation of the library: every compressed model (quantized, pruned,
    factorized, distilled) is compared with its reference through it.
    """
    from edgellm.data import get_tokens, load_text, sha256_text

    tokens = get_tokens(data, tok, split, max_tokens)
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    t0 = time.perf_counter()
    # time the quantized model's own forward passes (the reference runs in the same loop)
    clock = {"start": 0.0, "seconds": 0.0}

    def pre(module, args, kwargs=None):
        synchronize(model_device(module))  # a GPU runs ahead of the clock: wait for it
        clock["start"] = time.perf_counter()

    def post(module, args, output):
        synchronize(model_device(module))
        clock["seconds"] += time.perf_counter() - clock["start"]

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        r = token_logprobs(model, tokens, protocol, ctx, stride=stride, chunks=chunks,
                           bos_id=bos, batch_size=batch_size, progress=progress,
                           reference=reference)
    finally:
        for h in handles:
            h.remove()
    q, base = ppl_from_nll(r["nll"]), ppl_from_nll(r["nll_ref"])
    d_mean, d_se = mean_stderr(r["nll"] - r["nll_ref"])
    return {"ppl": q["ppl"], "ppl_stderr": q["ppl_stderr"], "nll": q["nll"],
            "ppl_base": base["ppl"], "ppl_base_stderr": base["ppl_stderr"],
            "delta_ppl": q["ppl"] - base["ppl"], "delta_nll": d_mean, "delta_nll_stderr": d_se,
            **kl_summary(r["kl"]),
            "top1_agreement": r["top1"].mean().item(), "n_tokens": r["nll"].numel(),
            "protocol": protocol, "ctx": ctx, "stride": stride, "data": data, "split": split,
            "data_sha256": sha256_text(load_text(data, split)), "max_tokens": max_tokens,
            "chunks": chunks, "seconds_eval": time.perf_counter() - t0,
            "seconds_model": clock["seconds"],
            "eval_tokens_per_s": r["n_fed"] / clock["seconds"] if clock["seconds"] else None,
            "speed_protocol": {"eval_tokens_per_s": speed_protocol(
                "eval-loop", batch=batch_size, ctx=ctx, ppl_protocol=protocol)}}


def evaluate_kl(model, reference, tokenizer, data: str = "pydoc", *, split: str = "test",
                protocol: str = "gptq", ctx: int = 512, stride: int | None = None,
                max_tokens: int | None = None, chunks: int | None = None, batch_size: int = 2,
                progress: bool = True, model_name: str | None = None,
                reference_name: str | None = None) -> dict:
    """KL divergence of ``model`` against ``reference`` on a corpus split, as a record
    (:func:`evaluate_paired`, so PPL of both and the paired ΔNLL come with it)."""
    from edgellm.records import record

    res = evaluate_paired(model, reference, tokenizer, data=data, split=split,
                          protocol=protocol, ctx=ctx, stride=stride, max_tokens=max_tokens,
                          chunks=chunks,
                          batch_size=batch_size, progress=progress)
    return record(res, model=model_name or model.config._name_or_path,
                  reference=reference_name or reference.config._name_or_path)
