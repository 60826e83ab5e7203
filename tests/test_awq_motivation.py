"""AWQ's motivation experiment: RTN with 1 % of the input channels kept in full precision."""

import pytest
import torch

pytestmark = pytest.mark.fast


def test_salient_channels_by_each_criterion():
    from edgellm.quant.salient import n_salient, salient_channels

    W = torch.ones(4, 200)
    W[:, 7] = 5.0  # the largest weight column
    act = torch.ones(200)
    act[42] = 9.0  # the largest activation channel
    assert n_salient(200, 0.01) == 2 and n_salient(50, 0.01) == 1
    assert 42 in salient_channels(W, 0.01, "act", act_mag=act).tolist()
    assert 7 in salient_channels(W, 0.01, "weight").tolist()
    r1 = salient_channels(W, 0.01, "random", generator=torch.Generator().manual_seed(0))
    r2 = salient_channels(W, 0.01, "random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1, r2) and len(r1) == 2  # the generator fixes the control


def test_salient_bad_input():
    from edgellm.quant.qtensor import QuantError
    from edgellm.quant.salient import check_salient, salient_channels

    for frac in (0, -0.1, 0.9):
        with pytest.raises(QuantError, match="fraction"):
            check_salient(frac, "act")
    with pytest.raises(QuantError, match="act, weight, random"):
        check_salient(0.01, "hessian")
    with pytest.raises(QuantError, match="act_mag"):
        salient_channels(torch.ones(2, 8), 0.1, "act")


def test_keep_salient_restores_columns_and_helps_the_layer(tiny, monkeypatch):
    """On the tiny model: the kept columns equal the originals, the rest stay quantized, and
    every criterion lowers the weight error against plain RTN."""
    import copy

    import edgellm.data
    from edgellm.models import linear_layers
    from edgellm.quant.apply import quantize_model

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(edgellm.data, "get_calibration", lambda *a, **k: ids)
    ref = {n: lin.weight.detach().clone() for n, lin in linear_layers(tiny).items()}
    plain = copy.deepcopy(tiny)
    quantize_model(plain, method="rtn", bits=3, group_size=16)
    err_plain = sum((lin.weight - ref[n]).square().sum() for n, lin in
                    linear_layers(plain).items())
    for by in ("act", "weight", "random"):
        m = copy.deepcopy(tiny)
        info = quantize_model(m, method="rtn", bits=3, group_size=16, keep_salient=0.05,
                              salient_by=by).info
        assert info["keep_salient"] == 0.05 and info["salient_by"] == by
        assert info["n_salient_channels"] > 0 and info["bpw_extra"] > 0
        err = 0.0
        for n, lin in linear_layers(m).items():
            same = (lin.weight == ref[n]).all(dim=0)  # (in,) columns left at full precision
            assert same.sum() >= 1
            err += (lin.weight - ref[n]).square().sum()
        assert err < err_plain


def test_keep_salient_only_with_rtn():
    from edgellm.quant.apply import check_options
    from edgellm.quant.qtensor import QuantError

    with pytest.raises(QuantError, match="--method rtn"):
        check_options("gptq", keep_salient=0.01)
    check_options("rtn", keep_salient=0.01, salient_by="random")


def test_lesson_tables_from_records():
    """The lesson's salient table and the GPTQ diagnosis summary (lessons.weight_quant)."""
    from edgellm.lessons import weight_quant as wq

    recs = [dict(keep_salient=None, ppl=80.0, ppl_base=8.6, delta_nll=2.2, delta_nll_stderr=0.03,
                 n_tokens=8190),
            dict(keep_salient=0.01, salient_by="act", ppl=20.0, ppl_base=8.6, delta_nll=0.9,
                 delta_nll_stderr=0.04, n_tokens=8190, bpw_extra=0.16)]
    rows = wq.salient_table(recs)
    assert rows[0]["kept"] == "none" and "diff_vs_rtn" not in rows[0]
    assert rows[1]["diff_vs_rtn"] == pytest.approx(-1.3) and rows[1]["diff_bound"] == pytest.approx(0.05)
    assert "act" in wq.format_salient_table(rows)
    assert "03_awq_salient" not in wq.sweeps() and "03_gptq_diag" not in wq.sweeps()
    diag = []
    for layer in (2, 9):
        base = dict(layer=layer, group="down", group_size=None, sym=False)
        diag += [dict(base, method="rtn", heldout=2.0, calib_8=1.0),
                 dict(base, method="gptq", n_windows=8, act_order=False, damp=0.01,
                      group_params="current", calib=0.25, heldout=1.0)]
    (s,) = wq.gptq_diag_summary(diag)
    assert s["heldout_vs_rtn"] == pytest.approx(0.5) and s["calib_vs_rtn"] == pytest.approx(0.25)
    assert s["overfit"] == pytest.approx(4.0) and s["n"] == 2
    assert " no " in wq.format_gptq_diag([s])
    assert wq.gptq_diag_summary(diag, group_size=64) == []
