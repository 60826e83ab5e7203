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
