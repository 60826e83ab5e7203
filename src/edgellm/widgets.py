"""Interactive experiments for the lessons: pure functions, and thin ipywidgets views over them.

The pure functions (``weight_bytes``, ``device_budget``, ``context_per_token``, ``window_ppl``)
return plain numbers and rows, so the tests call them directly; the ``*_widget`` functions only
wire sliders to them and display the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import EdgeLLMError

GiB = 1 << 30

# bits per weight of the plain number formats, before any per-group scale is added
FORMAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}


class WidgetError(EdgeLLMError, ValueError):
    """Bad settings for an experiment (unknown format, stride larger than ctx, …)."""


@dataclass(frozen=True)
class Device:
    """A device class and how much of its memory one app may hold.

    ``usable_fraction`` is the share of RAM left to a single process once the operating system,
    other apps and (on phones) the OS's memory killer take their part.  The values are rough
    assumptions, stated so that a reader can change them.
    """
    name: str
    ram_bytes: int
    usable_fraction: float
    note: str = ""

    @property
    def budget_bytes(self) -> int:
        return int(self.ram_bytes * self.usable_fraction)


DEVICES = (
    Device("microcontroller board (8 MB PSRAM)", 8 << 20, 0.9, "ESP32-S3 class; no OS to share with"),
    Device("Raspberry Pi Zero 2 W (512 MB)", 512 << 20, 0.6, "single-board computer, Linux"),
    Device("Raspberry Pi 5 (8 GB)", 8 * GiB, 0.75, "single-board computer, Linux, headless"),
    Device("budget phone (4 GB)", 4 * GiB, 0.4, "Android; apps are killed well before RAM is full"),
    Device("phone (8 GB)", 8 * GiB, 0.6, "recent Android / iPhone class"),
    Device("laptop (16 GB)", 16 * GiB, 0.6, "desktop OS, browser and editor open"),
)


def bits_per_weight(fmt: str = "int4", *, group_size: int | None = None, scale_bits: int = 16,
                    with_min: bool = False) -> float:
    """Bits stored per weight: the format's bits plus the per-group scale (and min) amortised.

    ``bits_per_weight("int4", group_size=32, with_min=True)`` is llama.cpp's Q4_1:
    4 + 2·16/32 = 5.0 bits.  ``group_size=None`` counts the weights alone.
    """
    if fmt not in FORMAT_BITS:
        raise WidgetError(f"unknown format {fmt!r}; use one of {', '.join(FORMAT_BITS)}")
    bits = float(FORMAT_BITS[fmt])
    if group_size:
        bits += scale_bits * (2 if with_min else 1) / group_size
    return bits


def weight_bytes(n_params: int, fmt: str = "int4", **kwargs) -> float:
    """Bytes of ``n_params`` weights stored in ``fmt`` (see :func:`bits_per_weight`)."""
    return n_params * bits_per_weight(fmt, **kwargs) / 8


def device_budget(n_params: int, *, devices=DEVICES, formats=("fp32", "fp16", "int8", "int4"),
                  overhead: float = 0.2, group_size: int | None = None) -> list[dict]:
    """Does a model of ``n_params`` weights fit each device in each format?

    Memory needed = weight bytes × (1 + ``overhead``); the overhead stands for the KV cache,
    activations and the runtime (0.2 is a rough figure for short contexts; long contexts need
    more).  One row per (device, format) with ``weight_bytes``, ``need_bytes``, ``budget_bytes``,
    ``fits`` and ``headroom`` (budget / need; above 1 fits).
    """
    rows = []
    for dev in devices:
        for fmt in formats:
            w = weight_bytes(n_params, fmt, group_size=group_size if fmt.startswith("int") else None)
            need = w * (1 + overhead)
            rows.append({"device": dev.name, "format": fmt, "n_params": n_params,
                         "weight_bytes": w, "need_bytes": need, "budget_bytes": dev.budget_bytes,
                         "fits": need <= dev.budget_bytes, "headroom": dev.budget_bytes / need})
    return rows


def format_bytes(n: float) -> str:
    """``1536 → '1.5 KiB'``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.3g} TiB"


