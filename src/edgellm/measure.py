"""Speed and memory, each figure under a named protocol.

Every speed or memory number a record reports comes from a function here, and the record says
which protocol produced it (``speed_protocol``), so that two different measurements never share
one key.  Timed inputs go to the model's device, and a GPU is synchronized before each clock
reading (:func:`edgellm.devices.synchronize`).

Over 400 lines because the protocols' table, the timers and the memory accounting they name are
one concern: a figure and the definition it is reported under live side by side.
"""

from __future__ import annotations

import re
import statistics
import time

import torch

from edgellm.devices import model_device, synchronize, to_device
from edgellm.errors import EdgeLLMError


class MeasureError(EdgeLLMError, ValueError):
    """Settings that measure nothing (no steps, too few tokens for one window), or a record whose
    speed figures do not name their protocol."""


# --------------------------------------------------------------------------------------------
# the protocols: every speed key of a record names one of these in ``speed_protocol``

SPEED_PROTOCOLS = {
    "prefill": "plain forward passes without KV cache over `batch` windows of `ctx` tokens at a "
               "time, after `warmup` untimed windows; tokens fed / seconds (compute-bound)",
    "ttft-prefill": "one `prompt_tokens` prompt fed at once at batch 1, timed until the first "
                    "generated token is known (time to first token); prompt tokens / seconds, "
                    "median of `repeats` runs (compute-bound)",
    "decode-bound": "not a timing: the roofline ceiling on decode, read bandwidth (a read-only "
                    "sum over arrays far above the last-level cache, at `threads` threads) / "
                    "bytes read per decoded token at KV-cache `position`",
    "prefill-bound": "not a timing: the compute ceiling on prefill, peak matmul FLOP/s (fp32 "
                     "`torch.mm` of two n x n matrices at `threads` threads) / 2 FLOPs per "
                     "weight per token",
    "llama-bench-pp": "llama.cpp's llama-bench: one `prompt_tokens` prompt at batch `prompt_tokens`"
                      " from an empty cache, tokens / seconds, mean of `repeats` runs",
    "llama-bench-tg": "llama.cpp's llama-bench: `gen_tokens` single-token steps from an empty "
                      "cache (no prompt), tokens / seconds, mean of `repeats` runs",
    "loadtest": "a served model under load: `clients` concurrent clients each sending `requests` "
                "streamed completions of `max_tokens` greedy tokens one after another; streamed "
                "text events (one token each on llama.cpp's servers) of all requests / wall "
                "seconds of the whole test, prompts and HTTP included",
    "decode": "greedy generation at batch 1 with the KV cache after an untimed `prompt_tokens` "
              "prompt and `warmup` untimed steps; median of `repeats` runs of `new_tokens` steps "
              "(memory- and overhead-bound)",
    "generate": "greedy, batch 1, KV cache: `new_tokens` after each of `prompts` prompts of "
                "`prompt_tokens` tokens, prefill included; new tokens / wall seconds of all prompts",
    "paired-prefill": "candidate and reference forward passes (`batch` x `seq_len`, logits of the "
                      "last position) timed alternately in one process, `repeats` pairs after a "
                      "warm-up; each tokens/s is the median over pairs, speedup the median of the "
                      "per-pair ratios",
    "eval-loop": "the model's own forward passes inside the paired evaluation (hooks time them; "
                 "the reference's passes and the scoring are not counted); tokens fed / seconds",
    "eval-wall": "tokens fed / wall seconds of a whole perplexity loop (forward passes and "
                 "scoring)",
    "train": "tokens trained per second of the training loop: `batch` x `seq_len` tokens per "
             "step / wall seconds of all `steps` (forward, backward, optimizer step and, for "
             "distillation, the teacher's forward or the cached top-k lookup)",
    "legacy-eval-loop": "kept only for committed records: eval-loop throughput recorded as "
                        "tokens_per_s before protocols were named (settings from the command)",
    "legacy-eval-wall": "kept only for committed records: `edgellm ppl` tokens fed per wall "
                        "second, recorded as tokens_per_s before protocols were named",
    "legacy-paired-best-of-5": "kept only for committed records: pruned and unpruned forward "
                               "(batch 1 x 256 tokens, last-position logits) timed alternately, "
                               "the best of 5 of each (not a median of pair ratios)",
    "legacy-best-of-3": "kept only for committed records: pruned, then unpruned forward (batch 1 x "
                        "256 tokens, last-position logits), the best of 3 of each, not alternated",
}

