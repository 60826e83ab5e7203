"""Why is GPTQ the worst calibrated method here?  A layer-level diagnosis (lesson 03).

For three decoder layers of the default model, the inputs of every linear are captured from the
unquantized model on calibration windows (pydoc train split, 8 / 32 / 128 windows of 512
tokens, nested) and on held-out text (the first 16 windows of 512 tokens of the pydoc test
split).  Each weight group that shares an input (q/k/v, o, gate/up, down) is quantized at
3 bits by RTN, AWQ (scale search + clipping, both on the calibration H) and GPTQ, varying one
factor at a time from the recorded setting (per channel, asymmetric, damp 0.01, no act_order,
8 windows) and, for GPTQ, the full grid of calibration size x act_order x damp x sym.
The error of a quantized ``Q`` is the mean squared output error per token
``tr(ΔW H ΔWᵀ) / 2`` (:func:`edgellm.hessian.layer_error`), reported relative to RTN's on the
same data, on the calibration H (``calib``) and on the held-out H (``heldout``).

    OMP_NUM_THREADS=1 nice python scripts/gptq_diag.py     # adds ``layer_level`` to
                                                           # results/03_gptq_diag.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import torch

from edgellm.calib import capture_inputs
from edgellm.data import get_calibration, get_tokens
from edgellm.hessian import accumulate, from_sum, layer_error
from edgellm.models import load_model
from edgellm.quant.awq import fake_quantize_range, search_clip, search_scale
from edgellm.quant.gptq import gptq_quantize
from edgellm.quant.rtn import fake_quantize

LAYERS = (2, 9, 16)
SIZES = (8, 32, 128)
SEQ_LEN = 512
HELDOUT_WINDOWS = 16
BITS = 3
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
          "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_H(model, ids, layers=LAYERS, snapshots=(None,), batch_size=4):
    """{(layer, group): {n_windows: H}} from the unquantized model; H snapshots after the first
    ``n`` windows for each ``n`` in ``snapshots`` (None = all)."""
    first = {}
    for li in layers:
        att, mlp = model.model.layers[li].self_attn, model.model.layers[li].mlp
        first[(li, "qkv")], first[(li, "o")] = att.q_proj, att.o_proj
        first[(li, "gate_up")], first[(li, "down")] = mlp.gate_proj, mlp.down_proj
    mods = {k: m for k, m in first.items()}
    sums = {k: (None, 0) for k in mods}
    out = {k: {} for k in mods}
    last = max(layers)

    def on_input(key, x):
        xtx, n = sums[key]
        sums[key] = accumulate(xtx, x.reshape(-1, x.shape[-1]).float())
        sums[key] = (sums[key][0], n + x.shape[0] * x.shape[1])
        if key == (last, "down"):
            raise _Stop

    with capture_inputs(mods, on_input):
        for i in range(0, ids.shape[0], batch_size):
            try:
                model.model(input_ids=ids[i:i + batch_size], use_cache=False)
            except _Stop:
                pass
            done = i + batch_size
            for snap in snapshots:
                if snap == done or (snap is None and done >= ids.shape[0]):
                    for k, (xtx, n) in sums.items():
                        out[k][snap] = from_sum(xtx, n)
    return out


def weight_of(model, li, group):
    blk = model.model.layers[li]
    parent = blk.mlp if group in ("gate_up", "down") else blk.self_attn
    return torch.cat([getattr(parent, n).weight.detach().float() for n in GROUPS[group]])


def awq_q(W, H, bits, group_size, sym, skip_clip=False):
    """AWQ on one stacked group from H alone: the scale search then the clip search; the
    effective weights Q(W·s)/s."""
    x_mag = (H.diagonal() / 2).clamp(min=0).sqrt()  # RMS |x| per channel, from diag(H) = 2 E[x²]
    s, alpha, _ = search_scale([W], H, x_mag, bits, group_size, sym)
    Ws = W * s
    Hs = H / s.unsqueeze(0) / s.unsqueeze(1)
    r = 1.0 if skip_clip else search_clip(Ws, Hs, bits, group_size, sym)
    return fake_quantize_range(Ws, bits, group_size, sym, r).dequantize() / s, alpha


def main(path):
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_model(quiet=True)
    calib = get_calibration("pydoc", max(SIZES), SEQ_LEN, 0, tokenizer=tok)
    Hc = capture_H(model, calib, snapshots=SIZES)
    held = get_tokens("pydoc", tok, "test", HELDOUT_WINDOWS * SEQ_LEN)
    held = held[:HELDOUT_WINDOWS * SEQ_LEN].reshape(HELDOUT_WINDOWS, SEQ_LEN)
    Hh = capture_H(model, held)
    print(f"captured in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for (li, group), snaps in Hc.items():
        W = weight_of(model, li, group)
        H_held = Hh[(li, group)][None]

        def err(Q, H, W=W):
            return float(layer_error(W, Q, H=H))

        for gs, sym in itertools.product((None, 64), (False, True)):
            rtn = fake_quantize(W, BITS, gs, sym)
            base = {"layer": li, "group": group, "group_size": gs, "sym": sym}
            rows.append({**base, "method": "rtn", "heldout": err(rtn, H_held),
                         **{f"calib_{n}": err(rtn, snaps[n]) for n in SIZES}})
            for n in SIZES:
                Q, alpha = awq_q(W, snaps[n], BITS, gs, sym, skip_clip=group == "qkv")
                rows.append({**base, "method": "awq", "n_windows": n, "alpha": alpha,
                             "calib": err(Q, snaps[n]), "heldout": err(Q, H_held)})
            grid = itertools.product(SIZES, (False, True), (0.01, 0.1),
                                     ("current", "block_start") if gs else ("current",))
            for n, act_order, damp, conv in grid:
                Q, _ = gptq_quantize(W, snaps[n], BITS, gs, sym, damp=damp, act_order=act_order,
                                     group_params=conv)
                rows.append({**base, "method": "gptq", "n_windows": n, "act_order": act_order,
                             "damp": damp, "group_params": conv,
                             "calib": err(Q, snaps[n]), "heldout": err(Q, H_held)})
        print(f"layer {li} {group}: {len(rows)} rows, {time.time() - t0:.0f} s", flush=True)
    rec = {"layers": list(LAYERS), "bits": BITS, "seq_len": SEQ_LEN,
           "calib_windows": list(SIZES), "heldout_windows": HELDOUT_WINDOWS,
           "calib": "pydoc train, random windows, seed 0", "heldout": "pydoc test, first windows",
           "error": "tr(dW H dW^T)/2: mean squared output error per token",
           "command": "OMP_NUM_THREADS=1 python scripts/gptq_diag.py",
           "seconds": time.time() - t0, "rows": rows}
    merge(rec, path)


def merge(layer_level: dict, path: str = "results/03_gptq_diag.json") -> None:
    """Store the layer-level rows as the ``layer_level`` key of the sweep file (its commands and
    whole-model records stay as they are)."""
    with open(path) as f:
        sweep = json.load(f)
    sweep["layer_level"] = layer_level
    with open(path, "w") as f:
        json.dump(sweep, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/03_gptq_diag.json")
