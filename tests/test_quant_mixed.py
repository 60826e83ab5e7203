"""Mixed precision: the greedy allocation meets its bpw budget (never above, no upgrade left that
would fit), prefers the sensitive layers, and the applied model has that average bpw."""

import pytest
import torch

from edgellm.calib import CalibrationError
from edgellm.quant.mixed import allocate, apply_mixed, bpw_of, sensitivities
from edgellm.quant.qtensor import QuantError


def test_bpw_counts_scales_and_offsets():
    assert bpw_of(4, 32, 576) == 5.0  # Q4_1-like: 4 + (16 + 16) / 32
    assert bpw_of(4, 32, 576, sym=True) == 4.5
    assert bpw_of(8, None, 576) == 8 + 32 / 576


def test_allocation_is_greedy_and_within_budget():
    errors = {"a": {2: 100.0, 4: 10.0, 8: 1.0}, "b": {2: 5.0, 4: 1.0, 8: 0.5}}
    numels = {"a": 100, "b": 100}
    bpw = {n: {b: b + 0.5 for b in (2, 4, 8)} for n in errors}
    alloc = allocate(errors, numels, bpw, 4.5)
    assert alloc == {"a": 4, "b": 4}  # 4.5 exactly: both at 4 bits
    alloc = allocate(errors, numels, bpw, 3.5)
    assert alloc == {"a": 4, "b": 2}  # the sensitive layer gets the bits
    with pytest.raises(QuantError, match="below the smallest"):
        allocate(errors, numels, bpw, 2.0)


def test_apply_mixed_meets_budget(tiny):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    res = apply_mixed(tiny, ids, bpw_budget=4.3, candidates=(2, 3, 4, 6, 8), group_size=32,
                      progress=False)
    q, info = res.qtensors, res.info
    numel = {n: t.numel for n, t in q.items()}
    total = sum(numel.values())
    achieved = sum(t.bpw * numel[n] for n, t in q.items()) / total
    assert achieved <= 4.3 + 1e-9 and info["bpw"] == pytest.approx(achieved)
    # exactly at the budget up to the smallest possible upgrade: no single upgrade still fits
    smallest_step = min(numel.values()) * 1 / total
    assert 4.3 - achieved < smallest_step
    assert len(set(info["allocation"].values())) > 1  # a real mix
    for n, t in q.items():
        assert t.bits == info["allocation"][n]
    # error is monotone in bits for every layer
    for e in info["errors"].values():
        assert e[2] >= e[3] >= e[4] >= e[6] >= e[8]


def test_mixed_with_gptq(tiny):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    res = apply_mixed(tiny, ids, bpw_budget=4.0, candidates=(3, 4, 8), group_size=32,
                      method="gptq", progress=False)
    q, info = res.qtensors, res.info
    assert {n: t.bits for n, t in q.items()} == info["allocation"]
    assert info["bpw"] <= 4.0


@pytest.mark.integration
def test_sensitivities_on_real_layer(default_model):
    from edgellm import get_calibration

    model, tok = default_model
    calib = get_calibration(n_samples=4, seq_len=64, tokenizer=tok)
    errs = sensitivities(model, calib, (2, 4, 8), 64, layers=[0], progress=False)
    assert len(errs) == 7
    for e in errs.values():
        assert e[2] > e[4] > e[8] >= 0


def test_bad_input(tiny):
    with pytest.raises(CalibrationError, match="empty"):
        apply_mixed(tiny, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(QuantError, match="below the smallest"):
        apply_mixed(tiny, torch.ones(1, 8, dtype=torch.long), bpw_budget=1.0, group_size=32,
                    progress=False)
    with pytest.raises(QuantError, match="method"):
        apply_mixed(tiny, torch.ones(1, 8, dtype=torch.long), method="awq", progress=False)
    with pytest.raises(QuantError, match="bits=1"):
        apply_mixed(tiny, torch.ones(1, 8, dtype=torch.long), candidates=(1, 4), progress=False)
