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
