"""Results as self-describing JSON records: values, protocol, model, data, versions, seed."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
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
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    os.replace(tmp, path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def write_folder(folder: str | os.PathLike):
    """Write a whole folder atomically: yields a temporary folder beside ``folder``; when the
    block ends without an error it is renamed to ``folder``, otherwise removed, so a failure
    or an interruption leaves no half-written folder.  ``folder`` must not exist, or be empty.
    """
    from edgellm.errors import EdgeLLMError

    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EdgeLLMError(f"{folder} exists and is not an empty folder; give a new folder "
                           "(nothing is overwritten)")
    folder.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.absolute().parent, prefix=f".{folder.name}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual mode
    try:
        yield tmp
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
