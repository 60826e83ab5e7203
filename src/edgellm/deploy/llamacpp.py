"""llama.cpp's own tools, built from the llama-cpp-python source distribution.

The sdist on PyPI vendors llama.cpp whole: the C++ tools (``llama-perplexity``, ``llama-quantize``,
``llama-imatrix``, ``llama-bench``) and ``convert_hf_to_gguf.py``.  We unpack it once into the cache
and build only the targets asked for (a few minutes on 2 cores), so comparisons run against
llama.cpp itself rather than against a description of it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from edgellm.errors import EdgeLLMError
from edgellm.models import cache_dir


class LlamaCppError(EdgeLLMError, RuntimeError):
    pass


def llamacpp_version() -> str:
    """The installed llama-cpp-python version (the sdist of the same version is used)."""
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise LlamaCppError("llama-cpp-python is not installed; run `make setup`") from None


def source_dir(version: str | None = None) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (downloaded and unpacked once)."""
    version = version or llamacpp_version()
    root = cache_dir() / "llama.cpp" / version
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, f"llama-cpp-python=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise LlamaCppError(f"could not download the llama-cpp-python {version} sdist: "
                                f"{proc.stderr.strip()[-300:]}")
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(tmp, filter="data")
        vendored = next(Path(tmp).glob("*/vendor/llama.cpp"))
        shutil.rmtree(src, ignore_errors=True)
        os.replace(vendored, src)
    return src


def build_tools(targets=("llama-perplexity",), version: str | None = None) -> Path:
    """Build llama.cpp targets (CPU, Release) and return the folder holding the binaries."""
    src = source_dir(version)
    build = src.parent / "build"
    missing = [t for t in targets if not (build / "bin" / t).is_file()]
    if missing:
        steps = (["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                  "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                  f"-DLLAMA_BUILD_SERVER={'ON' if 'llama-server' in missing else 'OFF'}"],
                 ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target",
                  *missing])
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                raise LlamaCppError("building llama.cpp's tools needs cmake and a C++ compiler: "
                                    "install them (Debian: apt install cmake g++)") from None
            if proc.returncode != 0:
                raise LlamaCppError(f"building {', '.join(missing)} failed: "
                                    f"{(proc.stdout + proc.stderr).strip()[-600:]}")
    return build / "bin"


