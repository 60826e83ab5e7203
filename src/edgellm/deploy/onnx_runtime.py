"""ONNX Runtime: the model exported by ``torch.onnx`` with its KV cache, then run by onnxruntime.

The exported graph is one step of a decoder with a cache: inputs ``input_ids`` (1 × n) and the
cache of every layer (``past_0`` … ``past_{2L-1}``: keys and values, 1 × kv-heads × t × head-dim,
t = 0 for a prompt), outputs ``logits`` (1 × n × vocab) and the cache grown by n positions
(``present_*``). The same file prefills a prompt (n = prompt length, t = 0) and decodes (n = 1).
``torch.onnx.export(dynamo=True)`` traces it through ``torch.export``; the dynamic dimensions are
given with the same structure as the arguments (a dimension for the ids, a tuple of dimensions for
the cache).

Types (``ONNX_TYPES``):

* ``fp32``: the model as it is;
* ``int8``: onnxruntime's ``quantize_dynamic``: every linear's weight int8, per tensor, its
  activations quantized to int8 at run time, per tensor (Jacob et al., 2018); the tied output
  matrix becomes its own int8 copy, the embedding stays fp32;
* ``int8-keep-down``: the same with every ``down_proj`` left in fp32: the MLP's output has the
  widest activations (the outliers of LLM.int8, Dettmers et al., 2022), which one int8 scale per
  tensor cannot hold.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from edgellm.errors import EdgeLLMError

ONNX_TYPES = ("fp32", "int8", "int8-keep-down")


class OnnxError(EdgeLLMError):
    """An ONNX export or run that cannot work as asked."""


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise OnnxError(f"the ONNX runtime needs onnx, onnxscript and onnxruntime ({e}); "
                        "install them: pip install -r requirements.lock (or make setup)") from None
    return onnxruntime


def check_onnx_type(qtype: str) -> str:
    if qtype not in ONNX_TYPES:
        raise OnnxError(f"--type {qtype!r} is not an ONNX type; use one of {', '.join(ONNX_TYPES)}")
    return qtype


class KVStep(torch.nn.Module):
    """One decoder step with the cache as flat tensors in and out (what ONNX can carry)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1])
                                             for i in range(self.n_layers)],
                             config=self.model.config)
        start = past[0].shape[2]
        positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions,
                         use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_shape(config, length: int = 0) -> tuple[int, int, int, int]:
    heads = config.num_key_value_heads or config.num_attention_heads
    return (1, heads, length, config.hidden_size // config.num_attention_heads)


def linear_nodes(graph) -> dict[str, str]:
    """``{ONNX node name: module path}`` for the MatMul/Gemm nodes of ``nn.Linear`` modules,
    read from the name scopes the exporter stores on each node."""
    import ast

    out = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        hierarchy = meta.get("pkg.torch.onnx.class_hierarchy", "")
        if scopes and "torch.nn.modules.linear.Linear" in hierarchy:
            path = ast.literal_eval(scopes)[-2]
            out[node.name] = path.removeprefix("model.")
    return out


def export_onnx(model, out, *, qtype: str = "fp32", progress: bool = False) -> dict:
    """Write ``model`` (a Hugging Face causal LM) to ``out`` (``.onnx``, its weights beside it in
    ``out.data``), as type ``qtype``. Written in a temporary folder and renamed: a failed export
    leaves nothing behind."""
    _require()
    check_onnx_type(qtype)
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    import onnx

    t0 = time.perf_counter()
    try:
        cfg = model.config
        n = 2 * cfg.num_hidden_layers
        ids = torch.tensor([[1, 2, 3]])
        past = tuple(torch.zeros(cache_shape(cfg, 2)) for _ in range(n))
        seq = torch.export.Dim("seq", min=1, max=4096)
        prev = torch.export.Dim("past", min=1, max=4096)
        fp32 = tmp / (out.name if qtype == "fp32" else "fp32.onnx")
        with torch.no_grad():
            torch.onnx.export(
                KVStep(model).eval(), (ids, past), str(fp32), dynamo=True, external_data=True,
                dynamic_shapes={"input_ids": {1: seq}, "past": tuple({2: prev} for _ in range(n))},
                input_names=["input_ids"] + [f"past_{i}" for i in range(n)],
                output_names=["logits"] + [f"present_{i}" for i in range(n)],
                verbose=progress)
        quantized = []
        if qtype != "fp32":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            nodes = linear_nodes(onnx.load(str(fp32), load_external_data=False).graph)
            quantized = sorted(k for k, v in nodes.items()
                               if not (qtype == "int8-keep-down" and v.endswith("down_proj")))
            quantize_dynamic(str(fp32), str(tmp / out.name), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=quantized,
                             use_external_data_format=True)
        graph_file = tmp / out.name
        proto = onnx.load(str(graph_file), load_external_data=False)
        onnx.helper.set_model_props(proto, {"edgellm_type": qtype})
        onnx.save(proto, str(graph_file))             # the graph only: the weights stay as written
        data = tmp / f"{out.name}.data"
        if not data.is_file():
            raise OnnxError(f"the ONNX export wrote no weights file {data.name}")
        os.replace(data, out.parent / data.name)
        os.replace(tmp / out.name, out)              # the graph last: it names the weights file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": "onnx", "type": qtype, "out": str(out), "size_bytes": onnx_size(out),
            "quantized_linears": len(quantized), "seconds": time.perf_counter() - t0}


