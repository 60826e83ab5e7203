"""The graded open task of lab 11: the GGUF file whose decoded token reads the fewest bytes
under a quality limit measured by llama.cpp itself (:class:`edgellm.course.labchecks.Verdict`)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from edgellm.course.labchecks import LabTaskError, Verdict


def lean_file_task(path, f32_gguf, reference, tokenizer, *, max_tokens: int = 4096,
                   gen_tokens: int = 64, max_delta_nll: float = 0.05, target: float = 0.75,
                   threads: int = 1, rounds: int = 1, position: int = 128) -> Verdict:
    """Lab 11: ``path`` is a GGUF made from ``f32_gguf`` (the F32 export of ``reference``).

    Constraints: its linears are quantized (not F32/F16) and its ΔNLL against ``reference`` in
    PyTorch, run by llama.cpp on the first ``max_tokens`` tokens of the pydoc test split, is at
    most ``max_delta_nll``.  ``value``: the bytes a decoded token reads from it (at KV position
    ``position``: :func:`edgellm.deploy.export.gguf_decode_bytes`) over those of the Q8_0 file
    of the same model (``llama-quantize``, embedding Q8_0); pass at ≤ ``target``.  The graded
    value is read from the files, so it is the same on every machine; the decode speeds of both
    files, timed alternately ``rounds`` times at ``threads`` threads (the fastest kept), are
    reported beside it, not graded (what fewer bytes buy depends on the CPU: lesson 11,
    section 7)."""
    from edgellm.deploy.export import gguf_bpw, gguf_decode_bytes, tensor_types
    from edgellm.deploy.export_quant import evaluate_gguf
    from edgellm.deploy.llamacpp_quant import quantize
    from edgellm.deploy.runtime import bench_llamacpp, prompt_ids

    name = "bytes read per decoded token / Q8_0's"
    path, f32_gguf = Path(path), Path(f32_gguf)
    if not f32_gguf.is_file():
        raise LabTaskError(f"{f32_gguf}: the F32 GGUF of the model is needed as the starting point")
    if not path.is_file() or path.suffix != ".gguf":
        return Verdict(name, math.inf, target, 1.0, [f"{path}: not a GGUF file"])
    linears = {n: t for n, t in tensor_types(path).items()
               if n.startswith("blk.") and not n.endswith("norm.weight")}
    violations = []
    unquantized = [n for n, t in linears.items() if t in ("F32", "F16", "BF16")]
    if not linears or unquantized:
        violations.append(f"{len(unquantized)} linears are not quantized (e.g. "
                          f"{(unquantized or ['?'])[0]}): write a quantized file")
    q = evaluate_gguf(path, reference, tokenizer, protocol="gptq", ctx=512,
                      max_tokens=max_tokens, threads=threads)
    if q["delta_nll"] > max_delta_nll:
        violations.append(f"ΔNLL {q['delta_nll']:+.4f} ± {q['delta_nll_stderr']:.4f} > "
                          f"{max_delta_nll} on {q['n_tokens']} tokens")
    ids = prompt_ids(tokenizer, 64)
    with tempfile.TemporaryDirectory(prefix="edgellm-lab11-") as tmp:
        q8 = quantize(f32_gguf, Path(tmp) / "q8_0.gguf", "Q8_0", token_embedding_type="Q8_0",
                      threads=threads)
        read = {key: gguf_decode_bytes(f, position=position)["bytes_per_token"]
                for key, f in (("mine", path), ("q8_0", q8))}
        speed = {"mine": 0.0, "q8_0": 0.0}
        for _ in range(rounds):
            for key, f in (("q8_0", q8), ("mine", path)):
                r = bench_llamacpp(f, ids, gen_tokens=gen_tokens, threads=threads, repeats=1)
                speed[key] = max(speed[key], r["decode_tokens_per_s"] or 0.0)
    return Verdict(name, read["mine"] / read["q8_0"], target, 1.0, violations,
                   {"delta_nll": q["delta_nll"], "delta_nll_se": q["delta_nll_stderr"],
                    "bytes_per_token": read["mine"], "q8_0_bytes_per_token": read["q8_0"],
                    "decode_tokens_per_s": speed["mine"],
                    "q8_0_decode_tokens_per_s": speed["q8_0"], "bpw": gguf_bpw(path)})


def largest_new_tensor_bytes(fn, *args, **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` and return ``(result, bytes)``: the largest tensor any PyTorch
    operation created during the call (every op's outputs, seen by a dispatch mode; a view of
    an input shares its storage and is not counted).  A C++
    extension's internal buffers are not seen, only what it returns."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    known = {a.untyped_storage().data_ptr() for a in (*args, *kwargs.values())
             if isinstance(a, torch.Tensor)}
    seen = {"max": 0}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known:
                    seen["max"] = max(seen["max"], t.untyped_storage().nbytes())
            return out

    with Watch():
        result = fn(*args, **kwargs)
    return result, seen["max"]


def gemv_task(fn, *, n: int = 49152, k: int = 576, target: float = 1 / 16, repeats: int = 5,
              seed: int = 0) -> Verdict:
    """Lab 12: ``fn(packed, scales, x) -> y`` on a random Q4_0 matrix (N, K) in the row layout of
    :func:`edgellm.kernels.q4.pack_rows`.

    Constraint: ``y`` equals :func:`edgellm.kernels.q4.dense_reference` within float32 rounding
    (max |error| ≤ 1e-4 · max |y|).  ``value``: the largest tensor any PyTorch operation creates
    during one call (:func:`largest_new_tensor_bytes`) over the float32 matrix's bytes (the
    unpack-then-matmul baseline's figure is computed the same way); pass at ≤ ``target``.  The
    time per call of ``fn``, the baseline and the course's torch variant (best of ``repeats``,
    alternated) and their GB/s of packed bytes come back in ``details``, not graded."""
    import time

    import torch

    from edgellm.kernels.q4 import (
        dense_reference,
        pack_rows,
        packed_bytes,
        quantize_q4_0,
        torch_packed,
        unpack_matmul,
    )

    name = "largest tensor created / the fp32 matrix"
    g = torch.Generator().manual_seed(seed)
    codes, scales = quantize_q4_0(torch.randn(n, k, generator=g) * 0.02)
    packed, x = pack_rows(codes), torch.randn(k, generator=g)
    ref = dense_reference(codes, scales, x)
    fp32 = n * k * 4
    try:
        y, biggest = largest_new_tensor_bytes(fn, packed, scales, x)
    except Exception as e:                             # a student's kernel may fail in any way
        return Verdict(name, math.inf, target, 1.0, [f"the kernel raised {type(e).__name__}: {e}"])
    violations = []
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (n,):
        violations.append(f"returned {getattr(y, 'shape', type(y))}, not a tensor of shape ({n},)")
    else:
        err = (y.double() - ref.double()).abs().max().item()
        if not err <= 1e-4 * ref.abs().max().item():
            violations.append(f"max |y − dense| = {err:.3g}, above float32 rounding "
                              f"({1e-4 * ref.abs().max().item():.3g})")
    base = largest_new_tensor_bytes(unpack_matmul, packed, scales, x)[1] / fp32
    best = {"mine": math.inf, "unpack_matmul": math.inf, "torch_packed": math.inf}
    for _ in range(repeats):
        for key, f in (("mine", fn), ("unpack_matmul", unpack_matmul),
                       ("torch_packed", torch_packed)):
            t0 = time.perf_counter()
            f(packed, scales, x)
            best[key] = min(best[key], time.perf_counter() - t0)
    nbytes = packed_bytes(n, k)
    details = {f"{key}_gbytes_per_s": nbytes / s / 1e9 for key, s in best.items()}
    return Verdict(name, biggest / fp32, target, base, violations, details)