# what each memory figure means (no protocol entry needed: one meaning per key)
MEMORY_KEYS = {
    "size_bytes": "packed size: the bytes the weights need as stored (codes, scales, the "
                  "unquantized tensors), whatever the process holds while simulating them",
    "memory_bytes": "held memory: bytes of every storage the model object really holds "
                    "(parameters, buffers, packed codes, quant states), each storage once",
    "peak_rss_bytes": "peak resident set size of the whole process (model, activations, "
                      "Python, libraries)",
}

# a speed key: ``<what>_tokens_per_s`` (train_, eval_, prefill_, decode_...) with an optional
# ``_base`` (the reference measured in the same run), or the paired ``speedup``
_SPEED_KEY = re.compile(r"^(?:[a-z0-9_]+_)?tokens_per_s(?:_[a-z0-9]+)?$|^speedup$")


def protocol(name: str, **settings) -> dict:
    """The ``speed_protocol`` entry ``{"name": name, **settings}``; ``name`` must be a key of
    :data:`SPEED_PROTOCOLS`."""
    if name not in SPEED_PROTOCOLS:
        raise MeasureError(f"unknown speed protocol {name!r}; define it in edgellm.measure."
                           f"SPEED_PROTOCOLS (known: {', '.join(SPEED_PROTOCOLS)})")
    return {"name": name, **settings}


def speed_keys(record: dict) -> list[str]:
    """The keys of ``record`` that hold a speed figure (see :func:`check_speed_keys`)."""
    return [k for k in record if _SPEED_KEY.match(k)]


def check_speed_keys(record: dict) -> None:
    """Raise :class:`MeasureError` unless every speed figure of ``record`` names its protocol.

    The rule: no bare ``tokens_per_s`` (or ``tokens_per_s_*``) except the load test's aggregate
    (``edgellm loadtest``'s public key, with its ``loadtest`` protocol entry); every key ending in
    ``tokens_per_s`` (or ``tokens_per_s_base``) and ``speedup`` has an entry in
    ``record["speed_protocol"]`` whose ``name`` is a key of :data:`SPEED_PROTOCOLS`.
    """
    problems = []
    entries = record.get("speed_protocol") or {}
    for k in speed_keys(record):
        if k.startswith("tokens_per_s") and (entries.get(k) or {}).get("name") != "loadtest":
            problems.append(f"{k!r} does not say what was timed; use prefill_, decode_, eval_ "
                            "or train_tokens_per_s")
            continue
        entry = entries.get(k)
        if not isinstance(entry, dict) or not entry.get("name"):
            problems.append(f"{k!r} has no speed_protocol entry")
        elif entry["name"] not in SPEED_PROTOCOLS:
            problems.append(f"{k!r} names protocol {entry['name']!r}, not defined in "
                            "edgellm.measure.SPEED_PROTOCOLS")
    if problems:
        raise MeasureError("speed figures without a protocol: " + "; ".join(problems)
                           + ". Measure them with edgellm.measure (its functions return the "
                           "speed_protocol entries)")


def as_base(res: dict) -> dict:
    """A measurement of the reference: each speed key gets ``_base`` (its protocol entry too)."""
    out = {f"{k}_base": v for k, v in res.items() if _SPEED_KEY.match(k)}
    out["speed_protocol"] = {f"{k}_base": v for k, v in res.get("speed_protocol", {}).items()}
    return out


