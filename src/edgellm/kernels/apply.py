"""The library entry points of lesson 12: :func:`bench` (W4A32 GEMV variants against the
machine's read bandwidth and against llama.cpp), :func:`fusion` and :func:`sparsity`.

Each returns a record (a dict) that ``edgellm kernels bench|fusion|sparsity --json`` prints.

How :func:`bench` times a kernel: decoding reads each weight matrix once per token, from DRAM,
since a model does not fit in the last-level cache.  A micro-benchmark that calls a kernel on
one matrix again and again would read it from the cache instead and look faster than decoding
can ever be.  So each variant runs over ``copies`` rotating copies of its packed matrix that
together take at least ``footprint`` bytes (default 4 × the last-level cache): by the time a
copy comes round again, it has been evicted.  One pass over all copies is one repeat; the time
per call is the pass's time / copies; ``seconds`` is the best repeat, ``seconds_median`` the
median.  ``gbytes_per_s`` counts the bytes a call must read or write: packed codes, fp16
scales, ``x`` and ``y`` (fp32); ``fraction_of_bound`` divides it by the read bandwidth that
:func:`edgellm.deploy.roofline.measure` finds at the same thread count.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from pathlib import Path

import torch

from edgellm.kernels import q4
from edgellm.kernels.cpp_source import SOURCE
from edgellm.kernels.q4 import KernelError

VARIANTS = ("unpack_matmul", "torch_packed", "cpp_scalar", "cpp_simd", "llamacpp_q4_0")
CPP_VARIANTS = ("cpp_scalar", "cpp_simd")
DEFAULT_SHAPES = ((1536, 576), (49152, 576))   # an MLP matrix; the embedding / output matrix
FALLBACK_LLC_BYTES = 32 * 2 ** 20


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1536x576,49152x576"`` → ``[(1536, 576), (49152, 576)]`` (N × K, K a multiple of 32)."""
    shapes = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", part)
        if not m:
            raise KernelError(f"shape {part.strip()!r}: give N x K as e.g. 1536x576 (rows x "
                              "columns), several separated by commas")
        shapes.append((int(m.group(1)), int(m.group(2))))
        q4.check_shape(*shapes[-1])
    return shapes


def check_variants(names) -> tuple[str, ...]:
    """The variant names, checked against :data:`VARIANTS`."""
    names = tuple(names)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise KernelError(f"unknown variant {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(VARIANTS)}")
    return names


