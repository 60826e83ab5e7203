"""Models and LoRA adapters to GGUF, with llama.cpp's own converters.

Any model ``edgellm`` loads (the default, a control, a pruned or merged one) is written as a
Hugging Face folder and converted by ``convert_hf_to_gguf.py``; a LoRA adapter saved in peft's
format by ``convert_lora_to_gguf.py``, which llama.cpp applies at run time (``--lora``,
llama-cpp-python's ``lora_path``) on the base model's GGUF.  Both scripts come from the
llama-cpp-python source distribution (:func:`edgellm.deploy.llamacpp.source_dir`); no package is
installed to get them.  Files are written beside the target and renamed when complete.

The converters write ``F32``, ``F16``, ``BF16`` and ``Q8_0`` themselves (the token embedding
and the norms stay F32 in every case, as llama.cpp chooses); the K- and I-quants are made from
the F32 file by ``llama-quantize`` (:mod:`edgellm.deploy.llamacpp_quant`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgellm.deploy.llamacpp import LlamaCppError, source_dir

CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")
ADAPTER_TYPES = ("F32", "F16", "BF16", "Q8_0")


def check_type(qtype: str, *, adapter: bool = False, imatrix=None) -> str:
    """``qtype`` upper-cased if it can be written: the converter's types for adapters and models,
    llama.cpp's own types (:mod:`edgellm.deploy.llamacpp_quant`) for models; else a clear
    :class:`LlamaCppError`."""
    from edgellm.deploy.llamacpp_quant import NEEDS_IMATRIX, QUANT_TYPES, check_quant_type

    q = qtype.upper()
    if q in CONVERTER_TYPES and (not adapter or q in ADAPTER_TYPES):
        return q
    if adapter:
        raise LlamaCppError(f"--type {qtype}: llama.cpp's converter writes an adapter as one of "
                            f"{', '.join(ADAPTER_TYPES)}; for a quantized model with the adapter, "
                            "add --merge")
    if q in QUANT_TYPES or q in NEEDS_IMATRIX:
        return check_quant_type(q, imatrix=imatrix)
    raise LlamaCppError(f"--type {qtype}: use one of {', '.join(CONVERTER_TYPES)} (the "
                        f"converter) or {', '.join(QUANT_TYPES + NEEDS_IMATRIX[:2])} "
                        "(llama-quantize)")


def _run_converter(script: str, args: list[str], out: Path) -> Path:
    out = Path(out)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    cmd = [sys.executable, str(source_dir() / script), *args, "--outfile", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not tmp.is_file():
            raise LlamaCppError(f"{script} failed (exit {proc.returncode}): "
                                f"{proc.stderr.strip()[-600:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def save_hf(model, tokenizer, folder) -> Path:
    """A Hugging Face folder (safetensors, config, tokenizer) of ``model``: what the converters
    read."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def model_to_gguf(model, tokenizer, out, *, qtype: str = "F32") -> Path:
    """``model`` written to the GGUF file ``out`` with ``convert_hf_to_gguf.py``."""
    qtype = check_type(qtype)
    with tempfile.TemporaryDirectory(prefix="edgellm-hf-") as tmp:
        save_hf(model, tokenizer, tmp)
        return _run_converter("convert_hf_to_gguf.py", [tmp, "--outtype", qtype.lower()], out)


def adapter_to_gguf(adapter_dir, model, tokenizer, out, *, qtype: str = "F32") -> Path:
    """A peft-format adapter folder to a GGUF LoRA with ``convert_lora_to_gguf.py``.  The
    converter reads only the base's config and tokenizer (``model`` supplies them)."""
    qtype = check_type(qtype, adapter=True)
    with tempfile.TemporaryDirectory(prefix="edgellm-base-") as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return _run_converter("convert_lora_to_gguf.py",
                              ["--base", tmp, "--outtype", qtype.lower(), str(adapter_dir)], out)


def check_gguf(path) -> Path:
    """``path`` if it is a complete GGUF file (its header and tensor table read), else a clear
    :class:`LlamaCppError` before llama.cpp or the ``gguf`` package meet it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LlamaCppError(f"{path}: cannot read it ({e.strerror})") from None
    if magic != b"GGUF":
        raise LlamaCppError(f"{path}: not a GGUF file (it does not start with 'GGUF'); write one "
                            "with edgellm export")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as e:
        raise LlamaCppError(f"{path}: a damaged or incomplete GGUF file ({e}); write it again "
                            "with edgellm export") from None
    return path


def tensor_types(gguf_path) -> dict[str, str]:
    """Every tensor's stored type, read from the file (``{"blk.0.attn_q.weight": "Q8_0", …}``)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError) as e:
        raise LlamaCppError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    return {t.name: t.tensor_type.name for t in reader.tensors}


def gguf_bpw(gguf_path, *, prefix: str = "blk.") -> float:
    """Bits per weight of the tensors whose names start with ``prefix`` (the decoder blocks),
    from the bytes the file stores."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ts = [t for t in reader.tensors if t.name.startswith(prefix)]
    n = sum(int(t.n_elements) for t in ts)
    return 8 * sum(int(t.n_bytes) for t in ts) / n if n else float("nan")


def gguf_tensor_bytes(gguf_path) -> dict[str, int]:
    """Every tensor's stored bytes, from the file."""
    from gguf import GGUFReader

    return {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf_path)).tensors}


def gguf_decode_bytes(gguf_path, *, position: int = 0, kv_bytes: int = 2) -> dict:
    """What decoding one token at ``position`` reads from a llama-architecture GGUF: every
    tensor as stored, one row of ``token_embd``, the whole ``token_embd`` again when the output
    matrix is tied to it (no ``output.weight``), and the K and V caches up to ``position``
    (``kv_bytes`` per element: llama.cpp's default cache is F16)."""
    from gguf import GGUFReader

    from edgellm.deploy.roofline import bytes_per_token

    reader = GGUFReader(str(gguf_path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}

    def meta(key):
        f = reader.get_field(key)
        return None if f is None else int(f.parts[f.data[0]][0])

    arch = bytes(reader.get_field("general.architecture").parts[-1]).decode()
    layers = meta(f"{arch}.block_count")
    heads, kv_heads = meta(f"{arch}.attention.head_count"), meta(f"{arch}.attention.head_count_kv")
    hidden = meta(f"{arch}.embedding_length")
    head_dim = hidden // heads
    kv_per_pos = 2 * layers * (kv_heads or heads) * head_dim * kv_bytes
    tensors = dict(sizes)
    tied = "output.weight" not in sizes
    if tied:
        tensors["output.weight (tied: token_embd)"] = sizes["token_embd.weight"]
    vocab = shapes["token_embd.weight"][-1]                 # gguf lists dims fastest-first
    total = bytes_per_token(tensors, rows={"token_embd.weight": vocab},
                            kv_bytes_per_position=kv_per_pos, position=position)
    n_weights = sum(int(np.prod(shapes[n])) for n in sizes if n != "token_embd.weight")
    if tied:
        n_weights += int(np.prod(shapes["token_embd.weight"]))   # the output matmul's weights
    return {"bytes_per_token": total, "weights_bytes": sum(sizes.values()), "tied_output": tied,
            "n_weights": n_weights,
            "kv_bytes_per_position": kv_per_pos, "position": position, "n_layers": layers}
