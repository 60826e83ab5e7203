"""LoRA adapters on disk, in peft's format (``adapter_model.safetensors`` +
``adapter_config.json``), with the base model's fingerprint beside them so that an adapter
made for another base is refused with a clear error.  Folders are written whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgellm.lora.layers import LoRAError, lora_layers

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EDGELLM_META = "edgellm_adapter.json"    # base-model fingerprint, task, prompt style


def base_fingerprint(model) -> dict:
    """What an adapter must match: the base model's name and shapes."""
    cfg = model.config
    return {"base_model": str(cfg._name_or_path), "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
            "intermediate_size": getattr(cfg, "intermediate_size", None)}


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter weights with peft's key names
    (``base_model.model.<module>.lora_A.weight``): ours or a peft model's."""
    layers = lora_layers(model)
    if layers:
        out = {}
        for name, m in layers.items():
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
        return out
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model, folder, *, config=None, meta: dict | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's format, loadable with
    ``PeftModel.from_pretrained``) + ``edgellm_adapter.json`` (base fingerprint, ``meta``) into
    the new folder ``folder``: written to a temporary folder, then renamed, so an interruption
    leaves no half-written adapter."""
    from safetensors.torch import save_file

    from edgellm.records import write_folder

    base = getattr(model, "get_base_model", lambda: model)()
    if config is None:
        config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        raise LoRAError("no adapter config: pass config=peft_config(...) for a from-scratch model")
    init_dir = getattr(model, "edgellm_init_dir", None)
    loftq_init = getattr(model, "edgellm_loftq_init", None)
    with write_folder(folder) as tmp:
        if loftq_init is not None:
            state, config = loftq_as_lora(adapter_state_dict(model), config, loftq_init)
            save_file(state, str(Path(tmp) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            config.save_pretrained(str(tmp))
            meta = {**(meta or {}), "converted_from": "loftq"}
        elif init_dir is not None:
            # PiSSA / LoftQ changed W at initialisation: peft rewrites the trained adapter as a
            # plain LoRA of rank 2r on the original W (ΔW = B A − B₀ A₀), loadable anywhere
            model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=init_dir)
        else:
            save_file(adapter_state_dict(model), str(Path(tmp) / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            config.save_pretrained(str(tmp))
        (Path(tmp) / EDGELLM_META).write_text(json.dumps(
            {"base": base_fingerprint(base), **(meta or {})}, indent=1, sort_keys=True) + "\n")
    return Path(folder)


def loftq_as_lora(state: dict, config, inits: dict):
    """A LoftQ adapter trained on its own 4-bit base ``Q ≈ W − s B₀A₀``, rewritten as a plain
    LoRA of rank 2r on the original ``W``: ``W + s (B A − B₀ A₀)`` (peft's PiSSA conversion; the
    residual ``Q − (W − s B₀A₀)``, LoftQ's final quantization error, is what it cannot carry)."""
    import copy
    import math

    state = dict(state)
    for name, r in inits.items():
        key = f"base_model.model.{name}"
        A, B = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        state[f"{key}.lora_A.weight"] = torch.cat([A, r["A"].to(A.dtype)], 0).contiguous()
        state[f"{key}.lora_B.weight"] = torch.cat([B, -r["B"].to(B.dtype)], 1).contiguous()
    config = copy.deepcopy(config)
    grow = math.sqrt(2) if config.use_rslora else 2.0  # the same scaling at rank 2r
    config.r, config.lora_alpha = 2 * config.r, config.lora_alpha * grow
    config.init_lora_weights = True
    return state, config


def read_adapter_meta(folder) -> dict:
    folder = Path(folder).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise LoRAError(f"{folder}: not an adapter folder (needs {ADAPTER_CONFIG} and "
                        f"{ADAPTER_WEIGHTS}); give the --out folder of `edgellm finetune`")
    meta_path = folder / EDGELLM_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["peft"] = json.loads((folder / ADAPTER_CONFIG).read_text())
    return meta


def check_adapter_base(model, folder) -> dict:
    """The adapter was made for this base model, else a :class:`LoRAError` naming both."""
    meta = read_adapter_meta(folder)
    want = meta.get("base") or {"base_model": meta["peft"].get("base_model_name_or_path")}
    have = base_fingerprint(model)
    diff = [k for k, v in want.items() if v is not None and have.get(k) != v]
    if diff:
        raise LoRAError(
            f"the adapter in {folder} was made for base model {want.get('base_model')!r} "
            f"({', '.join(f'{k}={want[k]}' for k in diff)}), but this model is "
            f"{have['base_model']!r} ({', '.join(f'{k}={have.get(k)}' for k in diff)}); load it "
            "on the base model it was trained on (--model)")
    return meta


def adapter_bytes(folder) -> int:
    return (Path(folder) / ADAPTER_WEIGHTS).stat().st_size


def adapter_param_bytes(model) -> int:
    """Bytes of the adapter tensors as saved (their dtype, fp32 here)."""
    return sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values())


def keep_initial_adapter(model) -> Path:
    """Save a PiSSA / LoftQ model's initial adapter (A₀, B₀) to a temporary folder, which
    :func:`save_adapter` needs to express the trained adapter on the original weights."""
    import atexit
    import shutil
    import tempfile

    init_dir = Path(tempfile.mkdtemp(prefix="edgellm-lora-init-"))
    atexit.register(shutil.rmtree, init_dir, ignore_errors=True)
    cfg = model.peft_config["default"]
    init, cfg.init_lora_weights = cfg.init_lora_weights, True  # reload as-is, no re-init
    model.save_pretrained(str(init_dir))
    cfg.init_lora_weights = init
    model.edgellm_init_dir = str(init_dir)
    return init_dir
