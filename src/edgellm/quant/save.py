"""Save and reload quantized models as packed codes + scales in safetensors.

A saved folder holds

``model.safetensors``
    for each quantized linear ``L``: ``L.qweight`` (uint8, codes bit-packed by
    :func:`edgellm.quant.pack.pack_codes`), ``L.scale`` (fp16 / fp32 as the format stores it;
    MXFP4: the uint8 E8M0 exponent byte), ``L.offset`` (asymmetric formats only) and ``L.bias``
    if any; every other tensor (embedding = tied lm_head, norms) as it is in the model (fp32),
    tied tensors once.  Lookup tables (NF4, FP8 …) are named by the format, not stored.
``quant_config.json``
    method, settings and, per layer, shape / bits / group size / format / sym / scale bits.
``config.json`` and the tokenizer files
    the Hugging Face model config, so :func:`load_quantized` rebuilds the architecture offline.

The safetensors file is within 1% of :func:`edgellm.quant.size.model_size`'s ``size_bytes``
(the rest is its JSON header), and reloading gives bit-identical logits (tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgellm.quant.pack import pack_codes, unpack_codes
from edgellm.quant.qtensor import QTensor, QuantError

WEIGHTS = "model.safetensors"
QCONFIG = "quant_config.json"


def _levels(fmt: str):
    from edgellm.quant import formats

    if fmt in ("mxfp4", "MXFP4"):
        return formats.E2M1_LEVELS
    if fmt in formats.LUT_FORMATS:
        return formats.LUT_FORMATS[fmt]
    if fmt in formats.FLOAT_FORMATS:
        return formats._float_table(formats.FLOAT_FORMATS[fmt])
    return None


def _scale_dtype(bits: int):
    return {16: torch.float16, 32: torch.float32}.get(bits)


def _store_qtensor(name: str, qt: QTensor, out: dict) -> dict:
    signed = qt.sym and qt.levels is None  # table formats store unsigned indices
    if qt.fmt == "F16":
        out[f"{name}.weight"] = qt.codes.half().contiguous()
        return {"fmt": "F16", "shape": list(qt.shape)}
    out[f"{name}.qweight"] = pack_codes(qt.codes, qt.bits, signed)
    if qt.fmt in ("mxfp4", "MXFP4"):
        out[f"{name}.scale"] = (torch.log2(qt.scale).round().to(torch.int32) + 127).to(torch.uint8)
    else:
        sd = _scale_dtype(qt.scale_bits)
        if sd is None:
            raise QuantError(f"{name}: cannot store {qt.scale_bits}-bit scales")
        out[f"{name}.scale"] = qt.scale.to(sd).contiguous()
        if not qt.sym:
            out[f"{name}.offset"] = qt.offset.to(sd).contiguous()
    return {"fmt": qt.fmt, "shape": list(qt.shape), "bits": qt.bits, "group_size": qt.group_size,
            "sym": qt.sym, "scale_bits": qt.scale_bits, "signed_codes": signed,
            "scale_shape": list(qt.scale.shape)}


def _load_qtensor(name: str, spec: dict, tensors: dict) -> QTensor:
    shape = tuple(spec["shape"])
    if spec["fmt"] == "F16":
        w = tensors[f"{name}.weight"].float()
        return QTensor(w, torch.ones(shape[0], 1), torch.zeros(shape[0], 1), shape, 16, shape[1],
                       True, "F16", 0)
    n = shape[0] * shape[1]
    codes = unpack_codes(tensors[f"{name}.qweight"], spec["bits"], n, spec["signed_codes"])
    levels = _levels(spec["fmt"])
    signed_int = spec["signed_codes"] or spec["bits"] > 7
    codes = codes.reshape(shape).to(torch.int16 if signed_int and spec["bits"] > 7 else
                                    torch.uint8 if levels is not None else torch.int8)
    if spec["fmt"] in ("mxfp4", "MXFP4"):
        e = tensors[f"{name}.scale"].to(torch.int32) - 127
        scale = torch.ldexp(torch.ones(e.shape), e)
    else:
        scale = tensors[f"{name}.scale"].float()
    offset = tensors[f"{name}.offset"].float() if not spec["sym"] else torch.zeros_like(scale)
    return QTensor(codes, scale.reshape(spec["scale_shape"]), offset.reshape(spec["scale_shape"]),
                   shape, spec["bits"], spec["group_size"], spec["sym"], spec["fmt"],
                   spec["scale_bits"], levels=levels)


def save_quantized(model: torch.nn.Module, qtensors: dict[str, QTensor], out_dir,
                   tokenizer=None, meta: dict | None = None) -> Path:
    """Write ``model`` with its quantized linears ``qtensors`` packed; return the folder.

    Written to a temporary folder beside ``out_dir``, then renamed (``out_dir`` must be new or
    empty): an interruption leaves no half-written model."""
    from safetensors.torch import save_file

    from edgellm.records import write_folder

    out_dir = Path(out_dir)
    tensors, layers = {}, {}
    for name, qt in qtensors.items():
        layers[name] = _store_qtensor(name, qt, tensors)
        bias = model.get_submodule(name).bias
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    quantized = {f"{name}.weight" for name in qtensors} | {f"{name}.bias" for name in qtensors}
    seen = set()
    for key, t in model.state_dict().items():
        if key in quantized or t.data_ptr() in seen:
            continue  # tied lm_head: stored once, as the embedding
        seen.add(t.data_ptr())
        tensors[key] = t.detach().contiguous()
    qconfig = {"format": "edgellm-quant", "version": 1, "layers": layers,
               "embedding_quantized": False, **(meta or {})}
    with write_folder(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "edgellm-quant"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / QCONFIG).write_text(json.dumps(qconfig, indent=1, sort_keys=True))
    return out_dir


def load_quantized(folder, *, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by :func:`save_quantized`.

    Returns ``(model, tokenizer or None, qtensors)``; the model's linears hold the dequantized
    weights (simulated quantization), ``qtensors`` the codes and scales read back.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / QCONFIG).is_file():
        raise QuantError(f"{folder} holds no {QCONFIG}; save it with edgellm quantize --out")
    qconfig = json.loads((folder / QCONFIG).read_text())
    tensors = load_file(str(folder / WEIGHTS))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    try:  # skip the random initialisation: every weight is overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    qtensors, state = {}, {}
    for name, spec in qconfig["layers"].items():
        qt = _load_qtensor(name, spec, tensors)
        qtensors[name] = qt
        state[f"{name}.weight"] = qt.dequantize().to(dtype)
    for key, t in tensors.items():
        if key.endswith((".qweight", ".scale", ".offset")) and key.rsplit(".", 1)[0] in qtensors:
            continue
        if key.endswith(".weight") and key.rsplit(".", 1)[0] in qtensors:
            continue
        state[key] = t
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise QuantError(f"{folder}: checkpoint does not match its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tok = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model.config._name_or_path = str(folder)
    return model.eval(), tok, qtensors
