"""The pure functions behind the lesson widgets (device budget, perplexity windows)."""

import math

import pytest
import torch

from edgellm.lessons import tour
from edgellm.lessons.common import LessonError, format_bytes
from edgellm.lessons.perplexity import context_per_token, window_ppl
from edgellm.lessons.tour import DEVICES, GiB, bits_per_weight, device_budget, weight_bytes
from edgellm.metrics import perplexity, windows


def _row(rows, device, fmt):
    (r,) = [r for r in rows if r["device"] == device and r["format"] == fmt]
    return r


def test_weight_bytes_per_format():
    n = 134_515_008
    assert weight_bytes(n, "fp32") == 4 * n
    assert weight_bytes(n, "fp16") == 2 * n
    assert weight_bytes(n, "int8") == n
    assert weight_bytes(n, "int4") == n / 2


def test_bits_per_weight_with_group_scales():
    # llama.cpp Q4_1: 32 4-bit values + fp16 scale + fp16 min per block = 160 bits / 32
    assert bits_per_weight("int4", group_size=32, with_min=True) == 5.0
    # Q8_0: 32 bytes + fp16 scale = 272 bits / 32
    assert bits_per_weight("int8", group_size=32) == 8.5
    assert bits_per_weight("int4", group_size=64) == 4.25
    with pytest.raises(LessonError, match="unknown format"):
        bits_per_weight("int3")


def test_seven_billion_on_an_8gb_phone():
    rows = device_budget(7_000_000_000, overhead=0.2)
    phone = "phone (8 GB)"
    assert [d.name for d in DEVICES].count(phone) == 1
    fp16, int4 = _row(rows, phone, "fp16"), _row(rows, phone, "int4")
    assert fp16["weight_bytes"] == 14e9 and not fp16["fits"]
    assert int4["need_bytes"] == pytest.approx(3.5e9 * 1.2)
    assert int4["fits"] and int4["headroom"] > 1
    # the budget is the stated usable share of 8 GiB
    assert int4["budget_bytes"] == int(8 * GiB * 0.6)


def test_default_model_fits_everything_but_a_microcontroller():
    rows = device_budget(134_515_008)
    assert len(rows) == len(DEVICES) * 4
    for r in rows:
        assert r["fits"] == (r["need_bytes"] <= r["budget_bytes"])
        if r["device"].startswith("microcontroller"):
            assert not r["fits"]
    # 512 MB Pi Zero: fp32 (~616 MiB with overhead) does not fit, int8 does
    assert not _row(rows, DEVICES[1].name, "fp32")["fits"]
    assert _row(rows, DEVICES[1].name, "int8")["fits"]


def test_budget_table_lists_every_device():
    text = tour.budget_table(device_budget(1_000_000_000))
    for d in DEVICES:
        assert d.name in text
    assert format_bytes(1536) == "1.5 KiB"


@pytest.mark.parametrize("protocol,ctx,stride", [
    ("gptq", 64, None), ("sliding", 64, 16), ("sliding", 64, 64), ("sliding", 50, 7),
    ("llamacpp", 64, None),
])
def test_context_per_token_matches_the_windows(protocol, ctx, stride):
    n = 1000
    c = context_per_token(n, protocol, ctx, stride)
    assert len(c) == sum(w.n_scored for w in windows(n, protocol, ctx, stride))
    assert c.min() >= 1 and c.max() <= ctx - 1
    if protocol == "sliding" and stride < ctx:
        assert len(c) == n - 1  # every token after the first, exactly once
    if protocol == "sliding" and stride == ctx:  # no overlap: like gptq, window starts unscored
        assert len(c) == n - len(windows(n, protocol, ctx, stride))
    if protocol == "llamacpp":
        assert c.min() == ctx // 2 + 1  # the scored half always sees half a window
    if protocol == "gptq":
        assert c.double().mean().item() == pytest.approx(ctx / 2)


def test_sliding_context_grows_as_stride_shrinks():
    means = [context_per_token(2000, "sliding", 128, s).double().mean().item()
             for s in (128, 64, 16)]
    assert means[0] < means[1] < means[2] < 127


def test_sliding_without_overlap_equals_gptq(tiny):
    tokens = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(1))
    a = perplexity(tiny, tokens, "sliding", 64, stride=64, progress=False)
    b = perplexity(tiny, tokens, "gptq", 64, progress=False)
    assert a["n_tokens"] == b["n_tokens"] == 4 * 63
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-9)


def test_window_ppl_matches_perplexity(tiny):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (300,), generator=g)
    rec = window_ppl(tiny, tokens, ctx=64, stride=16)
    ref = perplexity(tiny, tokens, "sliding", 64, stride=16, progress=False)
    assert rec["ppl"] == pytest.approx(ref["ppl"], rel=1e-9)
    assert rec["n_tokens"] == 299
    assert rec["n_fed"] > 299  # overlapping windows re-feed tokens
    assert math.isfinite(rec["mean_context"]) and rec["stride"] == 16
    with pytest.raises(LessonError, match="stride"):
        window_ppl(tiny, tokens, ctx=64, stride=100)


def test_widgets_build():
    import ipywidgets  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    box = tour.device_budget_widget(7_000_000_000)
    assert box.children
