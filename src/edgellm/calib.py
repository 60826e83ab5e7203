"""Calibration inputs, layer by layer: the sequential loop GPTQ, AWQ and imatrix share.

GPTQ's recipe (Frantar et al., 2022, and every method built on it) never runs the whole model
on the calibration set at once.  It embeds the calibration tokens, then walks the decoder:

1. run decoder layer ``i`` on the current hidden states with forward hooks on its linear layers,
   collecting each linear's inputs (or statistics of them, such as ``XᵀX``);
2. quantize that layer's linears;
3. run the *quantized* layer again to get the hidden states for layer ``i + 1``.

So layer ``i + 1`` is calibrated on what it will really see once everything before it is
quantized, and only one layer's activations live in memory: ``n_samples × seq_len × hidden``
floats (128 × 512 × 576 × 4 bytes = 151 MB for SmolLM2-135M), twice (inputs and outputs).

The rotary position embeddings and the causal mask are computed once, as Hugging Face's
``LlamaModel.forward`` does, and passed to every decoder layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from edgellm import hessian
from edgellm.devices import model_device
from edgellm.errors import EdgeLLMError
from edgellm.models import decoder_layers, layer_linears  # noqa: F401  (the topology, re-exported)


class CalibrationError(EdgeLLMError, ValueError):
    """A calibration set or layer selection that cannot be used; the message says what to do."""


def check_calibration(calib) -> torch.Tensor:
    """The calibration token ids as a (n_samples, seq_len) LongTensor; raises on an empty set."""
    if calib is None:
        raise CalibrationError("no calibration set given; pass calib=edgellm.get_calibration(tokenizer=tok)"
                         " (or --calib pydoc --n-samples N --seq-len L on the command line)")
    ids = torch.as_tensor(calib)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise CalibrationError(
            f"the calibration set is empty or malformed (shape {tuple(ids.shape)}); it must be a "
            "(n_samples, seq_len) tensor of token ids with n_samples >= 1 and seq_len >= 2, "
            "e.g. edgellm.get_calibration(n_samples=32, seq_len=512, tokenizer=tok)")
    if ids.shape[1] < 2:
        raise CalibrationError(f"calibration seq_len={ids.shape[1]} is too short; use seq_len >= 2")
    if ids.is_floating_point():
        raise CalibrationError("the calibration set must hold integer token ids, not floats")
    return ids.long()


class LayerStream:
    """The calibration batch flowing through the decoder, one layer at a time.

    ``hidden`` (n_samples, seq_len, hidden) float32 holds the inputs of the current layer;
    ``run(layer)`` applies a decoder layer to them (in batches of ``batch_size`` sequences) and
    ``advance(layer)`` makes that output the next layer's input.
    """

    def __init__(self, model, calib, *, batch_size: int = 8):
        ids = check_calibration(calib)
        self.model = model
        self.base = getattr(model, "model", model)
        self.layers = decoder_layers(model)
        self.batch_size = max(1, int(batch_size))
        device = model_device(model)  # the ids go where the model is: the same loop on a GPU
        with torch.no_grad():
            self.hidden = self.base.embed_tokens(ids.to(device)).float()  # (N, T, C)
            T = ids.shape[1]
            self.position_ids = torch.arange(T, device=device).unsqueeze(0)  # (1, T)
            # rotary cos/sin computed once, (1, T, head_dim) each, broadcast over the batch
            self.position_embeddings = self.base.rotary_emb(self.hidden[:1], self.position_ids)
        self._masks: dict[int, object] = {}

    @property
    def n_samples(self) -> int:
        return self.hidden.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    def mask(self, batch: int):
        """The causal mask for a batch of ``batch`` sequences (``None`` when sdpa can skip it)."""
        if batch not in self._masks:
            from transformers.masking_utils import create_causal_mask

            self._masks[batch] = create_causal_mask(
                config=self.base.config, inputs_embeds=self.hidden[:batch], attention_mask=None,
                past_key_values=None, position_ids=self.position_ids)
        return self._masks[batch]

    def layer_kwargs(self, batch: int) -> dict:
        """Keyword arguments of a decoder layer (or its ``self_attn``) for ``batch`` sequences."""
        return {"attention_mask": self.mask(batch), "position_ids": self.position_ids,
                "position_embeddings": self.position_embeddings}

    def slices(self, n: int | None = None):
        """Slices of at most ``batch_size`` sequences over the first ``n`` (default all)."""
        n = self.n_samples if n is None else min(n, self.n_samples)
        for i in range(0, n, self.batch_size):
            yield slice(i, min(i + self.batch_size, n))

    @torch.no_grad()
    def run(self, layer, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Apply a decoder layer to ``hidden`` (default: the stream's current inputs)."""
        hidden = self.hidden if hidden is None else hidden
        out = torch.empty_like(hidden)
        for s in self.slices(hidden.shape[0]):
            h = hidden[s]
            out[s] = layer(h, use_cache=False, **self.layer_kwargs(h.shape[0]))
        return out

    @torch.no_grad()
    def run_module(self, module, x: torch.Tensor, *, attention: bool = False) -> torch.Tensor:
        """Apply a sub-module (``self_attn`` with ``attention=True``, an MLP, a linear) in batches."""
        outs = []
        for s in self.slices(x.shape[0]):
            xb = x[s]
            if attention:
                y = module(hidden_states=xb, **self.layer_kwargs(xb.shape[0]))[0]
            else:
                y = module(xb)
            outs.append(y)
        return torch.cat(outs)

    def advance(self, layer) -> None:
        """Run (the now quantized) ``layer`` and make its outputs the next layer's inputs."""
        self.hidden = self.run(layer)


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module], fn):
    """While the context is open, each forward of ``modules[name]`` calls ``fn(name, x)``.

    ``x`` is the module's input: its first positional argument, or the ``hidden_states``
    keyword (decoder layers and attention blocks are called with keywords).  The hooks are
    removed on exit, also after an exception.  The one forward-hook input collector of the
    package: calibration statistics, activation statistics, pruning scores all go through it.
    """
    def hook(name):
        def on_forward(module, args, kwargs, output):
            fn(name, args[0] if args else kwargs["hidden_states"])
        return on_forward

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class InputStats:
    """What the hooks saw at one linear layer's input over the calibration set.

    ``n``      number of input rows (tokens) seen
    ``xtx``    (in, in) float32 Σ xᵀx over tokens, when requested (kept as a sum while batches
               arrive, :func:`edgellm.hessian.accumulate`; read ``H``)
    ``sq``     (in,) float32 Σ x² per input channel (``n · diag(H) / 2``; llama.cpp's imatrix)
    ``abs``    (in,) float32 Σ |x| per input channel (AWQ's activation magnitude)
    ``X``      (kept, seq_len, in) raw inputs of the first ``keep`` sequences, when requested
    ``key``    linears with the same key saw the very same input tensor (q/k/v, gate/up)
    """

    n: int = 0
    xtx: torch.Tensor | None = None
    sq: torch.Tensor | None = None
    abs: torch.Tensor | None = None
    X: list | torch.Tensor | None = field(default=None, repr=False)
    key: int = 0

    @property
    def H(self) -> torch.Tensor:
        """The Hessian of the layer-wise loss, ``H = 2 XᵀX / n`` (in, in) float32
        (:mod:`edgellm.hessian`'s convention, shared by every technique)."""
        return hessian.from_sum(self.xtx, self.n)

    @property
    def mean_sq(self) -> torch.Tensor:
        """``E[x²]`` per input channel (in,), i.e. ``diag(H) / 2``, without forming ``H``."""
        return self.sq / max(self.n, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs / max(self.n, 1)


@torch.no_grad()
def collect_inputs(layer, linears: dict[str, nn.Linear], stream: LayerStream, *,
                   xtx: bool = True, moments: bool = True,
                   keep: int = 0) -> dict[str, InputStats]:
    """Run ``layer`` on the stream's inputs with hooks on ``linears``; return their input stats.

    Linears fed by the same tensor (q/k/v after ``input_layernorm``; gate/up after
    ``post_attention_layernorm``) share one :class:`InputStats` object, so ``XᵀX`` is computed
    once per distinct input, not once per linear.  ``moments=False`` skips the per-channel
    sums ``sq`` and ``abs`` (for a caller that reads only ``XᵀX``).  ``keep`` sequences of raw
    inputs are kept (for AWQ's searches); everything else is reduced on the fly.
    """
    stats: dict[str, InputStats] = {}
    # id of this batch's input tensor -> (the tensor, kept alive so its id stays unique; stats)
    by_tensor: dict[int, tuple[torch.Tensor, InputStats]] = {}
    n_done = [0]  # sequences already through the layer, to know which ones to keep
    order = {n: i for i, n in enumerate(linears)}

    def on_input(name, x):
        st = by_tensor.get(id(x), (None, None))[1]
        if st is None:  # first linear to see this tensor in this batch: reduce it
            st = stats.get(name)
            if st is None:
                st = InputStats(key=order[name])
            x2 = x.reshape(-1, x.shape[-1]).float()  # (B·T, in)
            if xtx:
                st.xtx, _ = hessian.accumulate(st.xtx, x2)
            st.n += x2.shape[0]
            if moments:
                sq, ab = x2.square().sum(0), x2.abs().sum(0)
                st.sq = sq if st.sq is None else st.sq.add_(sq)
                st.abs = ab if st.abs is None else st.abs.add_(ab)
            take = min(keep - n_done[0], x.shape[0])
            if take > 0:
                st.X = (st.X or []) + [x[:take].detach().float().clone()]
            by_tensor[id(x)] = (x, st)
        stats[name] = st

    with capture_inputs(linears, on_input):
        for s in stream.slices():
            h = stream.hidden[s]
            by_tensor.clear()
            layer(h, use_cache=False, **stream.layer_kwargs(h.shape[0]))
            n_done[0] += h.shape[0]
    for st in {id(s): s for s in stats.values()}.values():
        if isinstance(st.X, list):
            st.X = torch.cat(st.X)
    missing = [n for n in linears if n not in stats]
    if missing:
        raise CalibrationError(f"linear layers {missing} were never called in the decoder layer")
    return stats


def sequential(model, calib, quantize_layer, *, layers=None, batch_size: int = 8,
               progress: bool = True, desc: str = "quantize") -> LayerStream:
    """The layer-by-layer loop: ``quantize_layer(index, layer, stream)`` then propagate.

    ``quantize_layer`` sees the stream positioned at the layer's inputs (the outputs of the
    already quantized earlier layers) and changes the layer in place; the loop then runs the
    quantized layer to produce the next layer's inputs.  ``layers`` (indices) restricts the
    work to some decoder layers (the loop stops after the last one): for tests and lessons.
    """
    stream = LayerStream(model, calib, batch_size=batch_size)
    wanted = check_layers(layers, len(stream.layers))
    layers = [(i, m) for i, m in enumerate(stream.layers) if i <= max(wanted)]
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc=desc, leave=False)
    with torch.no_grad():
        for i, layer in layers:
            if i in wanted:
                quantize_layer(i, layer, stream)
            stream.advance(layer)
    return stream