def llc_bytes() -> int:
    """The last-level (L3) cache of CPU 0 from ``/sys/devices/system/cpu/cpu0/cache``; 32 MiB
    where it cannot be read."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if m:
            return int(m.group(1)) * units.get(m.group(2), 1)
    return FALLBACK_LLC_BYTES


def rotating_seconds(fn, copies: list, *, repeats: int = 5) -> tuple[float, float]:
    """``(best, median)`` seconds per call of ``fn(*c)`` over the rotating ``copies``: each
    repeat is one pass over all of them, after an untimed pass."""
    for c in copies:
        fn(*c)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in copies:
            fn(*c)
        runs.append((time.perf_counter() - t0) / len(copies))
    return min(runs), statistics.median(runs)


def _torch_and_cpp(name: str, ext, simd: bool):
    """``(function(packed, scales, x), layout)`` of a variant run in this process (the SIMD
    path chosen once, so that no call pays for the check)."""
    from edgellm.kernels import cpp

    return {"unpack_matmul": (q4.unpack_matmul, "rows"),
            "torch_packed": (q4.torch_packed, "rows"),
            "cpp_scalar": (lambda p, s, x: cpp.cpp_scalar(p, s, x, ext=ext), "rows"),
            "cpp_simd": (lambda p, s, x: cpp.cpp_simd(p, s, x, simd=simd, ext=ext),
                         "interleaved")}[name]


def _row(name, shape, seconds, median, y, ref, bound, copies, **extra) -> dict:
    nbytes = q4.packed_bytes(*shape)
    err = (y - ref).abs().max().item()
    return {"name": name, "shape": list(shape), "seconds": seconds, "seconds_median": median,
            "gbytes_per_s": nbytes / seconds / 1e9, "fraction_of_bound": nbytes / seconds / bound,
            "max_abs_err": err, "rel_err": err / max(ref.abs().max().item(), 1e-30),
            "bytes_per_call": nbytes, "copies": copies, **extra}


def bench_shape(shape, *, variants=VARIANTS, ext=None, harness=None, bound: float,
                footprint: int, repeats: int = 5, threads: int = 1, seed: int = 0):
    """Every variant on one (N, K) shape: ``(rows, skipped)`` (see :func:`bench`).  ``ext``:
    the built C++ module (None: its variants are not run); ``harness``: llama.cpp's program
    (None: not run); ``bound``: read bandwidth in bytes/s."""
    from edgellm.kernels.cpp import KernelUnavailable, avx2_available
    from edgellm.kernels.ggml_harness import run_harness

    N, K = shape
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) * 0.02                        # (N, K) like a weight
    x = torch.randn(K, generator=gen)                                  # (K,)
    codes, scales = q4.quantize_q4_0(W)
    ref = q4.dense_reference(codes, scales, x)                         # (N,)
    layouts = {"rows": q4.pack_rows, "interleaved": q4.pack_interleaved}
    copies = max(1, math.ceil(footprint / (N * K // 2 + scales.numel() * 2)))
    rows, skipped = [], {}
    for name in variants:
        if name == "llamacpp_q4_0":
            if harness is None:
                continue
            try:
                res = run_harness(W, x, threads=threads, copies=copies, repeats=repeats,
                                  exe=harness)
            except KernelUnavailable as e:
                skipped[name] = str(e)
                continue
            ours = q4.q4_0_blocks(q4.pack_interleaved(codes), scales)
            same = (res["blocks"] == ours).float().mean().item()
            rows.append(_row(name, shape, res["seconds"], res["seconds_median"], res["y"], ref,
                             bound, copies, layout="block_q4_0", activations="q8_0",
                             blocks_equal_ours=same))
            continue
        if name in CPP_VARIANTS and ext is None:
            continue
        simd = ext is not None and avx2_available(ext)
        fn, layout = _torch_and_cpp(name, ext, simd)
        packed = layouts[layout](codes)
        extra = {"layout": layout}
        if name == "cpp_simd":
            extra["path"] = "avx2" if simd else "scalar"
        pool = [(packed.clone(), scales.clone(), x) for _ in range(copies)]
        y = fn(*pool[0])
        best, median = rotating_seconds(fn, pool, repeats=repeats)
        rows.append(_row(name, shape, best, median, y, ref, bound, copies, **extra))
        del pool
    return rows, skipped


def bench(*, shapes=DEFAULT_SHAPES, threads: int = 1, variants=VARIANTS, repeats: int = 5,
          footprint_mib: float | None = None, bound_mib: int = 512,
          cpp_source: str = SOURCE, seed: int = 0) -> dict:
    """The record of ``edgellm kernels bench``: each W4A32 GEMV variant on each (N, K) shape.

    ``variants`` rows: ``name``, ``shape``, ``gbytes_per_s``, ``fraction_of_bound``,
    ``max_abs_err`` (against the float64 product of the dequantized weights, see
    :func:`edgellm.kernels.q4.dense_reference`), ``rel_err``, ``seconds``, ``seconds_median``,
    ``copies``, ``bytes_per_call``, ``layout``.  ``skipped``: variant → why it did not run (no
    compiler, llama.cpp not built).  ``footprint_mib``: bytes of rotating copies (default 4 ×
    the last-level cache); ``bound_mib``: the array of the bandwidth measurement (tests shrink
    both).  ``cpp_source``: the C++ to build (a test gives a broken one)."""
    from edgellm.deploy.roofline import cpu_name, measure
    from edgellm.kernels.cpp import KernelUnavailable, extension
    from edgellm.kernels.ggml_harness import build_harness
    from edgellm.records import record

    shapes = [tuple(s) for s in shapes]
    for s in shapes:
        q4.check_shape(*s)
    variants = check_variants(variants)
    if threads < 1 or repeats < 1:
        raise KernelError(f"threads={threads}, repeats={repeats}: give positive numbers")
    t0 = time.perf_counter()
    llc = llc_bytes()
    footprint = int(footprint_mib * 2 ** 20) if footprint_mib is not None else 4 * llc
    skipped, ext, harness = {}, None, None
    if any(v in CPP_VARIANTS for v in variants):
        try:
            ext = extension(cpp_source)
        except KernelUnavailable as e:
            skipped.update({v: str(e) for v in variants if v in CPP_VARIANTS})
    if "llamacpp_q4_0" in variants:
        try:
            harness = build_harness()
        except KernelUnavailable as e:
            skipped["llamacpp_q4_0"] = str(e)
    # only the read bandwidth is used: small matmuls keep the peak-compute part short
    roof = measure(threads=threads, mib=bound_mib, n=128, repeats=max(3, repeats))
    bound = roof["bandwidth_bytes_per_s"]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for shape in shapes:
            got, why = bench_shape(shape, variants=variants, ext=ext, harness=harness,
                                   bound=bound, footprint=footprint, repeats=repeats,
                                   threads=threads, seed=seed)
            rows += got
            skipped.update(why)
    finally:
        torch.set_num_threads(old)
    rec = {"variants": rows, "skipped": skipped, "shapes": [list(s) for s in shapes],
           "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "llc_bytes": llc, "footprint_bytes": footprint, "repeats": repeats,
           "bound_gbytes_per_s": bound / 1e9, "bound_method": roof["method"]["bandwidth_bytes_per_s"],
           "timing": "best (seconds) and median (seconds_median) of `repeats` passes over "
                     "`copies` rotating copies of the packed matrix (≥ footprint_bytes), per call",
           "seconds": time.perf_counter() - t0}
    return {**record(rec, protocol="kernels-bench", data=None, seed=seed), "threads": threads}


def fusion(*, hidden: int = 576, intermediate: int = 1536, tokens=(1, 256), threads: int = 1,
           repeats: int = 5, calls: int = 200, compile: bool = True, cpp_source: str = SOURCE,
           seed: int = 0) -> dict:
    """The record of ``edgellm kernels fusion``: ``rows`` of SiLU·up (separate, fused C++,
    torch.compile), the whole MLP with separate ops for scale, and RMSNorm unfused vs folded
    into the next matmul, each at every ``tokens`` count; ``skipped``: what could not run and
    why.  Rows: ``name``, ``tokens``, ``seconds``, ``seconds_median``, ``max_abs_err``."""
    from edgellm.kernels import fusion as fu
    from edgellm.kernels.cpp import KernelUnavailable, extension
    from edgellm.records import record

    if min(hidden, intermediate, threads, repeats, calls, *tokens) < 1:
        raise KernelError("hidden, intermediate, tokens, threads, repeats and calls must all "
                          "be positive")
    t0 = time.perf_counter()
    skipped, ext = {}, None
    try:
        ext = extension(cpp_source)
    except KernelUnavailable as e:
        skipped["silu_mul_fused_cpp"] = str(e)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for t in tokens:
            got, why = fu.silu_mul_rows(intermediate=intermediate, tokens=t, calls=calls,
                                        repeats=repeats, ext=ext, compile=compile, seed=seed)
            rows += got
            skipped.update(why)
            rows.append(fu.mlp_row(hidden=hidden, intermediate=intermediate, tokens=t,
                                   calls=max(1, calls // 4), repeats=repeats, seed=seed))
            rows += fu.rmsnorm_fold_rows(hidden=hidden, out_features=intermediate, tokens=t,
                                         calls=calls, repeats=repeats, seed=seed)
    finally:
        torch.set_num_threads(old)
    rec = {"rows": rows, "skipped": skipped, "hidden": hidden, "intermediate": intermediate,
           "tokens": list(tokens), "repeats": repeats, "calls": calls,
           "timing": "best (seconds) and median (seconds_median) of `repeats` loops of `calls` "
                     "calls, per call; inputs stay in cache",
           "seconds": time.perf_counter() - t0}
    return {**record(rec, protocol="kernels-fusion", data=None, seed=seed), "threads": threads}


def sparsity(model: str = "smollm2-135m", *, data: str = "pydoc", n_samples: int = 16,
             seq_len: int = 256, top: float = 0.1, near: float = 1e-3, batch_size: int = 4,
             seed: int = 0) -> dict:
    """The record of ``edgellm kernels sparsity``: :func:`edgellm.kernels.sparsity.
    activation_stats` of ``model`` on ``n_samples`` random windows of ``seq_len`` tokens of the
    train split of ``data`` (:func:`edgellm.data.get_calibration`)."""
    from edgellm.data import get_calibration
    from edgellm.kernels.sparsity import activation_stats, top_k
    from edgellm.models import load_model
    from edgellm.records import record

    top_k(10, top)
    if n_samples < 2 or seq_len < 1:
        raise KernelError(f"n_samples={n_samples}, seq_len={seq_len}: give at least 2 windows "
                          "(two halves are compared) of at least 1 token")
    t0 = time.perf_counter()
    net, tok = load_model(model, quiet=True, device="cpu")
    windows = get_calibration(data, n_samples, seq_len, seed, tokenizer=tok)
    rec = activation_stats(net, windows, top=top, near=near, batch_size=batch_size)
    rec.update(model=model, n_samples=n_samples, seq_len=seq_len,
               seconds=time.perf_counter() - t0)
    return record(rec, protocol="kernels-sparsity", data=data, seed=seed)
