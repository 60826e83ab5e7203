"""The machine's limits, measured, and the bounds they put on decoding and prefill.

Decoding one token at batch 1 reads every weight once and does two FLOPs per weight: about
one FLOP per byte for a 16-bit model, four for a 4-bit one, far below what a CPU core can
compute per byte it reads.  So decode speed is bounded by memory bandwidth::

    decode tokens/s  ≤  read bandwidth / bytes read per token

(each tensor as stored; the embedding lookup reads one row; a tied output matrix is read in
full once; plus the KV cache up to the current position).  Prefill processes many tokens per
weight read and is bounded by arithmetic instead: ``peak FLOP/s / FLOPs per token``.  This is the
roofline model (Williams, Waterman & Patterson, 2009) with arithmetic intensity on the x axis.

Bandwidth is measured the way the bound uses it: a read-only reduction (``sum``) over arrays far
larger than the last-level cache, at the benchmark's thread count, best of several repeats; copy
(read + write) and triad (``a = b + s·c``, 2 reads + 1 write) are reported for reference, as
STREAM does.  Peak compute is the best of several large matmuls (fp32, and int8 → int32 through
``torch._int_mm`` where this build has it).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from edgellm.measure import best_seconds

METHOD = {
    "bandwidth_bytes_per_s": "read-only sum over a {mib} MiB fp32 array, best of {repeats}",
    "copy_bytes_per_s": "dst.copy_(src), {mib} MiB each, 2 × bytes moved, best of {repeats}",
    "triad_bytes_per_s": "a = b + 3·c (torch.add with alpha), {mib} MiB each, 3 × bytes, best of {repeats}",
    "peak_flops": "fp32 matmul {n}×{n}·{n}×{n}, 2n³ FLOPs, best of {repeats}",
    "peak_int8_ops": "int8 matmul {n}×{n} → int32 (torch._int_mm), 2n³ ops, best of {repeats}",
}


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; elsewhere the platform's string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bandwidths(numel: int, repeats: int) -> dict:
    a, b, c = (torch.rand(numel) for _ in range(3))
    nbytes = numel * 4
    return {"bandwidth_bytes_per_s": nbytes / best_seconds(lambda: a.sum(), repeats),
            "copy_bytes_per_s": 2 * nbytes / best_seconds(lambda: a.copy_(b), repeats),
            "triad_bytes_per_s": 3 * nbytes / best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a),
                                                    repeats)}


def measure(*, threads: int | None = None, mib: int = 512, n: int = 1024,
            repeats: int = 5) -> dict:
    """Read / copy / triad bandwidth (bytes/s) and peak fp32 / int8 matmul throughput at
    ``threads`` torch threads, with the method of each number and the CPU it was measured on."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out = _bandwidths(mib * 2 ** 20 // 4, repeats)
        x, y = torch.randn(n, n), torch.randn(n, n)
        out["peak_flops"] = 2 * n ** 3 / best_seconds(lambda: x @ y, repeats)
        try:
            qi = torch.randint(-128, 127, (n, n), dtype=torch.int8)
            out["peak_int8_ops"] = 2 * n ** 3 / best_seconds(lambda: torch._int_mm(qi, qi), repeats)
        except (RuntimeError, AttributeError):             # no int8 matmul in this build
            out["peak_int8_ops"] = None
        out.update(threads=torch.get_num_threads(), cpu=cpu_name(),
                   cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   method={k: v.format(mib=mib, n=n, repeats=repeats) for k, v in METHOD.items()})
        return out
    finally:
        torch.set_num_threads(old)


def bytes_per_token(tensors: dict[str, int], *, rows: dict[str, int] | None = None,
                    kv_bytes_per_position: int = 0, position: int = 0) -> int:
    """Bytes decoding one token reads: every tensor's stored bytes (``tensors``: name → bytes),
    except the ones in ``rows`` (name → number of rows: an embedding looked up, of which one row
    is read), plus ``kv_bytes_per_position × position`` of KV cache.  A tied output matrix is
    the embedding read in full: list it in ``tensors`` under its own name as well."""
    rows = rows or {}
    total = 0
    for name, n in tensors.items():
        total += n // rows[name] if name in rows else n
    return total + kv_bytes_per_position * position


def decode_bound(bandwidth_bytes_per_s: float, bytes_per_token_read: int) -> float:
    """The memory-bound ceiling on decode tokens/s."""
    return bandwidth_bytes_per_s / bytes_per_token_read


def prefill_bound(peak_flops: float, flops_per_token: float) -> float:
    """The compute-bound ceiling on prefill tokens/s."""
    return peak_flops / flops_per_token


def model_read(model, *, position: int) -> tuple[int, int, int]:
    """``(bytes read per decoded token, weights a token multiplies, bytes held)`` of a PyTorch
    model as stored (quantized linears at their packed size): the tied embedding is read once,
    as the output matrix, and one row of it for the lookup; an untied input embedding is a lookup,
    not a matmul."""
    from edgellm.measure import memory_report
    from edgellm.quant.kv import kv_cache_bytes

    embed = model.get_input_embeddings().weight
    mem = memory_report(model)
    params = {"linears": mem["memory_bytes_linears"], "other": mem["memory_bytes_other"],
              "embedding": mem["memory_bytes_embedding"]}
    if model.config.tie_word_embeddings:
        params["lm_head (tied)"] = params["embedding"]
    read = bytes_per_token(params, rows={"embedding": embed.shape[0]},
                           kv_bytes_per_position=kv_cache_bytes(model.config, 1,
                                                                8 * embed.element_size()),
                           position=position)
    return read, matmul_weights(model), mem["memory_bytes"]


def matmul_weights(model) -> int:
    """Weights a token multiplies: all parameters, the tied embedding once (as the output
    matrix); an untied input embedding is a lookup, not a matmul."""
    n = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def default_config():
    """The default model's config and :func:`matmul_weights`, without loading its weights (the
    model is built on the meta device): for runtimes that run an exported file of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgellm.models import DEFAULT_MODEL, ensure_cached

    config = AutoConfig.from_pretrained(ensure_cached(DEFAULT_MODEL, quiet=True))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, matmul_weights(model)


def file_read(size_bytes: int, config, *, separate_embedding: bool, position: int) -> int:
    """Bytes read per decoded token of an exported fp32-embedding model file of ``size_bytes``:
    everything in it once, except a separate (untied) embedding table, of which one row."""
    from edgellm.quant.kv import kv_cache_bytes

    table = config.vocab_size * config.hidden_size * 4
    row = config.hidden_size * 4
    read = size_bytes - table + row if separate_embedding else size_bytes + row
    return read + kv_cache_bytes(config, 1, 32) * position