def check_layers(layers, n_layers: int) -> set[int]:
    """The set of decoder layer indices to work on (``None``: all ``n_layers``)."""
    if layers is None:
        return set(range(n_layers))
    wanted = {int(i) for i in layers}
    bad = sorted(i for i in wanted if not 0 <= i < n_layers)
    if not wanted or bad:
        raise CalibrationError(f"layers={sorted(wanted)} must be a non-empty set of decoder layer "
                         f"indices in 0…{n_layers - 1}")
    return wanted


@torch.no_grad()
def logits_from_stream(model, stream: LayerStream) -> torch.Tensor:
    """Final norm and lm_head on the stream's hidden states (after the last layer): (N, T, V)."""
    return model.lm_head(stream.base.norm(stream.hidden))


def in_model_order(model, result: dict) -> dict:
    """``result`` re-ordered like the model's modules (q, k, v, o, gate, up, down per layer)."""
    from edgellm.models import linear_layers

    return {n: result[n] for n in linear_layers(model) if n in result}


@contextlib.contextmanager
def single_thread():
    """Run the enclosed torch ops on one thread, then restore the thread count.

    The quantizers' searches are many small ops; on a shared, busy CPU, splitting each over
    threads costs more in hand-offs than it saves (measured: 10× slower under load).  Also
    usable as a decorator.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