def budget_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`device_budget` rows (devices × formats)."""
    formats = list(dict.fromkeys(r["format"] for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    cell = {(r["device"], r["format"]): r for r in rows}
    width = max(len(d) for d in devices) + 2
    head = f"{'device (memory one app may use)':<{width + 12}}" + "".join(f"{f:>14}" for f in formats)
    lines = [head, "-" * len(head)]
    for d in devices:
        budget = cell[(d, formats[0])]["budget_bytes"]
        line = f"{d:<{width}}{format_bytes(budget):>10}  "
        for f in formats:
            r = cell[(d, f)]
            line += f"{('yes ' if r['fits'] else 'no  ') + format_bytes(r['need_bytes']):>14}"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# perplexity windows


def context_per_token(n_tokens: int, protocol: str = "sliding", ctx: int = 512,
                      stride: int | None = None) -> torch.Tensor:
    """For each scored token, how many tokens of context the model saw: LongTensor (N_scored,).

    Follows :func:`edgellm.metrics.windows` exactly, so its length is the ``n_tokens`` a
    perplexity record reports.
    """
    from .metrics import windows

    parts = []
    for w in windows(n_tokens, protocol, ctx, stride):
        # position p of the window predicts token start+p+1 having seen p+1 tokens
        parts.append(torch.arange(w.first, w.end - w.start - 1) + 1)
    return torch.cat(parts)


def window_ppl(model, tokens: torch.Tensor, ctx: int = 256, stride: int | None = None, *,
               protocol: str = "sliding", batch_size: int = 4) -> dict:
    """Perplexity of ``model`` on 1-D ``tokens`` with one window setting, plus the cost.

    Returns the :func:`edgellm.metrics.perplexity` record with ``n_fed`` (tokens pushed through
    the model) and ``mean_context`` (average context of a scored token) added.
    """
    from .metrics import perplexity, windows

    if protocol == "sliding":
        stride = stride or ctx // 2
    if protocol == "sliding" and not 1 <= stride <= ctx:
        raise WidgetError(f"stride={stride} must be between 1 and ctx={ctx}")
    rec = perplexity(model, tokens, protocol, ctx, stride=stride, batch_size=batch_size,
                     progress=False)
    wins = windows(len(tokens), protocol, ctx, stride)
    rec["n_fed"] = sum(w.end - w.start for w in wins)
    rec["mean_context"] = context_per_token(len(tokens), protocol, ctx, stride).double().mean().item()
    return rec


# --------------------------------------------------------------------------------------------
# views (ipywidgets)


def device_budget_widget(n_params: int | None = None):
    """Sliders for model size, overhead and group size over :func:`device_budget`."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    from .plots import plot_device_budget

    size = W.FloatLogSlider(value=(n_params or 135e6) / 1e9, base=10, min=-2, max=2, step=0.05,
                            description="params (B)", readout_format=".3g")
    overhead = W.FloatSlider(value=0.2, min=0.0, max=1.0, step=0.05, description="overhead")
    group = W.Dropdown(options=[("none", 0), ("32", 32), ("64", 64), ("128", 128)], value=0,
                       description="int group")
    out = W.Output()

    def show(*_):
        rows = device_budget(int(size.value * 1e9), overhead=overhead.value,
                             group_size=group.value or None)
        with out:
            out.clear_output(wait=True)
            print(budget_table(rows))
            fig = plot_device_budget(rows)
            display(fig)
            plt.close(fig)

    for w in (size, overhead, group):
        w.observe(show, names="value")
    show()
    return W.VBox([W.HBox([size, overhead, group]), out])


def context_stride_widget(model, tokens: torch.Tensor):
    """Pick ``ctx`` and ``stride``; press the button to measure sliding-window perplexity.

    Each press runs :func:`window_ppl` on ``tokens`` (keep them to a few thousand: the cost is
    printed as tokens fed through the model).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    from .plots import plot_windows

    ctx = W.Dropdown(options=[64, 128, 256, 512, 1024], value=256, description="ctx")
    frac = W.Dropdown(options=[("ctx (no overlap)", 1.0), ("ctx/2", 0.5), ("ctx/4", 0.25),
                               ("ctx/8", 0.125)], value=0.5, description="stride")
    button = W.Button(description="measure", button_style="primary")
    out = W.Output()
    history = []

    def run(*_):
        c = min(ctx.value, len(tokens))
        s = max(1, int(c * frac.value))
        with out:
            out.clear_output(wait=True)
            rec = window_ppl(model, tokens, c, s)
            history.append(rec)
            for r in history[-6:]:
                print(f"ctx={r['ctx']:5d} stride={r['stride']:5d}  ppl={r['ppl']:8.3f} ± "
                      f"{r['ppl_stderr']:.3f}  scored={r['n_tokens']}  fed={r['n_fed']}  "
                      f"mean context={r['mean_context']:.0f}  {r['seconds']:.1f} s")
            fig = plot_windows(len(tokens), "sliding", c, s)
            display(fig)
            plt.close(fig)

    button.on_click(run)
    return W.VBox([W.HBox([ctx, frac, button]), out])
