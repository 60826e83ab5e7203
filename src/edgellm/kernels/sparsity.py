"""How concentrated the MLP's activations are: the statistics PowerInfer and Deja Vu build on.

In a gated MLP ``down(act(gate(x)) · up(x))`` the input of ``down_proj``, ``a`` (tokens,
intermediate), says how much each intermediate neuron contributes to this token's output: a
neuron with ``a = 0`` needs neither its row of ``gate``/``up`` nor its column of ``down``.
Deja Vu (Liu et al., 2023) predicts, per token, the few neurons that matter and reads only
their weights; PowerInfer (Song et al., 2023) notices that a small "hot" set of neurons is
active for most tokens (a power law), keeps those on the fast device and the cold rest on the
CPU.  Both lean on ReLU: in OPT and ReLU-fied Llamas (ProSparse, TurboSparse) most of ``a`` is
exactly zero, for free.

SmolLM2 uses SiLU (``x·sigmoid(x)``), which is zero only at 0: almost no activation is exactly
zero, and "near zero" depends on a threshold.  What remains is concentration: how much of the
``|a|`` mass the top 10 % of neurons carry, per token, and for a hot set fixed over the data,
and whether that hot set is stable (the same neurons ranked top on two disjoint halves of the
inputs).  The fraction of ``gate(x) < 0`` says what ReLU in place of SiLU would zero before any
retraining.  Per layer, over the tokens of the given windows:

* ``top_mass_per_token``: for each token, the share of ``Σ|a|`` in its own top-k neurons
  (k = ceil(top · intermediate)), averaged over tokens (uniform activations give ``top``);
* ``top_mass_ranked``: the share of all ``|a|`` mass in the k neurons of largest total mass:
  a fixed hot set, as PowerInfer's offline profiling chooses it;
* ``zero_fraction`` (``a == 0``), ``near_zero_fraction`` (``|a| < near · max_j |a_j|`` of that
  token), ``gate_negative_fraction`` (``gate(x) < 0``);
* ``hot_jaccard``: ``|A ∩ B| / |A ∪ B|`` of the top-k neurons by mean ``|a|`` on the first and
  the second half of the windows; two random k-sets score about ``k / (2·intermediate − k)``
  (``random_jaccard``).
"""

from __future__ import annotations

import math

import torch

from edgellm.kernels.q4 import KernelError


def top_k(n: int, top: float) -> int:
    """How many of ``n`` neurons make the top ``top`` fraction (at least one)."""
    if not 0 < top < 1:
        raise KernelError(f"top={top}: give a fraction between 0 and 1 (0.1 = the top 10 %)")
    return max(1, math.ceil(top * n - 1e-9))


def summarize(a: torch.Tensor, *, top: float = 0.1, near: float = 1e-3,
              gate: torch.Tensor | None = None) -> dict:
    """Sums over the tokens of ``a`` (tokens, intermediate), to be added across batches
    (:func:`merge`) and turned into statistics by :func:`finish`: ``tokens``, ``numel``,
    ``top_mass_sum`` (Σ over tokens of the per-token top-k share), ``zeros``, ``near_zero``,
    ``mass`` (intermediate,) float64 (Σ|a| per neuron), and ``gate_negative`` from ``gate``
    (the same shape, the gate projection's output) when given."""
    mag = a.detach().abs().double()                                      # (T, I)
    k = top_k(mag.shape[-1], top)
    total = mag.sum(-1)                                                  # (T,)
    share = mag.topk(k, dim=-1).values.sum(-1) / total.clamp_min(1e-300)
    peak = mag.amax(-1, keepdim=True)                                    # (T, 1)
    out = {"tokens": mag.shape[0], "numel": mag.numel(), "top_mass_sum": share.sum().item(),
           "zeros": int((a == 0).sum()), "near_zero": int((mag < near * peak).sum()),
           "mass": mag.sum(0), "gate_negative": 0}
    if gate is not None:
        out["gate_negative"] = int((gate < 0).sum())
    return out


def merge(a: dict | None, b: dict) -> dict:
    """The sums of two :func:`summarize` results (``a`` None: ``b``)."""
    return b if a is None else {k: a[k] + b[k] for k in b}


