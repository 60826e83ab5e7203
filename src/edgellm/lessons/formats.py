"""Pure functions behind lesson 02's plots and widget: a format's grid over real weights.

The widget (:func:`format_widget`) is a thin view: every number it shows comes from
:func:`format_view`, which the tests call directly.
"""

from __future__ import annotations

import torch

from edgellm.quant.formats import FORMATS, format_bits, quantization_error, quantize_format

GROUP_CHOICES = (("g32", 32), ("g64", 64), ("g192", 192), ("per channel", None),
                 ("per tensor", -1))


def group_grid(qt, row: int = 0, group: int = 0) -> torch.Tensor:
    """Sorted distinct values (weight units) one group of a QTensor can take."""
    r = min(row, qt.scale.shape[0] - 1)
    g = min(group, qt.scale.shape[1] - 1)
    s, o = qt.scale[r, g], qt.offset[r, g]
    if qt.levels is not None:
        lv = qt.levels[torch.isfinite(qt.levels)]
    else:
        from edgellm.quant.rtn import code_range

        lo, hi = code_range(qt.bits, qt.sym) if qt.fmt == "int" else (
            int(qt.codes.min()), int(qt.codes.max()))
        lv = torch.arange(lo, hi + 1, dtype=torch.float32)
    return torch.unique(lv * s + o)


def group_values(W: torch.Tensor, qt, row: int = 0, group: int = 0) -> torch.Tensor:
    """The weights that share the scale of (row, group): a group, a row, or the whole tensor."""
    out, n = W.shape
    if qt.scale.numel() == 1:  # per tensor
        return W.reshape(-1)
    g = n // qt.scale.shape[1]
    return W[row, group * g:(group + 1) * g]


def format_view(W: torch.Tensor, fmt: str = "int", bits: int = 4, group_size: int | None = 64,
                sym: bool = False, row: int = 0, group: int = 0) -> dict:
    """Quantize ``W`` (out, in) and describe the result for display.

    Returns ``values`` (the weights sharing one scale: group ``group`` of row ``row``),
    ``grid`` (the values that group can take), ``w_hat`` (dequantized W), the error
    metrics of :func:`quantization_error` over the whole matrix, ``bpw``, ``size_bytes``,
    ``n_levels`` and a one-line ``label``.
    """
    qt = quantize_format(W, fmt, bits, group_size, sym)
    W_hat = qt.dequantize()
    grid = group_grid(qt, row, group)
    gname = {None: "per channel", -1: "per tensor"}.get(group_size, f"g{group_size}")
    if fmt == "mxfp4":
        gname = "blocks of 32, E8M0 scale"
    b = format_bits(fmt, bits)
    kind = ("sym" if sym else "asym") if fmt == "int" else "absmax"
    err = quantization_error(W, W_hat)
    label = (f"{fmt}{b if fmt == 'int' else ''} {kind}, {gname}\nrel err {err['rel_err']:.4f}, "
             f"SQNR {err['sqnr_db']:.1f} dB, {qt.bpw:.3f} bpw")
    return {"values": group_values(W, qt, row, group), "grid": grid, "w_hat": W_hat,
            **err, "bpw": qt.bpw, "size_bytes": qt.size_bytes, "n_levels": len(grid),
            "fmt": fmt, "bits": b, "group_size": group_size, "sym": sym, "label": label}


def plot_format_view(view: dict, ax=None, bins: int = 60, show_error: bool = True):
    """Histogram of the group's weights with the format's grid drawn over it."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 2.8), layout="constrained")
    v = view["values"].float()
    ax.hist(v.numpy(), bins=bins, color="0.7")
    for x in view["grid"].tolist():
        ax.axvline(x, color="C3", lw=0.8, alpha=0.8)
    lo, hi = v.min().item(), v.max().item()
    pad = 0.1 * (hi - lo + 1e-12)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_title(view["label"] if show_error else view["fmt"], fontsize=9)
    ax.set_xlabel(f"weight value ({len(v)} weights sharing a scale; red: the "
                  f"{view['n_levels']} levels)", fontsize=8)
    return ax.figure


def format_widget(W: torch.Tensor):
    """Format / bits / group size / symmetric -> histogram with grid, error and bpw, live."""
    import ipywidgets as wd
    import matplotlib.pyplot as plt
    from IPython.display import display

    fmt = wd.Dropdown(options=list(FORMATS), value="int", description="format")
    bits = wd.IntSlider(value=4, min=2, max=8, description="bits (int)")
    group = wd.Dropdown(options=list(GROUP_CHOICES), value=64, description="group")
    sym = wd.Checkbox(value=False, description="symmetric (int)")
    out = wd.Output()

    def show(*_):
        with out:
            out.clear_output(wait=True)
            view = format_view(W, fmt.value, bits.value, group.value, sym.value)
            fig = plot_format_view(view)
            display(fig)
            plt.close(fig)

    for w in (fmt, bits, group, sym):
        w.observe(show, names="value")
    show()
    return wd.VBox([wd.HBox([fmt, bits]), wd.HBox([group, sym]), out])


def collect_inputs(model, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs ``X`` (tokens, in_features) of the named linear layers for one batch of ``ids``."""
    got, hooks = {}, []
    for name in names:
        def hook(mod, args, _name=name):
            got[_name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def tail_stats(x: torch.Tensor) -> dict:
    """How heavy-tailed a tensor is: absmax / std, kurtosis, share of |x| > 6 std.

    ``raw_kurtosis`` is ``E[z⁴]`` of the standardised values (3 for a Gaussian), the convention
    the lessons print (lesson 04's activation statistics use it too); ``kurtosis`` is the excess
    kurtosis ``E[z⁴] − 3`` (0 for a Gaussian)."""
    x = x.double().reshape(-1)
    m, s = x.mean(), x.std()
    z = (x - m) / s
    return {"std": s.item(), "absmax": x.abs().max().item(),
            "absmax_over_std": (x.abs().max() / s).item(),
            "kurtosis": (z.pow(4).mean() - 3).item(), "raw_kurtosis": z.pow(4).mean().item(),
            "frac_beyond_6std": (z.abs() > 6).double().mean().item()}