def onnx_size(path) -> int:
    """Bytes of an exported model: the graph and its weights file."""
    path = Path(path)
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def onnx_type(path) -> str | None:
    """The type ``export_onnx`` wrote into the file's metadata (None for another exporter's)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}.get("edgellm_type")


def check_onnx_file(path) -> None:
    """A file ``export_onnx`` wrote: present, ``.onnx``, readable by onnx, with its weights."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise OnnxError(f"{path}: not an .onnx file; write one with edgellm export --format onnx")
    if not path.is_file():
        raise OnnxError(f"{path}: no such file; write it with edgellm export --format onnx")
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 — protobuf raises several types on a damaged file
        raise OnnxError(f"{path}: not a readable ONNX model ({type(e).__name__}); write it "
                        "again with edgellm export --format onnx") from None
    names = [i.name for i in graph.input]
    if not names or names[0] != "input_ids" or "past_0" not in names:
        raise OnnxError(f"{path}: not a decoder with a KV cache as edgellm export --format onnx "
                        f"writes (inputs {names[:3]}…)")


class OrtLM(torch.nn.Module):
    """An exported ONNX model as a function of token ids to logits (each row from an empty
    cache), for the course's evaluation, and as a stepper for timed generation."""

    def __init__(self, path, *, threads: int = 1):
        super().__init__()
        ort = _require()
        check_onnx_file(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime's errors are plain exceptions
            raise OnnxError(f"onnxruntime could not load {path}: {str(e)[:300]}") from None
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.n_cache = len(past)
        self.empty = (1, past[0].shape[1], 0, past[0].shape[3])   # batch, heads, 0, head dim

    def step(self, ids: list[int], past=None):
        """Logits (numpy, 1 × n × vocab) of ``ids`` after ``past`` (None: an empty cache), and the
        grown cache."""
        import numpy as np

        if past is None:
            past = [np.zeros(self.empty, np.float32)] * self.n_cache
        feed = {"input_ids": np.asarray([ids], dtype=np.int64)}
        feed.update({f"past_{i}": p for i, p in enumerate(past)})
        logits, *present = self.session.run(None, feed)
        return logits, present

    def forward(self, ids):
        return torch.stack([torch.from_numpy(self.step([int(t) for t in row])[0][0])
                            for row in ids])


def bench_onnx(path, ids: list[int], *, gen_tokens: int = 128, threads: int = 1,
               repeats: int = 3) -> dict:
    """onnxruntime on an exported file: load, prefill and decode timings (the cache goes in and
    out of each step as numpy arrays, as an application using the plain API does)."""
    from edgellm.deploy.runtime import timed_generation

    t0 = time.perf_counter()
    lm = OrtLM(path, threads=threads)
    load_s = time.perf_counter() - t0
    state = {}

    def prefill(prompt):
        logits, state["past"] = lm.step(prompt)
        return int(logits[0, -1].argmax())

    def step(token):
        logits, state["past"] = lm.step([token], state["past"])
        return int(logits[0, -1].argmax())

    return timed_generation(prefill, step, ids, gen_tokens=gen_tokens, repeats=repeats,
                            load_s=load_s)