def jaccard(A: torch.Tensor, B: torch.Tensor) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two index sets (1-D integer tensors)."""
    a, b = set(A.tolist()), set(B.tolist())
    return len(a & b) / max(1, len(a | b))


def finish(first: dict, second: dict, *, top: float = 0.1) -> dict:
    """One layer's statistics (see the module docstring) from the sums of the first and the
    second half of the inputs."""
    both = merge(first, second)
    mass = both["mass"]                                                  # (I,)
    k = top_k(mass.numel(), top)
    hot = [(s["mass"] / max(1, s["tokens"])).topk(k).indices for s in (first, second)]
    return {"top_mass_per_token": both["top_mass_sum"] / both["tokens"],
            "top_mass_ranked": (mass.topk(k).values.sum() / mass.sum().clamp_min(1e-300)).item(),
            "zero_fraction": both["zeros"] / both["numel"],
            "near_zero_fraction": both["near_zero"] / both["numel"],
            "gate_negative_fraction": both["gate_negative"] / both["numel"],
            "hot_jaccard": jaccard(*hot)}


def random_jaccard(n: int, top: float) -> float:
    """Expected Jaccard overlap of two random k-subsets of ``n``: about ``k / (2n − k)``."""
    k = top_k(n, top)
    return k / (2 * n - k)


def _hooks(layers, sums: list, half: int, *, top: float, near: float) -> list:
    """Hooks adding each layer's :func:`summarize` of the ``down_proj`` input (with its
    ``gate_proj`` output) into ``sums[layer][half]``; returns their handles."""
    gates: dict[int, torch.Tensor] = {}

    def keep_gate(i):
        def hook(module, args, out):
            gates[i] = out.reshape(-1, out.shape[-1])                    # (B·T, I)
        return hook

    def count(i):
        def hook(module, args):
            a = args[0].reshape(-1, args[0].shape[-1])                   # (B·T, I)
            s = summarize(a, top=top, near=near, gate=gates.pop(i, None))
            sums[i][half] = merge(sums[i][half], s)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.gate_proj.register_forward_hook(keep_gate(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(count(i)))
    return handles


@torch.inference_mode()
def activation_stats(model, windows: torch.Tensor, *, top: float = 0.1, near: float = 1e-3,
                     batch_size: int = 4) -> dict:
    """Per-layer statistics of the input of every ``mlp.down_proj`` of a Llama-style model
    (``model.model.layers[i].mlp``) over ``windows`` (n, seq_len) token ids, n ≥ 2: the first
    ``n // 2`` windows are one half, the rest the other (for ``hot_jaccard``).

    Returns ``layers`` (a list of :func:`finish` dicts with ``layer``), ``mean`` (each statistic
    averaged over the layers), ``random_jaccard``, ``hidden_act``, ``intermediate_size``,
    ``tokens``."""
    from edgellm.models import decoder_layers

    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() != 2 or len(windows) < 2:
        raise KernelError(f"windows of shape {tuple(windows.shape)}: give (n, seq_len) token "
                          "ids with n >= 2 (two halves are compared)")
    layers = decoder_layers(model)
    halves = (windows[:len(windows) // 2], windows[len(windows) // 2:])
    sums = [[None, None] for _ in layers]                                # [layer][half]
    for h, part in enumerate(halves):
        handles = _hooks(layers, sums, h, top=top, near=near)
        try:
            for b in range(0, len(part), batch_size):
                model(input_ids=part[b:b + batch_size], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    rows = [{"layer": i, **finish(first, second, top=top)} for i, (first, second) in
            enumerate(sums)]
    keys = [k for k in rows[0] if k != "layer"]
    n_inter = sums[0][0]["mass"].numel()
    return {"layers": rows, "mean": {k: sum(r[k] for r in rows) / len(rows) for k in keys},
            "random_jaccard": random_jaccard(n_inter, top), "top": top, "near": near,
            "hidden_act": getattr(model.config, "hidden_act", None),
            "intermediate_size": n_inter, "tokens": windows.numel()}
