"""llama.cpp's own Q4_0 matrix-vector product, timed on the same shapes as our kernels.

A small C++ program (:data:`HARNESS`, compiled once against the ggml of the llama.cpp source
that :mod:`edgellm.deploy.llamacpp` unpacks and builds) reads W (N, K) and x (K,) in float32,
quantizes W with ``ggml_quantize_chunk`` (llama.cpp's ``quantize_row_q4_0_ref``), makes
``copies`` Q4_0 tensors of shape (K, N) in ggml's order, and builds one graph of ``copies``
independent ``ggml_mul_mat(W_c, x)`` nodes: the way llama.cpp runs a model, one graph per token,
each weight read once.  The graph is computed with a thread pool of ``threads`` threads,
``repeats`` times after a warm-up; it prints the best and median seconds per product and writes
``y`` of the first copy and the Q4_0 bytes it made (to check they are ours bit for bit).

What this times is ggml's plain CPU path: ``x`` is first quantized to Q8_0 (32 int8 with one
scale) and each row is a ``vec_dot_q4_0_q8_0``: 8-bit integer dot products (W4A8), not our
float32 activations (W4A32), hence a small error of its own.  llama.cpp, loading a model, may
also repack Q4_0 into interleaved 8-row blocks (its "CPU_REPACK" buffer type) for AVX2/ARM
kernels; a bare ggml context does not, so this is the un-repacked kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from edgellm.kernels.cpp import KernelUnavailable, _first_error

HARNESS = r"""
#include "ggml.h"
#include "ggml-cpu.h"
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static bool read_f32(const char* path, std::vector<float>& out) {
  FILE* f = std::fopen(path, "rb");
  if (!f) return false;
  const size_t n = std::fread(out.data(), sizeof(float), out.size(), f);
  std::fclose(f);
  return n == out.size();
}