def merge(rec: dict, *measured: dict) -> dict:
    """Update ``rec`` in place with measurements, merging their ``speed_protocol`` entries."""
    for res in measured:
        protocols = {**rec.get("speed_protocol", {}), **res.get("speed_protocol", {})}
        rec.update(res)
        rec["speed_protocol"] = protocols
    return rec


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started or since the last
    :func:`reset_peak_rss` (Linux: ``VmHWM`` of /proc/self/status; elsewhere ``ru_maxrss``,
    which cannot be reset)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement in this process (Linux: write 5 to
    /proc/self/clear_refs); returns False where the platform cannot (then
    :func:`peak_rss_bytes` keeps the whole process's peak).  ``edgellm results --run`` calls it
    before each command, so each record's ``peak_rss_bytes`` is that command's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.inference_mode()
def bare_forward_seconds(model, tokens: torch.Tensor, ctx: int = 512, n_windows: int = 8,
                         batch_size: int = 4) -> tuple[float, int]:
    """Seconds for plain forward passes over the first ``n_windows`` windows (a speed floor)."""
    ids = to_device(tokens[: n_windows * ctx].view(-1, ctx), model_device(model))
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model(input_ids=ids[i:i + batch_size], use_cache=False)
    synchronize(ids.device)
    return time.perf_counter() - t0, ids.numel()


@torch.inference_mode()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3,
                        warmup: int = 4) -> dict:
    """Greedy generation speed at batch 1: the prompt once, then one token per forward pass
    with the KV cache, which is what a chat user waits for.  Unlike a batched forward over
    long windows (compute-bound), each step reads every weight once for one token, so it is
    bound by memory traffic and per-call overhead: where weight-only quantization can help
    and per-token activation quantization costs most.  The median of ``repeats`` timed runs
    (after ``warmup`` untimed steps) of ``new_tokens`` steps each; the prompt is not timed."""
    if new_tokens < 1 or repeats < 1:
        raise MeasureError(f"new_tokens={new_tokens} and repeats={repeats}: time at least one "
                        "generation step once (both ≥ 1)")
    ids = to_device(torch.as_tensor(prompt, dtype=torch.long).flatten().view(1, -1),
                    model_device(model))

    def steps(n: int) -> float:
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(ids.device)
        return time.perf_counter() - t0

    if warmup:
        steps(warmup)
    runs = sorted(steps(new_tokens) for _ in range(repeats))
    seconds = runs[len(runs) // 2]
    return {"decode_tokens_per_s": new_tokens / seconds, "decode_seconds": seconds,
            "decode_new_tokens": new_tokens, "prompt_tokens": ids.shape[1],
            "speed_protocol": {"decode_tokens_per_s": protocol(
                "decode", batch=1, prompt_tokens=ids.shape[1], new_tokens=new_tokens,
                repeats=repeats, warmup=warmup)}}


def _leaf_tensors(t: torch.Tensor):
    """Plain tensors behind ``t``: itself, or the inner tensors of a tensor subclass."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):  # torchao's Int8Tensor: qdata, scale, zero_point
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _leaf_tensors(getattr(t, n))
    else:
        yield t


def _state_tensors(module: torch.nn.Module):
    """Tensors a library keeps outside ``parameters()``/``buffers()`` (bnb's quant states)."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    while qs is not None:  # Params4bit: absmax, code, offset, and the nested state2
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            if isinstance(t, torch.Tensor):
                yield t
        qs = getattr(qs, "state2", None)
    for holder in (getattr(module, "weight", None), getattr(module, "state", None)):
        for attr in ("CB", "SCB"):  # Linear8bitLt: int8 codes and the per-row scales
            t = getattr(holder, attr, None) if holder is not None else None
            if isinstance(t, torch.Tensor):
                yield t


def held_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(module name, plain tensor)`` for everything the model holds (may repeat storages)."""
    out = []
    for mname, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False))
        for _, t in own:
            out += [(mname, leaf) for leaf in _leaf_tensors(t)]
        out += [(mname, t) for t in _state_tensors(module)]
    return out


def memory_report(model: torch.nn.Module) -> dict:
    """Real bytes held by the model, each storage once (tied embedding = lm_head counted once).

    ``memory_bytes`` (total), ``memory_bytes_linears`` (the decoder linears: packed codes and
    their scales / quant states), ``memory_bytes_embedding`` and ``memory_bytes_other`` (norms).
    """
    seen: dict[int, tuple[str, int]] = {}
    for mname, t in held_tensors(model):
        try:
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # a subclass without real storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen[key] = (mname, nbytes)
    rep = {"memory_bytes": 0, "memory_bytes_linears": 0, "memory_bytes_embedding": 0,
           "memory_bytes_other": 0}
    for mname, nbytes in seen.values():
        kind = "embedding" if ("embed" in mname or "lm_head" in mname) else \
            "linears" if mname.rsplit(".", 1)[-1].endswith("_proj") else "other"
        rep[f"memory_bytes_{kind}"] += nbytes
        rep["memory_bytes"] += nbytes
    return rep


def memory_bytes(model: torch.nn.Module) -> int:
    """Real bytes held by parameters, buffers, packed storage and quant states (shared once)."""
    return memory_report(model)["memory_bytes"]


def packed_bytes(parts) -> int:
    """Packed size (``size_bytes``) of what a format stores: an object with ``size_bytes`` (a
    QTensor: codes + scales) counts that, a plain tensor its elements; not what the process
    holds while simulating the format (that is :func:`memory_bytes`)."""
    return sum(int(p.size_bytes) if hasattr(p, "size_bytes") else p.numel() * p.element_size()
               for p in parts)


@torch.inference_mode()
def prefill_tokens_per_s(model: torch.nn.Module, tokens: torch.Tensor, ctx: int = 512,
                         batch_size: int = 4, max_windows: int | None = None,
                         warmup: int = 1) -> dict:
    """Prefill throughput: plain forward passes (no KV cache, logits of every position) over
    consecutive windows of ``ctx`` tokens, ``batch_size`` windows per call, after ``warmup``
    untimed single-window passes (first-call costs: kernel selection, lazy re-packing).

    ``tokens``: 1-D LongTensor.  Returns ``prefill_tokens_per_s``, ``prefill_seconds``,
    ``prefill_tokens`` and its ``speed_protocol`` entry (protocol ``"prefill"``).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n_windows = len(tokens) // ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise MeasureError(f"{len(tokens)} tokens make no window of ctx={ctx}; use a smaller "
                         "--ctx or more --max-tokens")
    for _ in range(warmup):
        model(input_ids=to_device(tokens[:ctx].view(1, ctx), model_device(model)), use_cache=False)
    seconds, n = bare_forward_seconds(model, tokens, ctx, n_windows, batch_size)
    return {"prefill_tokens_per_s": n / seconds, "prefill_seconds": seconds,
            "prefill_tokens": n,
            "speed_protocol": {"prefill_tokens_per_s": protocol(
                "prefill", batch=batch_size, ctx=ctx, windows=n_windows, logits="all",
                warmup=warmup)}}


def best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls of ``fn()``, after one untimed call (pages in the
    data, spins up the threads): a floor for micro-benchmarks, where noise only adds time."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed(fn, *args, **kwargs):
    """``(result, seconds)`` of one call."""
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


@torch.inference_mode()
def forward_tokens_per_s(model, tokens: torch.Tensor, *, seq_len: int = 256, batch_size: int = 1,
                         repeats: int = 3) -> float:
    """Tokens per second of a plain forward pass (best of ``repeats``) on ``batch_size``
    windows of ``seq_len`` tokens; a speed measure of this machine, noisy under load."""
    ids = to_device(tokens[:batch_size * seq_len].view(batch_size, seq_len), model_device(model))
    model(input_ids=ids[:, :8], use_cache=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(ids.device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        synchronize(ids.device)
        best = min(best, time.perf_counter() - t0)
    return ids.numel() / best


def paired_prefill(model, reference, tokens: torch.Tensor, *, seq_len: int = 256,
                   batch_size: int = 1, repeats: int = 5, timer=time.perf_counter) -> dict:
    """The paired protocol: forward passes of ``model`` and ``reference`` timed alternately in
    one process, so a change in the machine's load hits both alike.

    Each pair times one pass of each on the same ``(batch_size, seq_len)`` window (logits of the
    last position only).  ``speedup`` is the median of the per-pair ratios
    ``t_reference / t_model``, which cancels load that drifts between pairs; the two tokens/s are
    the medians over pairs.  ``timer`` returns seconds (a fake one in tests).

    Returns ``prefill_tokens_per_s``, ``prefill_tokens_per_s_base``, ``speedup`` and their
    ``speed_protocol`` entries (protocol ``"paired-prefill"``).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if len(tokens) < batch_size * seq_len:
        raise MeasureError(f"{len(tokens)} tokens are too few to time {batch_size} x {seq_len}; "
                           "give more tokens or a smaller seq_len")
    if repeats < 1:
        raise MeasureError(f"repeats={repeats}: time at least one pair (repeats >= 1)")
    ids = tokens[:batch_size * seq_len].view(batch_size, seq_len)   # (B, T)
    pairs = [_paired_seconds(model, reference, ids, timer) for _ in range(-1, repeats)][1:]
    n = ids.numel()
    entry = protocol("paired-prefill", batch=batch_size, seq_len=seq_len, logits="last",
                     repeats=repeats, warmup=1)
    return {"prefill_tokens_per_s": n / statistics.median(t for t, _ in pairs),
            "prefill_tokens_per_s_base": n / statistics.median(t for _, t in pairs),
            "speedup": statistics.median(t_ref / t for t, t_ref in pairs),
            "speed_protocol": {k: entry for k in ("prefill_tokens_per_s",
                                                  "prefill_tokens_per_s_base", "speedup")}}


@torch.inference_mode()
def _paired_seconds(model, reference, ids: torch.Tensor, timer) -> tuple[float, float]:
    """``(seconds of model, seconds of reference)`` for one pass each, back to back."""
    out = []
    for m in (model, reference):
        x = to_device(ids, model_device(m))
        synchronize(x.device)
        t0 = timer()
        m(input_ids=x, use_cache=False, logits_to_keep=1)
        synchronize(x.device)  # a GPU runs ahead of the clock: wait for it
        out.append(timer() - t0)
    return out[0], out[1]
