"""Lesson 00 (setup and tour): where a model's bytes are, and which devices it fits.

Pure functions (``bits_per_weight``, ``weight_bytes``, ``device_budget``, ``budget_table``) return
plain numbers and rows, so tests call them directly; the plot and the widget only draw them.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.lessons.common import LessonError, format_bytes, new_figure

GiB = 1 << 30

# bits per weight of the plain number formats, before any per-group scale is added
FORMAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}


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
        raise LessonError(f"unknown format {fmt!r}; use one of {', '.join(FORMAT_BITS)}")
    if not group_size:
        return float(FORMAT_BITS[fmt])
    from edgellm.quant.size import bpw

    return bpw(FORMAT_BITS[fmt], group_size, scale_bits, scale_bits if with_min else 0)


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


def plot_params_by_module(groups: dict[str, int], *, bytes_per_param: float = 4.0):
    """Horizontal bars: parameters (and bytes at ``bytes_per_param``) of each module kind."""
    fig, ax = new_figure((7, 2.6))
    names = list(groups)
    counts = [groups[n] / 1e6 for n in names]
    bars = ax.barh(names, counts, color="tab:blue")
    total = sum(groups.values())
    for bar, n in zip(bars, names, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {groups[n] / 1e6:.2f} M  ({100 * groups[n] / total:.1f} %, "
                f"{groups[n] * bytes_per_param / 2**20:.0f} MiB)", va="center", fontsize=9)
    ax.set_xlabel("parameters (millions)")
    ax.set_xlim(0, max(counts) * 1.6)
    ax.invert_yaxis()
    ax.set_title(f"Where the parameters are: {total / 1e6:.1f} M in all")
    return fig


def plot_device_budget(rows: list[dict]):
    """Memory needed per format against each device's budget (log scale), from ``device_budget``."""
    import matplotlib
    import numpy as np

    fig, ax = new_figure((8, 3.6))
    formats = list(dict.fromkeys(r["format"] for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    cell = {(r["device"], r["format"]): r for r in rows}
    x = np.arange(len(formats))
    need = [cell[(devices[0], f)]["need_bytes"] for f in formats]
    ax.bar(x, need, width=0.5, color="tab:blue", label="model + overhead")
    for i, n in enumerate(need):
        ax.text(i, n, format_bytes(n), ha="center", va="bottom", fontsize=8)
    colors = matplotlib.colormaps["tab10"]
    for j, d in enumerate(devices):
        b = cell[(d, formats[0])]["budget_bytes"]
        ax.axhline(b, color=colors(j + 1), ls="--", lw=1.2, label=f"{d}: {format_bytes(b)} usable")
    ax.set_yscale("log")
    ax.set_xticks(x, formats)
    ax.set_ylabel("bytes")
    n = rows[0]["n_params"]
    ax.set_title(f"A {n / 1e9:.3g} B-parameter model: memory needed vs. device budgets")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def device_budget_widget(n_params: int | None = None):
    """Sliders for model size, overhead and group size over :func:`device_budget`."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

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
