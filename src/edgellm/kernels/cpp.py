"""The compiled kernels: :data:`edgellm.kernels.cpp_source.SOURCE` built once with
``torch.utils.cpp_extension.load_inline`` and cached, and the two C++ GEMV variants.

The build lands in ``cache_dir()/kernels/<hash>``, the hash covering the source, the compiler
flags, the compiler and the torch and Python versions, so a change to any of them builds anew
and an unchanged one loads in a second (the first build takes about a minute on 2 cores).  No
``-march=native``: the module is portable, and the AVX2 function is compiled for AVX2 by its own
``target`` attribute and called only where :func:`avx2_available` says the CPU has it.

A missing compiler, a missing ninja or a source that does not compile raise
:class:`KernelUnavailable` with the compiler's first error line; :func:`edgellm.kernels.apply.bench`
then reports the C++ variants as skipped, with that reason, and runs the torch ones.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import torch

from edgellm.errors import EdgeLLMError
from edgellm.kernels.cpp_source import FUNCTIONS, SOURCE

CFLAGS = ("-O3", "-fopenmp")     # OpenMP: at::parallel_for follows torch.set_num_threads
LDFLAGS = ("-fopenmp",)
STALE_LOCK_S = 600               # a build lock older than this was left by a killed build


class KernelUnavailable(EdgeLLMError, RuntimeError):
    """The C++ kernels cannot be built or run here (no compiler, no ninja, a build error)."""


def build_key(source: str = SOURCE, *, cflags=CFLAGS, ldflags=LDFLAGS) -> str:
    """The hash naming a build: source, flags, compiler, torch and Python versions."""
    parts = [source, " ".join(cflags), " ".join(ldflags), os.environ.get("CXX", "c++"),
             torch.__version__, sys.version.split()[0]]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_dir(key: str) -> Path:
    from edgellm.paths import cache_dir

    return cache_dir() / "kernels" / key


def _first_error(text: str) -> str:
    """The first compiler error line of a build log (else its last line): one line to report."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:                    # gcc / clang: "file:line:col: error: what"
        if re.search(r"(^|: )(fatal )?error: ", ln):
            return ln[-300:]
    return lines[-1][-300:] if lines else "no output"


def extension(source: str = SOURCE):
    """The built module (``cpu_has_avx2``, ``gemv_q4_rows``, ``gemv_q4_interleaved``,
    ``silu_mul``), built on the first call and cached on disk and for the process (per source
    and compiler, ``$CXX`` or ``c++``).

    Raises :class:`KernelUnavailable` with what to do when it cannot be built (a failed build
    is remembered for the process too: torch would not retry it, only fail to import it)."""
    got = _extension(source, os.environ.get("CXX", "c++"))
    if isinstance(got, KernelUnavailable):
        raise KernelUnavailable(str(got))
    return got


@functools.lru_cache(maxsize=4)
def _extension(source: str, cxx: str):
    """The module, or the :class:`KernelUnavailable` saying why there is none."""
    try:
        return _build(source, cxx)
    except KernelUnavailable as e:
        return e


def _build(source: str, cxx: str):
    import shutil

    from torch.utils.cpp_extension import load_inline

    if shutil.which(cxx) is None:
        raise KernelUnavailable(f"no C++ compiler ({cxx}) on PATH: install one (Debian: apt "
                                "install g++) or set CXX")
    if shutil.which("ninja") is None:
        raise KernelUnavailable("torch's C++ extensions build with ninja, which is not on PATH: "
                                "pip install ninja (or apt install ninja-build)")
    key = build_key(source)
    folder = build_dir(key)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)          # load_inline would wait on it forever
    try:
        return load_inline(name=f"edgellm_kernels_{key}", cpp_sources=[source],
                           functions=FUNCTIONS, extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=str(folder),
                           verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        raise KernelUnavailable(f"building the C++ kernels failed: {_first_error(str(e))} "
                                f"(build folder {folder})") from None


@functools.lru_cache(maxsize=1)
def _cpu_reports_avx2() -> bool:
    from edgellm.deploy.llamacpp import cpu_flags

    flags = cpu_flags()
    return ({"avx2", "fma", "f16c"} <= flags if flags
            else torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def avx2_available(ext=None) -> bool:
    """Whether this CPU runs the AVX2 + FMA + F16C kernel: its flags in ``/proc/cpuinfo`` (read
    once per process), or, where there are none, torch's own CPU capability; the built module
    confirms with the compiler's ``__builtin_cpu_supports`` when given."""
    return _cpu_reports_avx2() and (ext is None or bool(ext.cpu_has_avx2()))


def cpp_scalar(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, *,
               ext=None) -> torch.Tensor:
    """Variant 3: plain C++ loops over the row layout (:func:`edgellm.kernels.q4.pack_rows`).
    ``packed`` (N, K/2) uint8, ``scales`` (N, K/32) fp16, ``x`` (K,) fp32 → y (N,) fp32."""
    return (ext or extension()).gemv_q4_rows(packed, scales, x)


def cpp_simd(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, *,
             simd: bool | None = None, ext=None) -> torch.Tensor:
    """Variant 4: llama.cpp's interleaved layout (:func:`edgellm.kernels.q4.pack_interleaved`)
    with AVX2 intrinsics where the CPU has them (``simd=None``: ask :func:`avx2_available`;
    False: the portable scalar loops of the same module).  Shapes as :func:`cpp_scalar`."""
    ext = ext or extension()
    if simd is None:
        simd = avx2_available(ext)
    return ext.gemv_q4_interleaved(packed, scales, x, bool(simd))


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, simd: bool | None = None,
             ext=None) -> torch.Tensor:
    """``silu(gate) · up`` in one C++ pass; ``gate``, ``up`` float32 of one shape.  ``simd``:
    AVX2 with a polynomial exp (None: where :func:`avx2_available`), else a plain loop."""
    ext = ext or extension()
    if simd is None:
        simd = avx2_available(ext)
    return ext.silu_mul(gate.contiguous(), up.contiguous(), bool(simd))
