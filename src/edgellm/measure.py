"""Speed and memory, each figure under a named protocol.

Every speed or memory number a record reports comes from a function here, and the record says
which protocol produced it (``speed_protocol``), so that two different measurements never share
one key.
"""

from __future__ import annotations

import time

import torch

from edgellm.errors import EdgeLLMError


class MeasureError(EdgeLLMError, ValueError):
    """Settings that measure nothing (no steps, too few tokens for one window)."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@torch.inference_mode()
def bare_forward_seconds(model, tokens: torch.Tensor, ctx: int = 512, n_windows: int = 8,
                         batch_size: int = 4) -> tuple[float, int]:
    """Seconds for plain forward passes over the first ``n_windows`` windows (a speed floor)."""
    ids = tokens[: n_windows * ctx].view(-1, ctx)
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model(input_ids=ids[i:i + batch_size], use_cache=False)
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
    ids = torch.as_tensor(prompt, dtype=torch.long).flatten().view(1, -1)

    def steps(n: int) -> float:
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0

    if warmup:
        steps(warmup)
    runs = sorted(steps(new_tokens) for _ in range(repeats))
    seconds = runs[len(runs) // 2]
    return {"decode_tokens_per_s": new_tokens / seconds, "decode_seconds": seconds,
            "decode_new_tokens": new_tokens, "prompt_tokens": ids.shape[1]}


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


@torch.inference_mode()
def tokens_per_s(model: torch.nn.Module, tokens: torch.Tensor, ctx: int = 512,
                 batch_size: int = 4, max_windows: int | None = None, warmup: int = 1) -> dict:
    """Throughput of plain forward passes (no KV cache, full logits) over consecutive windows
    of ``ctx`` tokens, after ``warmup`` untimed single-window passes (first-call costs: kernel
    selection, lazy re-packing)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n_windows = len(tokens) // ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise MeasureError(f"{len(tokens)} tokens make no window of ctx={ctx}; use a smaller "
                         "--ctx or more --max-tokens")
    for _ in range(warmup):
        model(input_ids=tokens[:ctx].view(1, ctx), use_cache=False)
    seconds, n = bare_forward_seconds(model, tokens, ctx, n_windows, batch_size)
    return {"tokens_per_s": n / seconds, "seconds_forward": seconds, "n_tokens_speed": n}


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
    ids = tokens[:batch_size * seq_len].view(batch_size, seq_len)
    model(input_ids=ids[:, :8], use_cache=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        best = min(best, time.perf_counter() - t0)
    return ids.numel() / best


@torch.inference_mode()
def paired_tokens_per_s(model, reference, tokens: torch.Tensor, *, seq_len: int = 256,
                        batch_size: int = 1, repeats: int = 5) -> tuple[float, float]:
    """Forward tokens/s of ``model`` and of ``reference``, timed alternately (best of
    ``repeats`` each), so a change in the machine's load hits both alike; returns
    ``(model tokens/s, reference tokens/s)``.  Their ratio is the honest speed-up."""
    if len(tokens) < batch_size * seq_len:
        raise MeasureError(f"{len(tokens)} tokens are too few to time {batch_size} x {seq_len}")
    ids = tokens[:batch_size * seq_len].view(batch_size, seq_len)
    best = [float("inf"), float("inf")]
    for m in (model, reference):
        m(input_ids=ids[:, :8], use_cache=False)  # warm-up
    for _ in range(repeats):
        for i, m in enumerate((model, reference)):
            t0 = time.perf_counter()
            m(input_ids=ids, use_cache=False, logits_to_keep=1)
            best[i] = min(best[i], time.perf_counter() - t0)
    return ids.numel() / best[0], ids.numel() / best[1]
