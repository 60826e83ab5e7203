"""llama.cpp's own quantization types: ``llama-quantize`` and ``llama-imatrix`` on a GGUF.

``llama-quantize`` turns an F32 (or F16) GGUF into one of llama.cpp's types.  A type name like
``Q4_K_M`` is a *mix*: most linears get Q4_K, some (``attn_v``, half of ``ffn_down``) a larger
type, and a tensor whose rows do not fit the type's block falls back to another type — the 256-wide
super-blocks of the K- and I-quants do not divide SmolLM2's 576-wide rows, so on this model only
``ffn_down`` (1536 wide) can hold them.  :func:`edgellm.deploy.export.tensor_types` reads what
each tensor actually got from the file.

An importance matrix (``llama-imatrix``: the mean squared input activation of every column of
every linear, over a calibration text) weights the quantization error of each column; the
2-bit I-quants refuse to run without one.

Both tools are built once from the llama.cpp source in the llama-cpp-python sdist
(:func:`edgellm.deploy.llamacpp.build_tools`) and cached.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from edgellm.deploy.llamacpp import LlamaCppError, build_tools

#: the types the course sweeps, largest first (``llama-quantize`` knows more)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
               "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_XXS", "Q2_K", "IQ2_XS", "IQ2_XXS")
#: types ``llama-quantize`` refuses without an importance matrix
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
#: the types a GGUF tensor may hold (for ``--token-embedding-type``)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")


def check_quant_type(qtype: str, *, imatrix=None) -> str:
    """``qtype`` upper-cased if ``llama-quantize`` can make it here, else a clear error."""
    q = qtype.upper()
    if q not in QUANT_TYPES and q not in NEEDS_IMATRIX:
        raise LlamaCppError(f"--type {qtype}: not one of llama.cpp's types the course supports "
                            f"({', '.join(QUANT_TYPES)}; F32, F16, BF16 from the converter)")
    if q in NEEDS_IMATRIX and imatrix is None:
        raise LlamaCppError(f"--type {q} needs an importance matrix: give --imatrix FILE "
                            "(from llama-imatrix) or --calib pydoc to compute one")
    return q


def check_tensor_type(name: str) -> str:
    """``name`` upper-cased if a single tensor may be stored as it (``--token-embedding-type``)."""
    if name.upper() not in TENSOR_TYPES:
        raise LlamaCppError(f"--token-embedding-type {name}: use one of {', '.join(TENSOR_TYPES)}")
    return name.upper()


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise LlamaCppError(f"{what} failed (exit {proc.returncode}): {log.strip()[-800:]}")
    return log


def _run_into(cmd: list[str], tmp: Path, out: Path, what: str) -> Path:
    """Run a tool that writes ``tmp``; rename it to ``out`` only when the tool succeeded, so a
    failure or an interruption leaves nothing half-written."""
    try:
        _run(cmd, what)
        if not tmp.is_file():
            raise LlamaCppError(f"{what} wrote no file at {tmp}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def compute_imatrix(gguf, text_file, out, *, ctx: int = 512, chunks: int | None = None,
                    threads: int | None = None) -> Path:
    """``llama-imatrix`` of ``gguf`` over ``text_file`` (windows of ``ctx`` tokens), written to
    ``out`` when complete."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part{out.suffix}")
    binary = build_tools(TOOLS) / "llama-imatrix"
    cmd = [str(binary), "-m", str(gguf), "-f", str(text_file), "-o", str(tmp), "-c", str(ctx),
           "-b", str(ctx), "-t", str(threads or os.cpu_count() or 2), "--no-ppl"]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    return _run_into(cmd, tmp, out, "llama-imatrix")


def quantize(f32_gguf, out, qtype: str, *, imatrix=None, token_embedding_type: str | None = None,
             threads: int | None = None) -> Path:
    """``llama-quantize`` ``f32_gguf`` to ``qtype`` (optionally weighted by ``imatrix``; the
    tied token embedding as ``token_embedding_type`` instead of llama.cpp's choice)."""
    q = check_quant_type(qtype, imatrix=imatrix)
    src = Path(f32_gguf)
    if not src.is_file():
        raise LlamaCppError(f"{src}: no such GGUF file; write one with edgellm export --type F32")
    out = Path(out)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    cmd = [str(build_tools(TOOLS) / "llama-quantize")]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if token_embedding_type:
        cmd += ["--token-embedding-type", check_tensor_type(token_embedding_type).lower()]
    cmd += [str(src), str(tmp), q, str(threads or os.cpu_count() or 2)]
    return _run_into(cmd, tmp, out, "llama-quantize")


