"""The pure functions behind lesson 02's widget and plots."""

import pytest
import torch

from edgellm.lessons import formats as explore
from edgellm.lessons.common import default_weight
from edgellm.quant.formats import FORMATS
from edgellm.quant.rtn import fake_quantize


def _W():
    return torch.randn(12, 192, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_view_every_format(fmt):
    view = explore.format_view(_W(), fmt, bits=4, group_size=64, sym=False)
    assert view["w_hat"].shape == (12, 192)
    # every dequantized weight of the shown group lies on the shown grid
    g = 32 if fmt == "mxfp4" else 64
    on_grid = view["w_hat"][0, :g].unsqueeze(1) == view["grid"].unsqueeze(0)
    assert on_grid.any(1).all()
    assert len(view["values"]) == g and 0 < view["rel_err"] < 0.35
    assert view["n_levels"] <= (16 if fmt in ("int", "nf4", "bnb_fp4", "mxfp4", "fp4_e2m1")
                                else 256)
    assert fmt in view["label"] and f"{view['bpw']:.3f}" in view["label"]


@pytest.mark.parametrize("sym", [False, True])
def test_format_view_int_matches_rtn_and_counts(sym):
    W = _W()
    for bits in (2, 3, 8):
        view = explore.format_view(W, "int", bits, 64, sym)
        assert torch.equal(view["w_hat"], fake_quantize(W, bits, 64, sym))
        assert view["n_levels"] == (2 ** bits - 1 if sym else 2 ** bits)
        assert view["bpw"] == bits + (16 if sym else 32) / 64


@pytest.mark.parametrize("group_size,n", [(None, 192), (-1, 12 * 192), (32, 32)])
def test_format_view_granularity(group_size, n):
    view = explore.format_view(_W(), "int", 4, group_size, False)
    assert len(view["values"]) == n


def test_plot_and_widget_build():
    import matplotlib

    matplotlib.use("Agg")
    fig = explore.plot_format_view(explore.format_view(_W(), "nf4", group_size=64))
    assert len(fig.axes[0].lines) == 16  # one line per NF4 level
    box = explore.format_widget(_W())
    assert len(box.children) == 3


def test_collect_inputs_and_tail_stats(tiny):
    ids = torch.randint(0, 256, (1, 10))
    got = explore.collect_inputs(tiny, ids, ["model.layers.0.mlp.down_proj"])
    assert got["model.layers.0.mlp.down_proj"].shape == (10, 128)
    gauss = explore.tail_stats(torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
    assert abs(gauss["kurtosis"]) < 0.1 and gauss["frac_beyond_6std"] < 1e-4
    spiky = torch.randn(100_000)
    spiky[::1000] = 50
    assert explore.tail_stats(spiky)["kurtosis"] > 100


@pytest.mark.integration
def test_default_weight_is_the_loaded_models_weight(default_model):
    model, _ = default_model
    name = "model.layers.10.mlp.down_proj"
    W = default_weight(name)
    assert W.dtype == torch.float32 and torch.equal(W, model.get_submodule(name).weight)
    W.zero_()  # a new tensor each call: the next one is untouched
    assert torch.equal(default_weight(name), model.get_submodule(name).weight)
