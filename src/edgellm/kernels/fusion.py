"""Fusing the small operations around the matmuls of a decoder's MLP, measured.

At batch 1 a decoding step is a chain of matrix-vector products with small elementwise work
between them.  Each separate torch op is a dispatch (a few µs) and a pass over its operands; a
fused kernel does the same arithmetic in one pass.  Two fusions of the SwiGLU MLP
(``down(silu(gate(x)) · up(x))`` after an RMSNorm) are measured here:

* **SiLU·up**: ``F.silu(g) * u`` is two ops and one intermediate tensor; the fused C++ loop
  (:func:`edgellm.kernels.cpp.silu_mul`) reads ``g`` and ``u`` once and writes the result once;
  ``torch.compile`` (Inductor, which writes and compiles such a loop itself on CPU) where it
  works.  llama.cpp fuses the same pair (its ``ggml_swiglu``).  Fusion saves a pass over memory
  and a dispatch, but a fused loop calling ``std::exp`` one float at a time loses to torch's
  two vectorized ops: the fused kernel must be vectorized too (the AVX2 row) to win.
* **RMSNorm folded into the next matmul**: ``W (g ⊙ x / rms(x)) = (W diag(g)) (x / rms(x))``, so
  ``W' = W · diag(g)`` is precomputed once and the norm's multiply by ``g`` disappears.  Exact in
  real arithmetic, equal to float rounding in fp32.  A quantized ``W'`` is a different matrix
  from a quantized ``W`` (the scales of each group now carry ``g``); QuaRot and SpinQuant fold
  the norms this way before rotating, llama.cpp keeps them apart.

At decode shapes these save microseconds against a step of milliseconds: the weights' bytes,
not the elementwise work, set the pace (:mod:`edgellm.kernels.apply` measures that part).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def silu_mul_separate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up`` as two torch ops (the reference); any shape, float32."""
    return F.silu(gate) * up


def rmsnorm(x: torch.Tensor, g: torch.Tensor | None = None, *, eps: float = 1e-5) -> torch.Tensor:
    """Llama's RMSNorm over the last dimension: ``x / sqrt(mean(x²) + eps)``, times ``g``
    (hidden,) when given.  ``x`` (..., hidden) float32."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if g is None else y * g


def fold_rmsnorm(W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``W' = W · diag(g)``: ``W`` (out_features, in_features), ``g`` (in_features,) → (out, in),
    so that ``rmsnorm(x, g) @ W.T == rmsnorm(x) @ W'.T``."""
    return W * g


def per_call_seconds(fn, *, calls: int = 200, repeats: int = 5) -> tuple[float, float]:
    """``(best, median)`` seconds per call of ``fn()``, each repeat timing ``calls`` calls in a
    loop after one untimed call (for operations of a few µs, below one timer reading's noise)."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls)
    return min(runs), statistics.median(runs)


def compiled_silu_mul(gate: torch.Tensor, up: torch.Tensor):
    """``(torch.compile(silu_mul_separate), None)``, compiled and run once on ``gate``, ``up``;
    or ``(None, reason)`` where torch.compile fails here (no compiler, an unsupported build)."""
    try:
        fn = torch.compile(silu_mul_separate, dynamic=False)
        fn(gate, up)
        return fn, None
    except Exception as e:  # Inductor raises many kinds (BackendCompilerFailed, OSError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"torch.compile failed: {type(e).__name__}: {first[:300]}"


def silu_mul_rows(*, intermediate: int = 1536, tokens: int = 1, calls: int = 200,
                  repeats: int = 5, ext=None, compile: bool = True, seed: int = 0):
    """Timings of ``silu(gate) · up`` on (tokens, intermediate) float32 inputs: separate torch
    ops, the fused C++ loop, plain and AVX2 (``ext``, the built module, or None to skip both)
    and torch.compile.
    Returns ``(rows, skipped)``: rows ``{"name", "tokens", "seconds", "seconds_median",
    "max_abs_err"}`` (the error against the separate ops), skipped ``{name: reason}``."""
    from edgellm.kernels.cpp import avx2_available

    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(tokens, intermediate, generator=gen)             # (T, I)
    up = torch.randn(tokens, intermediate, generator=gen)               # (T, I)
    ref = silu_mul_separate(gate, up)
    fns = {"silu_mul_separate": silu_mul_separate}
    skipped = {}
    if ext is not None:
        fns["silu_mul_fused_cpp"] = lambda g, u: ext.silu_mul(g, u, False)
        if avx2_available(ext):
            fns["silu_mul_fused_avx2"] = lambda g, u: ext.silu_mul(g, u, True)
        else:
            skipped["silu_mul_fused_avx2"] = "this CPU lacks AVX2 or FMA"
    if compile:
        fn, reason = compiled_silu_mul(gate, up)
        if fn is None:
            skipped["silu_mul_compiled"] = reason
        else:
            fns["silu_mul_compiled"] = fn
    rows = []
    for name, fn in fns.items():
        best, median = per_call_seconds(lambda fn=fn: fn(gate, up), calls=calls, repeats=repeats)
        rows.append({"name": name, "tokens": tokens, "seconds": best, "seconds_median": median,
                     "max_abs_err": (fn(gate, up) - ref).abs().max().item()})
    return rows, skipped


def mlp_row(*, hidden: int = 576, intermediate: int = 1536, tokens: int = 1, calls: int = 50,
            repeats: int = 5, seed: int = 0) -> dict:
    """The whole SwiGLU MLP with separate ops (three float32 matmuls, SiLU, multiply) on
    (tokens, hidden): the time the SiLU·up fusion saves a part of."""
    gen = torch.Generator().manual_seed(seed)
    Wg, Wu = (torch.randn(intermediate, hidden, generator=gen) for _ in range(2))  # (I, H)
    Wd = torch.randn(hidden, intermediate, generator=gen)                            # (H, I)
    x = torch.randn(tokens, hidden, generator=gen)                                   # (T, H)
    best, median = per_call_seconds(
        lambda: F.linear(silu_mul_separate(F.linear(x, Wg), F.linear(x, Wu)), Wd),
        calls=calls, repeats=repeats)
    return {"name": "mlp_separate", "tokens": tokens, "seconds": best, "seconds_median": median,
            "max_abs_err": 0.0}


def rmsnorm_fold_rows(*, hidden: int = 576, out_features: int = 1536, tokens: int = 1,
                      eps: float = 1e-5, calls: int = 200, repeats: int = 5,
                      seed: int = 0) -> list[dict]:
    """RMSNorm then a (out_features, hidden) matmul, unfused (``rmsnorm(x, g) @ W.T``) and
    folded (``rmsnorm(x) @ W'.T``, :func:`fold_rmsnorm`): rows as :func:`silu_mul_rows`, the
    error of the folded one against the unfused one."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, hidden, generator=gen) / hidden ** 0.5    # (O, H)
    g = 1 + 0.5 * torch.randn(hidden, generator=gen)                         # (H,)
    x = torch.randn(tokens, hidden, generator=gen)                           # (T, H)
    W_folded = fold_rmsnorm(W, g)
    fns = {"rmsnorm_then_matmul": lambda: F.linear(rmsnorm(x, g, eps=eps), W),
           "rmsnorm_folded": lambda: F.linear(rmsnorm(x, eps=eps), W_folded)}
    ref = fns["rmsnorm_then_matmul"]()
    rows = []
    for name, fn in fns.items():
        best, median = per_call_seconds(fn, calls=calls, repeats=repeats)
        rows.append({"name": name, "tokens": tokens, "seconds": best, "seconds_median": median,
                     "max_abs_err": (fn() - ref).abs().max().item()})
    return rows