def convert_hf_to_gguf(hf_dir: str | os.PathLike, out: str | os.PathLike,
                       outtype: str = "f32") -> Path:
    """Convert a Hugging Face folder to GGUF with llama.cpp's own converter."""
    script = source_dir() / "convert_hf_to_gguf.py"
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    proc = subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", outtype,
                           "--outfile", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlamaCppError(f"convert_hf_to_gguf.py failed: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, out)
    return out


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def llama_perplexity(gguf: str | os.PathLike, text_file: str | os.PathLike, *, ctx: int = 512,
                     chunks: int | None = None, threads: int | None = None) -> dict:
    """Run ``llama-perplexity`` and parse its final estimate."""
    binary = build_tools(("llama-perplexity",)) / "llama-perplexity"
    cmd = [str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
           "-t", str(threads or os.cpu_count() or 2)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    final, n = _FINAL.search(log), _CHUNKS.search(log)
    if proc.returncode != 0 or not final or not n:
        raise LlamaCppError(f"llama-perplexity failed (exit {proc.returncode}): {log[-800:]}")
    n_chunks = int(n.group(1))
    return {"ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)),
            "n_chunks": n_chunks, "ctx": ctx, "n_tokens": n_chunks * (ctx - 1 - ctx // 2),
            "protocol": "llamacpp", "llama_cpp_python": llamacpp_version()}


def llamacpp_tokenize(gguf: str | os.PathLike, text: str, *, special: bool = False) -> list[int]:
    """Token ids from llama.cpp's own tokenizer (vocab-only load: no weights read)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=special)


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def extra_buffer_types_safe() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (weights repacked for AMX or
    interleaved AVX kernels).  On CPUs that report AMX, llama-cpp-python 0.3.36 crashes
    (SIGSEGV) on the first matmul of any quantized GGUF through the AMX buffer type (upstream:
    ggml-org/llama.cpp#20824, "segfault in ggml_backend_amx_mul_mat"), so there we turn them off:
    the plain CPU kernels run the same types, a little slower."""
    return not ({"amx_int8", "amx_tile"} & cpu_flags())


def open_llama(path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, with llama.cpp's extra buffer types off
    where :func:`extra_buffer_types_safe` says so (a model parameter the ``Llama`` constructor
    does not expose, so its default parameters are wrapped for the duration of the load)."""
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama

    if extra_buffer_types_safe():
        return Llama(model_path=str(path), **kwargs)
    default = C.llama_model_default_params

    def without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params

    C.llama_model_default_params = without_extra_bufts
    try:
        return Llama(model_path=str(path), **kwargs)
    finally:
        C.llama_model_default_params = default


def llamacpp_greedy(gguf, prompts: list[list[int]], *, eos: int, lora=None,
                    max_new_tokens: int = 16, threads: int = 1, n_ctx: int = 1024,
                    progress: bool = False) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts`` by llama.cpp (llama-cpp-python), one prompt
    at a time, stopped at ``eos`` (not included) or after ``max_new_tokens``.  ``lora``: a GGUF
    LoRA applied at run time on ``gguf`` (``lora_path``, scale 1)."""
    for f in (gguf, lora):
        if f is not None and not Path(f).is_file():
            raise LlamaCppError(f"{f}: no such GGUF file")
    try:
        llm = open_llama(gguf, lora_path=None if lora is None else str(lora), n_ctx=n_ctx,
                         n_batch=min(512, n_ctx), n_threads=threads, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise LlamaCppError(f"llama.cpp could not load {gguf}"
                            + ("" if lora is None else f" with the LoRA {lora}")
                            + f" ({e}); is it a complete GGUF made for this model?") from None
    rows = prompts
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(prompts, desc="llama.cpp", leave=False)
    out = []
    try:
        for ids in rows:
            if len(ids) + max_new_tokens > n_ctx:
                raise LlamaCppError(f"a prompt of {len(ids)} tokens does not fit n_ctx={n_ctx}")
            llm.reset()
            new: list[int] = []
            for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True):
                if t == eos:
                    break
                new.append(int(t))
                if len(new) == max_new_tokens:
                    break
            out.append(new)
    finally:
        llm.close()
    return out


class LlamaCppLM(torch.nn.Module):
    """llama.cpp (llama-cpp-python) as a function of token ids to logits, so that the course's
    evaluation (:func:`edgellm.metrics.perplexity`, :func:`~edgellm.metrics.evaluate_paired`)
    runs on a GGUF file exactly as on a PyTorch model: each row of ``ids`` is evaluated from an
    empty KV cache in one batch, and the logits of every position come back as a float32 tensor.
    """

    def __init__(self, gguf, *, n_ctx: int = 512, threads: int = 1):
        super().__init__()
        if not Path(gguf).is_file():
            raise LlamaCppError(f"{gguf}: no such GGUF file")
        self.n_ctx = n_ctx
        try:
            self.llm = open_llama(gguf, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                  n_threads=threads, n_threads_batch=threads, logits_all=True,
                                  verbose=False)
        except (ValueError, RuntimeError) as e:
            raise LlamaCppError(f"llama.cpp could not load {gguf} ({e}); is it a complete "
                                "GGUF file?") from None

    def forward(self, ids):
        import numpy as np

        rows = []
        for row in ids:
            if len(row) > self.n_ctx:
                raise LlamaCppError(f"a window of {len(row)} tokens exceeds n_ctx={self.n_ctx}")
            self.llm.reset()
            self.llm.eval([int(t) for t in row])
            rows.append(torch.from_numpy(np.array(self.llm.scores[:len(row)], dtype=np.float32)))
        return torch.stack(rows)

    def close(self) -> None:
        self.llm.close()
