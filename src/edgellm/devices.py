"""Where tensors live: the device names the library accepts, the check that one is usable here,
and moving a batch to the model it feeds.

The course runs on a laptop CPU (the default, ``cpu``); the same code runs on a GPU
(``cuda``, ``cuda:N``) or an Apple GPU (``mps``) where one exists.  A device comes from the
``--device`` flag of the command line or from the ``EDGELLM_DEVICE`` environment variable
(read here only, by :func:`default_device`; the lessons' and the library's default).  Tests
run on the CPU and check the plumbing with the ``meta`` device, which holds shapes and no data.
"""

from __future__ import annotations

import os
import re

import torch

from edgellm.errors import EdgeLLMError

#: the devices ``--device`` accepts
DEVICES = ("cpu", "cuda", "mps")
ENV = "EDGELLM_DEVICE"


class DeviceError(EdgeLLMError, ValueError):
    """A device that is unknown or not available on this machine; the message says what to do."""


def check_device(name: str | torch.device | None, *, flag: str = "--device") -> torch.device:
    """The :class:`torch.device` for ``name`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``meta``
    for tests), or a :class:`DeviceError` when it is unknown or this machine has none."""
    text = "cpu" if name is None else str(name)
    said = f"{ENV}={text}" if flag == ENV else f"{flag} {text}"  # what the user wrote
    if text in ("cpu", "meta"):
        return torch.device(text)
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not torch.cuda.is_available():
            raise DeviceError(f"{said}: this machine has no CUDA GPU that PyTorch can use "
                              f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                              "use --device cpu, or install a CUDA build of PyTorch on a GPU machine")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{said}: there are {torch.cuda.device_count()} CUDA "
                              f"device(s) here, numbered from 0")
        return torch.device(text)
    if text == "mps":
        if not (torch.backends.mps.is_available()):
            raise DeviceError(f"{said}: Apple's Metal GPU is not available here (it needs "
                              "macOS 12.3+ on Apple silicon and a PyTorch built with MPS); "
                              "use --device cpu")
        return torch.device("mps")
    raise DeviceError(f"{said}: unknown device; use one of {', '.join(DEVICES)} "
                      "(or cuda:N for the N-th GPU)")


def default_device() -> str:
    """``EDGELLM_DEVICE`` (checked), or ``cpu``: the one place the variable is read."""
    name = os.environ.get(ENV, "").strip() or "cpu"
    check_device(name, flag=ENV)
    return name


def check_cpu_only(device, what: str) -> None:
    """``what`` runs on the CPU only (llama.cpp, ONNX Runtime, ExecuTorch, our C++ kernels, the
    bitsandbytes CPU paths): any other device is a clear error, never silently ignored."""
    if device is not None and torch.device(str(device)).type != "cpu":
        raise DeviceError(f"--device {device}: {what} runs on the CPU only; drop --device or "
                          "give --device cpu")


def model_device(model) -> torch.device:
    """Where a model's inputs go: the device of its first parameter (``cpu`` for a module
    without parameters).  A model spread by accelerate (``device_map``) whose first weights are
    offloaded (``meta``) takes CPU inputs: accelerate's hooks move them."""
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if p is None:
        return torch.device("cpu")
    if p.device.type == "meta" and getattr(model, "hf_device_map", None):
        return torch.device("cpu")
    return p.device


def to_device(batch, device):
    """``batch`` on ``device``: a tensor, or a dict / list / tuple of them (other values as
    they are); a no-op where it is there already."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == torch.device(device) else batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def synchronize(device) -> None:
    """Wait until ``device`` has finished its queued work (a GPU runs asynchronously): call it
    before reading a clock, or a timing measures only the launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
