"""ExecuTorch with the XNNPACK backend: the model as a ``.pte`` program, run by ExecuTorch's runtime.

Export path (ExecuTorch 1.4 on transformers 5):

1. transformers' ``TorchExportableModuleWithStaticCache`` wraps the model: inputs ``input_ids``
   (1 × n) and ``cache_position`` (n), output the logits; the KV cache is a fixed-size buffer
   (``max_len`` positions) inside the program, written in place;
2. the tied embedding and output matrix get their own storage (two graph inputs sharing one
   tensor break the XNNPACK lowering), before any quantization, so that torchao's quantized
   tensors are not shared either;
3. ``torch.export(strict=True)`` with the prompt length dynamic, then
   ``to_edge_transform_and_lower`` with ``XnnpackPartitioner``: every supported operator runs in
   XNNPACK's kernels.

Types (``PTE_TYPES``): ``fp32``; ``8da4w``: torchao's int8 dynamic per-token activations with
int4 weights in groups of 32 (``Int8DynamicActivationIntxWeightConfig``), ExecuTorch's standard
mobile recipe, on every linear including the output matrix; the embedding stays fp32.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from edgellm.errors import EdgeLLMError

PTE_TYPES = ("fp32", "8da4w")


class ExecuTorchError(EdgeLLMError):
    """An ExecuTorch export or run that cannot work as asked."""


def _require():
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise ExecuTorchError(f"the ExecuTorch runtime needs executorch ({e}); install it: pip "
                              "install -r requirements.lock (or make setup)") from None
    return Runtime


def check_pte_type(qtype: str) -> str:
    if qtype not in PTE_TYPES:
        raise ExecuTorchError(f"--type {qtype!r} is not an ExecuTorch type; use one of "
                              f"{', '.join(PTE_TYPES)}")
    return qtype


def untie(model) -> None:
    """Give the output matrix its own storage (a copy of the tied embedding)."""
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def export_pte(model, out, *, qtype: str = "fp32", max_len: int = 512) -> dict:
    """Write ``model`` (a Hugging Face causal LM; changed in place: untied, and quantized for
    ``8da4w``) to ``out`` (``.pte``) with a KV cache of ``max_len`` positions. Written to a
    temporary name and renamed."""
    _require()
    check_pte_type(qtype)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    out = Path(out)
    t0 = time.perf_counter()
    untie(model)
    if qtype == "8da4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                               weight_granularity=PerGroup(32)))
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static",
        cache_config={"batch_size": 1, "max_cache_len": max_len})
    wrapped = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_len)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    with torch.no_grad():
        program = torch.export.export(
            wrapped.eval(), (), {"input_ids": torch.tensor([[1, 2, 3]]),
                                 "cache_position": torch.arange(3)},
            dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
    seconds_export = time.perf_counter() - t0
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    buffer = lowered.to_executorch().buffer
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(buffer)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"format": "executorch", "type": qtype, "out": str(out), "size_bytes": len(buffer),
            "max_len": max_len, "seconds_export": seconds_export,
            "seconds": time.perf_counter() - t0}


def check_pte_file(path) -> None:
    path = Path(path)
    if path.suffix != ".pte":
        raise ExecuTorchError(f"{path}: not a .pte file; write one with edgellm export --format "
                              "executorch")
    if not path.is_file():
        raise ExecuTorchError(f"{path}: no such file; write it with edgellm export --format "
                              "executorch")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] != b"ET12":                          # the FlatBuffer file identifier
        raise ExecuTorchError(f"{path}: not an ExecuTorch program (identifier {head[4:8]!r}); "
                              "write it again with edgellm export --format executorch")


def set_threads(threads: int) -> None:
    """ExecuTorch's thread pool (XNNPACK's kernels run on it), one per process."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


class PteLM(torch.nn.Module):
    """A ``.pte`` program as a function of token ids to logits (each row from position 0: the
    static cache is overwritten, later positions masked), and as a stepper for generation."""

    def __init__(self, path, *, threads: int = 1):
        super().__init__()
        runtime = _require()
        check_pte_file(path)
        set_threads(threads)
        try:
            self.method = runtime.get().load_program(str(path)).load_method("forward")
        except Exception as e:  # noqa: BLE001 — the runtime raises plain RuntimeErrors
            raise ExecuTorchError(f"ExecuTorch could not load {path}: {str(e)[:300]}") from None

    def step(self, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long)
        try:
            return self.method.execute([x, torch.arange(start, start + len(ids))])[0]
        except Exception as e:  # noqa: BLE001
            raise ExecuTorchError(f"ExecuTorch failed on {len(ids)} tokens at position {start} "
                                  f"(past the program's cache length?): {str(e)[:200]}") from None

    def forward(self, ids):
        return torch.stack([self.step([int(t) for t in row], 0)[0] for row in ids])


def bench_executorch(path, ids: list[int], *, gen_tokens: int = 128, threads: int = 1,
                     repeats: int = 3) -> dict:
    """ExecuTorch on a ``.pte`` file: load, prefill and decode timings."""
    from edgellm.deploy.runtime import timed_generation

    t0 = time.perf_counter()
    lm = PteLM(path, threads=threads)
    load_s = time.perf_counter() - t0
    position = {}

    def prefill(prompt):
        position["next"] = len(prompt)
        return int(lm.step(prompt, 0)[0, -1].argmax())

    def step(token):
        position["next"] += 1
        return int(lm.step([token], position["next"] - 1)[0, -1].argmax())

    return timed_generation(prefill, step, ids, gen_tokens=gen_tokens, repeats=repeats,
                            load_s=load_s)