static void write_bytes(const char* path, const void* data, size_t n) {
  FILE* f = std::fopen(path, "wb");
  if (f) { std::fwrite(data, 1, n, f); std::fclose(f); }
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s W.f32 x.f32 OUT N K THREADS COPIES REPEATS\n", argv[0]);
    return 2;
  }
  const int64_t N = std::atoll(argv[4]), K = std::atoll(argv[5]);
  const int threads = std::atoi(argv[6]), copies = std::atoi(argv[7]);
  const int repeats = std::atoi(argv[8]);
  std::vector<float> W(N * K), x(K);
  if (!read_f32(argv[1], W) || !read_f32(argv[2], x)) {
    std::fprintf(stderr, "error: cannot read %s or %s\n", argv[1], argv[2]);
    return 1;
  }
  ggml_cpu_init();
  const size_t row = ggml_row_size(GGML_TYPE_Q4_0, K), wbytes = row * N;
  std::vector<uint8_t> q(wbytes);
  ggml_quantize_chunk(GGML_TYPE_Q4_0, W.data(), q.data(), 0, N, K, nullptr);

  const size_t mem = copies * (wbytes + N * sizeof(float) + 2 * ggml_tensor_overhead() + 64)
                     + K * sizeof(float) + 4 * ggml_tensor_overhead()
                     + ggml_graph_overhead_custom(copies + 8, false) + (1 << 20);
  struct ggml_init_params ip = {mem, nullptr, false};
  struct ggml_context* ctx = ggml_init(ip);
  struct ggml_tensor* xt = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, K);
  std::memcpy(xt->data, x.data(), K * sizeof(float));
  struct ggml_cgraph* gf = ggml_new_graph_custom(ctx, copies + 8, false);
  std::vector<struct ggml_tensor*> ys;
  for (int c = 0; c < copies; ++c) {
    struct ggml_tensor* w = ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_0, K, N);  // ne = (K, N)
    std::memcpy(w->data, q.data(), wbytes);
    ys.push_back(ggml_mul_mat(ctx, w, xt));                                 // ne = (N, 1)
    ggml_build_forward_expand(gf, ys.back());
  }
  struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
  struct ggml_threadpool* tp = ggml_threadpool_new(&tpp);
  struct ggml_cplan plan = ggml_graph_plan(gf, threads, tp);
  std::vector<uint8_t> work(plan.work_size + 64);
  plan.work_data = work.data();

  ggml_graph_compute(gf, &plan);  // warm-up: pages in, spins the threads up
  std::vector<double> per;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    ggml_graph_compute(gf, &plan);
    const auto t1 = std::chrono::steady_clock::now();
    per.push_back(std::chrono::duration<double>(t1 - t0).count() / copies);
  }
  std::sort(per.begin(), per.end());
  std::string out(argv[3]);
  write_bytes((out + ".y").c_str(), ys[0]->data, N * sizeof(float));
  write_bytes((out + ".q").c_str(), q.data(), wbytes);
  std::printf("{\"best\": %.9g, \"median\": %.9g, \"copies\": %d, \"threads\": %d}\n",
              per.front(), per[per.size() / 2], copies, threads);
  ggml_threadpool_free(tp);
  ggml_free(ctx);
  return 0;
}
"""


def ggml_paths() -> tuple[Path, Path]:
    """``(include folder, library folder)`` of the ggml that llama.cpp's tools were built with
    (``edgellm.deploy.llamacpp.build_tools``); raises :class:`KernelUnavailable` when that
    build is not there (nothing is downloaded or built here)."""
    from edgellm.deploy.llamacpp import LlamaCppError, llamacpp_version
    from edgellm.paths import cache_dir

    try:
        root = cache_dir() / "llama.cpp" / llamacpp_version()
    except LlamaCppError as e:
        raise KernelUnavailable(str(e)) from None
    include = root / "src" / "ggml" / "include"
    libs = root / "build" / "bin"
    if not (include / "ggml-cpu.h").is_file():
        raise KernelUnavailable(f"llama.cpp's source is not unpacked in {root / 'src'}: run "
                                "`make setup` (it builds llama.cpp's tools)")
    if not all((libs / f"lib{n}.so").is_file() for n in ("ggml", "ggml-base", "ggml-cpu")):
        raise KernelUnavailable(f"llama.cpp is not built as shared libraries in {libs} "
                                "(libggml.so, libggml-base.so, libggml-cpu.so): run `make setup`")
    return include, libs


def build_harness(source: str = HARNESS) -> Path:
    """Compile :data:`HARNESS` against llama.cpp's ggml once (cached under
    ``cache_dir()/kernels``) and return the program; :class:`KernelUnavailable` when it cannot."""
    from edgellm.paths import cache_dir

    include, libs = ggml_paths()
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-O2", "-std=c++17", f"-I{include}", "-x", "c++", "-", f"-L{libs}", "-lggml",
           "-lggml-cpu", "-lggml-base", f"-Wl,-rpath,{libs}"]
    key = hashlib.sha256("\0".join([source, *cmd]).encode()).hexdigest()[:16]
    exe = cache_dir() / "kernels" / f"ggml-q4_0-gemv-{key}"
    if exe.is_file():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(exe.name + f".{os.getpid()}.part")
    try:
        proc = subprocess.run([*cmd, "-o", str(tmp)], input=source, capture_output=True,
                              text=True)
    except FileNotFoundError:
        raise KernelUnavailable(f"no C++ compiler ({cxx}): install one (Debian: apt install "
                                "g++)") from None
    if proc.returncode != 0:
        raise KernelUnavailable(f"the llama.cpp harness did not compile: "
                                f"{_first_error(proc.stderr)}")
    os.replace(tmp, exe)
    return exe


def run_harness(W: torch.Tensor, x: torch.Tensor, *, threads: int = 1, copies: int = 1,
                repeats: int = 5, exe: Path | None = None) -> dict:
    """llama.cpp's Q4_0 GEMV of ``W`` (N, K) float32 and ``x`` (K,) float32: ``seconds`` (best
    per product), ``seconds_median``, ``y`` (N,) float32 and ``blocks`` (N, K/32·18) uint8, the
    Q4_0 bytes ggml made (compare with :func:`edgellm.kernels.q4.q4_0_blocks`)."""
    exe = exe or build_harness()
    N, K = W.shape
    with tempfile.TemporaryDirectory(prefix="edgellm-ggml-") as tmp:
        w_path, x_path, out = (Path(tmp) / n for n in ("W.f32", "x.f32", "out"))
        W.float().contiguous().numpy().tofile(w_path)
        x.float().contiguous().numpy().tofile(x_path)
        proc = subprocess.run([str(exe), str(w_path), str(x_path), str(out), str(N), str(K),
                               str(threads), str(copies), str(repeats)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelUnavailable(f"the llama.cpp harness failed (exit {proc.returncode}): "
                                    f"{_first_error(proc.stderr + proc.stdout)}")
        timing = json.loads(proc.stdout.strip().splitlines()[-1])
        y = torch.from_file(str(out) + ".y", size=N, dtype=torch.float32).clone()
        blocks = torch.from_file(str(out) + ".q", size=N * K // 32 * 18, dtype=torch.uint8)
    return {"seconds": timing["best"], "seconds_median": timing["median"], "y": y,
            "blocks": blocks.clone().reshape(N, -1)}
