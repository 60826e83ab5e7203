"""The quantized exports: llama.cpp's own types made by ``llama-quantize`` from an F32 export,
our quantizers' codes written into llama.cpp's blocks (:mod:`edgellm.deploy.gguf_blocks`), and the
evaluation of a GGUF by llama.cpp against the PyTorch model it came from.

Called by :func:`edgellm.deploy.apply.export` (``edgellm export``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


def export_quantized(folder, *, out, evaluate: dict | None = None, progress: bool = False) -> dict:
    """A quantized model saved by ``edgellm quantize --out`` as a GGUF of llama.cpp blocks."""
    from edgellm.deploy.export import gguf_bpw, model_to_gguf, tensor_types
    from edgellm.deploy.gguf_blocks import (
        as_block_qtensor,
        block_type,
        check_blocks,
        gguf_names,
        permute_rows,
        rope_row_order,
        write_blocks,
    )
    from edgellm.deploy.llamacpp import LlamaCppError
    from edgellm.models import DEFAULT_MODEL, load_tokenizer
    from edgellm.quant.gguf_formats import to_gguf_bytes
    from edgellm.quant.save import load_quantized
    from edgellm.records import record

    t0 = time.perf_counter()
    model, tok, qtensors = load_quantized(folder)
    if tok is None:
        tok = load_tokenizer(DEFAULT_MODEL, quiet=True)
    names = gguf_names(model)
    plain = sorted(set(names) - set(qtensors))
    if plain:
        raise LlamaCppError(f"{folder}: {len(plain)} linears are not quantized ({plain[0]} …); "
                            "an export of our quantizer writes every linear in its blocks")
    cfg = model.config
    heads = cfg.num_attention_heads
    blocks, kinds = {}, {}
    for name, qt in qtensors.items():
        kinds[names[name]] = kind = block_type(qt)
        b = as_block_qtensor(qt)
        if name.endswith("q_proj"):
            b = permute_rows(b, rope_row_order(qt.shape[0], heads))
        elif name.endswith("k_proj"):
            b = permute_rows(b, rope_row_order(qt.shape[0], cfg.num_key_value_heads or heads))
        blocks[names[name]] = (kind, to_gguf_bytes(b))
    with tempfile.TemporaryDirectory(prefix="edgellm-gguf-") as tmp:
        f32 = model_to_gguf(model, tok, Path(tmp) / "f32.gguf")
        path = write_blocks(f32, out, blocks)
        try:
            n_blocks = check_blocks(path, f32, list(blocks))
        except LlamaCppError:
            path.unlink(missing_ok=True)
            raise
    types = tensor_types(path)
    qconfig = json.loads((Path(folder) / "quant_config.json").read_text())
    base = qconfig.get("model") or DEFAULT_MODEL
    rec = {"from_quantized": str(folder), "model": base, "method": qconfig.get("method"),
           "format": "gguf", "out": str(path),
           "type": "+".join(sorted(set(kinds.values()))), "size_bytes": path.stat().st_size,
           "bpw": gguf_bpw(path), "tensor_types": types, "type_counts": type_counts(types),
           "n_linear": len(blocks), "blocks_checked": n_blocks,
           "seconds_export": time.perf_counter() - t0}
    if evaluate is not None:
        # llama.cpp's file against our simulation of the same codes (the kernels' rounding) ...
        sim = evaluate_gguf(path, model, tok, **evaluate)
        rec.update({f"{k}_vs_simulated": sim[k] for k in
                    ("delta_nll", "delta_nll_stderr", "kl_mean", "top1_agreement")},
                   ppl_simulated=sim["ppl_base"])
        # ... and against the fp32 model both came from, as every other record
        from edgellm.models import load_model

        del model
        reference, _ = load_model(base, quiet=True, device="cpu")
        rec.update(evaluate_gguf(path, reference, tok, **evaluate))
    rec["seconds"] = time.perf_counter() - t0
    return record(rec, protocol=rec.get("protocol", "export"), data=rec.get("data"))


def type_counts(types: dict[str, str]) -> dict[str, int]:
    """How many of the decoder blocks' 2-D tensors (the linears) hold each type."""
    counts: dict[str, int] = {}
    for name, t in types.items():
        if name.startswith("blk.") and not name.endswith("_norm.weight"):
            counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def weights_sha256(model) -> str:
    """The sha256 of every parameter's bytes, in order (names included): what a GGUF of this
    model holds."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cached_f32(model, tok) -> Path:
    """The model's F32 GGUF (llama.cpp's converter), kept in the cache under the sha256 of its
    weights: every type ``llama-quantize`` makes from one model starts from the same file."""
    from edgellm.deploy.export import model_to_gguf
    from edgellm.paths import cache_dir

    folder = cache_dir() / "llama.cpp" / "f32"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{weights_sha256(model)[:16]}.gguf"
    if not path.is_file():
        model_to_gguf(model, tok, path)                  # written beside, then renamed
    return path


def llama_quantize(model, tok, out, qtype, *, model_name, imatrix, imatrix_calib,
                    imatrix_chunks, threads, token_embedding_type):
    from edgellm.deploy.export import tensor_types
    from edgellm.deploy.llamacpp import LlamaCppError
    from edgellm.deploy.llamacpp_quant import cached_imatrix, quantize

    extra = {"token_embedding_type": token_embedding_type}
    f32 = cached_f32(model, tok)
    if imatrix is None and imatrix_calib:
        imatrix, info = cached_imatrix(f32, model_name, data=imatrix_calib,
                                       chunks=imatrix_chunks, threads=threads)
        extra.update(info)
    if imatrix is not None and imatrix_calib:   # the cached one: its name says what it is from
        extra["imatrix"] = Path(imatrix).name
    else:
        extra["imatrix"] = None if imatrix is None else str(imatrix)
    path = quantize(f32, out, qtype, imatrix=imatrix, threads=threads,
                    token_embedding_type=token_embedding_type)
    left = [n for n, t in tensor_types(path).items()
            if n.startswith("blk.") and not n.endswith("norm.weight") and t in ("F32", "F16")]
    if left:
        path.unlink(missing_ok=True)
        raise LlamaCppError(f"llama-quantize left {len(left)} linears unquantized ({left[0]} …): "
                            f"not a {qtype} file")
    return path, extra


def evaluate_gguf(path, reference, tok, *, threads: int | None = None, **kwargs) -> dict:
    """PPL, paired ΔNLL, KL and top-1 agreement of the GGUF ``path`` run by llama.cpp against
    ``reference`` (the PyTorch model it was made from) on the same tokens."""
    import os

    from edgellm.deploy.llamacpp import LlamaCppLM
    from edgellm.metrics import evaluate_paired

    lm = LlamaCppLM(path, n_ctx=kwargs.get("ctx", 512), threads=threads or os.cpu_count() or 1)
    try:
        res = evaluate_paired(lm, reference, tok, **kwargs)
    finally:
        lm.close()
    return {**res, "runtime": "llamacpp"}
