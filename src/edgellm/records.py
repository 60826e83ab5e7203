"""Results as self-describing JSON records: values, protocol, model, data, versions, seed."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGES = ("edgellm", "torch", "transformers", "tokenizers", "gguf", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def record(values: dict, *, seed: int = 0, **meta) -> dict:
    """Merge metric values with what is needed to reproduce them."""
    import torch

    return {**values, **meta, "seed": seed, "threads": torch.get_num_threads(),
            "versions": versions()}


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    return write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write text atomically (temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
