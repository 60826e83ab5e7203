"""GPTQ's group-parameter convention (lesson 03's diagnosis): both sides of the switch."""

import pytest
import torch

pytestmark = pytest.mark.fast


def _problem(seed=0, out=6, n=256):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(512, n, generator=g) @ torch.randn(n, n, generator=g) / n ** 0.5
    return W, 2 * X.T @ X / len(X)


def test_block_start_group_params_differ_only_with_groups_inside_a_block():
    from edgellm.quant.gptq import gptq_quantize

    W, H = _problem()
    cur, qc = gptq_quantize(W, H, 3, 32, block_size=128, group_params="current")
    ref, qr = gptq_quantize(W, H, 3, 32, block_size=128, group_params="block_start")
    assert not torch.equal(qc.scale, qr.scale)  # groups after a block's first one see updates
    # the first group starts with the first block, before any update: same either way (later
    # blocks differ through the different codes of the earlier ones)
    assert torch.equal(qc.scale[:, 0], qr.scale[:, 0])
    assert torch.allclose(qr.dequantize(), ref) and torch.allclose(qc.dequantize(), cur)
    # per channel: one group, taken before any update, under both conventions
    a, _ = gptq_quantize(W, H, 3, None, group_params="current")
    b, _ = gptq_quantize(W, H, 3, None, group_params="block_start")
    assert torch.equal(a, b)


def test_group_params_bad_value():
    from edgellm.quant.gptq import gptq_quantize
    from edgellm.quant.qtensor import QuantError

    W, H = _problem(out=2, n=64)
    with pytest.raises(QuantError, match="block_start"):
        gptq_quantize(W, H, 3, 32, group_params="final")


def test_lesson_03_reads_the_recorded_diagnosis_as_recorded():
    """Lesson 03's 'Reading the diagnosis', against results/03_gptq_diag.json."""
    from edgellm.lessons.weight_quant import gptq_diag_summary
    from edgellm.results import load_sweep

    diag = load_sweep("03_gptq_diag")
    if diag.get("pending") or "layer_level" not in diag:
        pytest.skip("03_gptq_diag not recorded")
    for gs in (None, 64):
        rows = gptq_diag_summary(diag["layer_level"]["rows"], gs, False)
        awq = [r["heldout_vs_rtn"] for r in rows if r["method"] == "awq"]
        gptq = [r for r in rows if r["method"] == "gptq"]
        # GPTQ beats AWQ on held-out layer error in every configuration
        assert max(r["heldout_vs_rtn"] for r in gptq) < min(awq)
        # ... though it over-fits 8 windows far more than AWQ does
        over8 = [r["overfit"] for r in gptq if r["n_windows"] == 8]
        assert min(over8) > 1.45 and max(r["overfit"] for r in rows if r["method"] == "awq") < 1.1
    d = {r["command"].split("--group-size ")[1].split(" --calib")[0] + " n"
         + r["command"].split("--n-samples ")[1].split()[0]: r["delta_nll"]
         for r in diag["records"]}
    assert round(d["0 n8"], 2) == 2.70 and round(d["0 --act-order n8"], 2) == 1.95
    assert round(d["0 n128"], 2) == 2.27 and round(d["0 n32"], 2) == 2.72
    assert round(d["0 --damp 0.1 n8"], 2) == 2.50 and round(d["0 --sym n8"], 2) == 3.26
    assert round(d["64 n8"], 2) == 1.18 and round(d["64 --group-params block_start n8"], 2) == 0.97
