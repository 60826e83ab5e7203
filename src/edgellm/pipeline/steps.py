"""The step kinds of a recipe: each one calls a technique's library entry point (never the
command line) and writes its output under the step's folder.

A step function is ``fn(source, out, settings, *, seed, progress) -> record``: ``source`` is what
the step before gave (a registry name or folder for ``hf``, a folder for ``quantized``, a file
for ``gguf``), ``out`` the step's (temporary) folder, where it writes :data:`ARTIFACT` of the
kind it gives; the record is the dict the technique's ``apply`` function returned.
:data:`STEP_FUNCTIONS` maps each kind of :data:`edgellm.pipeline.recipe.KINDS` to its function.
"""

from __future__ import annotations

from pathlib import Path

#: where a step's output lies inside its folder, by what it gives
ARTIFACT = {"hf": "model", "quantized": "model", "gguf": "model.gguf"}


def prune_step(source, out: Path, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """Structured (or unstructured) pruning by :func:`edgellm.prune.apply.prune_record`."""
    from edgellm.prune.apply import prune_record

    kw = {"structured": s["structured"], "ratio": s["ratio"]} if s["structured"] else {}
    return prune_record(str(source), method=s["method"], sparsity=s["sparsity"],
                        calib=s["calib"], n_samples=s["n_samples"], seq_len=s["seq_len"],
                        recover_steps=s["recover_steps"], recover_batch=s["recover_batch"],
                        recover_seq_len=s["recover_seq_len"], out=str(out / ARTIFACT["hf"]),
                        seed=seed, progress=progress, **kw)


def distill_step(source, out: Path, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """A compressed student recovered by KD from ``source``
    (:func:`edgellm.distill.apply.distill_record`)."""
    from edgellm.distill.apply import distill_record

    return distill_record(str(source), student=s["student"], ratio=s["ratio"], loss=s["loss"],
                          temperature=s["temperature"], steps=s["steps"],
                          batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                          calib=s["calib"], n_samples=s["n_samples"],
                          calib_seq_len=s["calib_seq_len"], train_data=s["train_data"],
                          out=str(out / ARTIFACT["hf"]), seed=seed, progress=progress)


def lora_step(source, out: Path, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """A LoRA task adapter trained on ``source`` (:func:`edgellm.lora.apply.finetune`, kept in
    ``adapter/``), then merged into the weights (``W + s·B·A``) and saved as a plain model."""
    from edgellm.deploy.adapters import merged
    from edgellm.lora.apply import finetune
    from edgellm.models import load_model
    from edgellm.records import write_folder

    adapter = out / "adapter"
    rec = finetune(str(source), method="lora", rank=s["rank"], targets=s["targets"],
                   steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"],
                   seq_len=s["seq_len"], task=s["task"], out=adapter, evaluate=False,
                   seed=seed, progress=progress)
    model, tok = load_model(str(source), quiet=True)
    model = merged(model, adapter)
    with write_folder(out / ARTIFACT["hf"]) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    rec["merged"] = True
    return rec


def quantize_step(source, out: Path, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """Our quantizer's codes and scales (:func:`edgellm.quant.apply.quantize_record`)."""
    from edgellm.quant.apply import quantize_record

    return quantize_record(str(source), method=s["method"], bits=s["bits"],
                           group_size=s["group_size"], sym=s["sym"], calib=s["calib"],
                           n_samples=s["n_samples"], seq_len=s["seq_len"],
                           out=str(out / ARTIFACT["quantized"]), seed=seed, progress=progress)


def qat_step(source, out: Path, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """Quantization-aware training on llama.cpp's grid (:func:`edgellm.qat.apply.qat_record`),
    saved in ``edgellm quantize --out``'s format."""
    from edgellm.pipeline.errors import PipelineError

    try:
        from edgellm.qat.apply import qat_record
    except ImportError as e:
        raise PipelineError(f"the qat step needs edgellm.qat.apply.qat_record ({e})") from None
    return qat_record(str(source), bits=s["bits"], group_size=s["group_size"],
                      steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"],
                      lr=s["lr"], out=str(out / ARTIFACT["quantized"]), seed=seed,
                      progress=progress)


def export_step(source, out: Path, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """A GGUF file: from a model folder by llama.cpp's converter (and ``llama-quantize`` for
    its own types, with ``token_embedding_type`` and an importance matrix on
    ``imatrix_calib``), or from a quantized folder with our codes written bit for bit
    (:func:`edgellm.deploy.apply.export`)."""
    from edgellm.deploy.apply import export

    path = out / ARTIFACT["gguf"]
    if (Path(source) / "quant_config.json").is_file():
        emb = s["token_embedding_type"]
        if emb is None:
            return export(out=path, from_quantized=str(source), progress=progress)
        ours = out / "linears.gguf"          # our codes, the embedding still F32 ...
        rec = export(out=ours, from_quantized=str(source), progress=progress)
        retype_embedding(ours, path, str(emb).upper())   # ... then in llama.cpp's blocks
        ours.unlink()
        rec.update(out=str(path), size_bytes=path.stat().st_size,
                   token_embedding_type=str(emb).upper())
        return rec
    return export(str(source), out=path, qtype=str(s["type"]).upper(),
                  token_embedding_type=(None if s["token_embedding_type"] is None
                                        else str(s["token_embedding_type"]).upper()),
                  imatrix_calib=s["imatrix_calib"], imatrix_chunks=s["imatrix_chunks"],
                  progress=progress)


def retype_embedding(gguf_in, gguf_out, qtype: str) -> None:
    """Copy ``gguf_in`` to ``gguf_out`` with the token embedding ``token_embd.weight``
    (``(n_vocab, n_embd)``, tied to the output on this model) quantized to ``qtype`` by the
    gguf package's reference quantizer (llama.cpp's rounding): what ``llama-quantize
    --token-embedding-type`` does, for a file whose linears hold our codes."""
    import gguf
    from gguf import quants

    from edgellm.deploy.gguf_blocks import write_blocks
    from edgellm.pipeline.errors import PipelineError

    kind = getattr(gguf.GGMLQuantizationType, qtype, None)
    reader = gguf.GGUFReader(str(gguf_in))
    t = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if t is None or kind is None:
        raise PipelineError(f"token_embedding_type={qtype}: {gguf_in} has no F32 token "
                            "embedding to quantize, or the type is unknown")
    try:
        raw = quants.quantize(t.data.astype("float32"), kind)  # (n_vocab, bytes per row)
    except NotImplementedError:
        raise PipelineError(f"token_embedding_type={qtype}: the gguf package cannot write it "
                            "for a quantized folder; use Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0") from None
    write_blocks(gguf_in, gguf_out, {"token_embd.weight": (qtype, raw)})


def bench_step(source, out: Path, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """Load, prefill and decode speed of the GGUF in llama.cpp, and llama-bench on the same
    file (:func:`edgellm.deploy.apply.bench_runtime`); the file itself goes on unchanged."""
    import os

    from edgellm.deploy.apply import bench_runtime

    load = os.getloadavg()       # other jobs on the machine slow every timing: say so
    rec = bench_runtime("llamacpp", str(source), threads=s["threads"],
                        prompt_tokens=s["prompt_tokens"], gen_tokens=s["gen_tokens"],
                        repeats=s["repeats"])
    rec["load_average_before_timing"] = [round(x, 2) for x in load]
    return rec


STEP_FUNCTIONS = {"prune": prune_step, "distill": distill_step, "lora": lora_step,
                  "quantize": quantize_step, "qat": qat_step, "export": export_step,
                  "bench": bench_step}

# keys of a technique's record that hold long lists or per-tensor tables: left out of the
# run record (the step's own record.json keeps everything)
HUGE = ("losses", "tensor_types", "examples", "generated_ids", "correct_bits", "lrs",
        "diverged_examples", "first_divergence", "sparsity_layers", "versions")


def trim(rec: dict) -> dict:
    """``rec`` without :data:`HUGE` keys and without lists longer than 32 items."""
    return {k: v for k, v in rec.items()
            if k not in HUGE and not (isinstance(v, list) and len(v) > 32)}


def scrub(obj, replacements: dict[str, str]):
    """``obj`` with every string's machine paths replaced (``{absolute prefix: relative}``,
    longest first): records hold no machine paths."""
    if isinstance(obj, dict):
        return {k: scrub(v, replacements) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, replacements) for v in obj]
    if isinstance(obj, str):
        for old in sorted(replacements, key=len, reverse=True):
            if old in obj:
                obj = obj.replace(old, replacements[old])
        return obj
    return obj