_STAT = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-0-9.e]+)\s*±\s*([-0-9.e]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([-0-9.e]+)\s*±\s*([-0-9.e]+)",
    "delta_nll": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*([-0-9.e]+)\s*±\s*([-0-9.e]+)",
    "kl_mean": r"Mean\s+KLD:\s*([-0-9.e]+)\s*±\s*([-0-9.e]+)",
    "top1_agreement": r"Same top p:\s*([-0-9.e]+)\s*±\s*([-0-9.e]+)\s*%",
}


def parse_kl_log(log: str) -> dict:
    """The statistics ``llama-perplexity --kl-divergence`` prints, with their standard errors
    (``top1_agreement`` as a fraction)."""
    out = {}
    for key, pattern in _STAT.items():
        m = re.search(pattern, log)
        if not m:
            raise LlamaCppError(f"llama-perplexity printed no '{key}' statistic: {log[-600:]}")
        scale = 0.01 if key == "top1_agreement" else 1.0
        out[key], out[f"{key}_se"] = float(m.group(1)) * scale, float(m.group(2)) * scale
    return out


def kl_base(f32_gguf, text_file, out, *, ctx: int = 512, chunks: int | None = None,
            threads: int | None = None) -> Path:
    """``llama-perplexity --kl-divergence-base``: the F32 file's logits on every scored token
    (about 100 KB a token for this vocabulary: delete it after use)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    cmd = [str(build_tools(TOOLS) / "llama-perplexity"), "-m", str(f32_gguf), "-f",
           str(text_file), "-c", str(ctx), "-b", str(ctx), "-t",
           str(threads or os.cpu_count() or 2), "--kl-divergence-base", str(tmp)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    return _run_into(cmd, tmp, out, "llama-perplexity --kl-divergence-base")


def kl_divergence(gguf, base, *, threads: int | None = None) -> dict:
    """``llama-perplexity --kl-divergence`` of ``gguf`` against the logits in ``base``."""
    from edgellm.deploy.llamacpp import extra_buffer_types_safe

    cmd = [str(build_tools(TOOLS) / "llama-perplexity"), "-m", str(gguf),
           "--kl-divergence-base", str(base), "--kl-divergence",
           "-t", str(threads or os.cpu_count() or 2)]
    if not extra_buffer_types_safe():
        cmd.append("--no-repack")  # see edgellm.deploy.llamacpp.open_llama
    return parse_kl_log(_run(cmd, "llama-perplexity --kl-divergence"))


def cached_imatrix(f32_gguf, model_name: str, *, data: str = "pydoc", chunks: int = 128,
                   ctx: int = 512, threads: int | None = None) -> tuple[Path, dict]:
    """The importance matrix of ``model_name`` (whose F32 GGUF is ``f32_gguf``) over the first
    ``chunks`` windows of ``data``'s train split, computed once by ``llama-imatrix`` and kept in
    the cache; returns its path and what it was computed from."""
    import hashlib
    import tempfile

    from edgellm.data import load_text, sha256_text
    from edgellm.paths import cache_dir

    text = load_text(data, "train")
    text_sha = sha256_text(text)
    model_tag = hashlib.sha256(str(model_name).encode()).hexdigest()[:12]
    folder = cache_dir() / "llama.cpp" / "imatrix"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{model_tag}-{data}-{text_sha[:12]}-c{ctx}x{chunks}.gguf"
    if not out.is_file():
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=folder, delete=False) as f:
            f.write(text)
        try:
            compute_imatrix(f32_gguf, f.name, out, ctx=ctx, chunks=chunks, threads=threads)
        finally:
            Path(f.name).unlink(missing_ok=True)
    return out, {"imatrix_data": data, "imatrix_split": "train", "imatrix_data_sha256": text_sha,
                 "imatrix_chunks": chunks, "imatrix_ctx": ctx}


if __name__ == "__main__":  # `make setup` builds the tools once (and llama.cpp's own server)
    print(f"llama.cpp tools: {build_tools((*TOOLS, 'llama-server'))}")
