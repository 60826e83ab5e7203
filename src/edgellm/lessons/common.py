"""What every lesson module shares: the error type of bad settings, a figure helper, byte units,
one weight of the default model without loading the model."""

from __future__ import annotations

import functools

from edgellm.errors import EdgeLLMError


class LessonError(EdgeLLMError, ValueError):
    """Bad settings for a lesson's experiment (unknown format, stride larger than ctx, ...)."""


def new_figure(figsize=(7, 3.5)):
    """A (figure, axes) pair with a constrained layout; nothing is drawn on a global figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def format_bytes(n: float) -> str:
    """``1536 → '1.5 KiB'``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.3g} TiB"


@functools.cache
def _default_model_file():
    from edgellm.models import ensure_cached

    return ensure_cached() / "model.safetensors"   # verified once per process


def default_weight(name: str):
    """The fp32 weight ``(out_features, in_features)`` of one linear of the default model, e.g.
    ``default_weight("model.layers.10.mlp.down_proj")``: the very tensor ``edgellm.load_model()``
    gives, read from the safetensors cache without building the model (milliseconds, where a
    section that needs only one matrix would otherwise load the whole model).  A new tensor on
    every call, so changing it changes nothing else."""
    from safetensors import safe_open

    with safe_open(str(_default_model_file()), framework="pt") as f:
        return f.get_tensor(f"{name}.weight")


def layer_stats(model, calib, layer: int = 0, *, xtx: bool = True, keep: int = 0):
    """``(stream, linears, stats)`` of decoder ``layer`` of the unchanged ``model`` on ``calib``
    (n_samples, seq_len) token ids: the stream positioned at the layer's input, the layer's
    linears by name and their :class:`edgellm.calib.InputStats` (``keep`` sequences of raw
    inputs kept).  What a lesson section needs to work on one real layer on its own."""
    from edgellm.calib import LayerStream, collect_inputs, layer_linears
    from edgellm.models import decoder_layers

    stream = LayerStream(model, calib)
    layers = decoder_layers(model)
    for i in range(layer):
        stream.advance(layers[i])
    linears = layer_linears(model, layer)
    return stream, linears, collect_inputs(layers[layer], linears, stream, xtx=xtx, keep=keep)
