"""QA-LoRA (edgellm.lora.qalora): a group-pooled adapter merges into an INT4 base by moving the
offsets only, so the merged model stays on the grid; a plain LoRA on the same base does not."""

import pytest
import torch

from edgellm import tiny_llama
from edgellm.lora.chat import answer_loss, left_pad
from edgellm.lora.layers import LoRAError
from edgellm.lora.qalora import QALoRALinear
from edgellm.train import train

BATCH = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0, [[0, 0, 0, 1, 1], [0, 1, 1]])


def _layer(pooled: bool) -> QALoRALinear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False)
    m = QALoRALinear(lin, 4, 8, group_size=64, pooled=pooled)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.05)
    return m


@pytest.mark.fast
def test_the_pooled_adapter_merges_onto_the_grid_and_a_plain_one_does_not():
    x = torch.randn(3, 256)
    for pooled in (True, False):
        m = _layer(pooled)
        assert m.lora_A.shape == ((4, 4) if pooled else (4, 256))       # 256 inputs / g64
        delta = m.delta_weight()
        exact = m.qt.dequantize() + delta
        with torch.no_grad():
            assert torch.allclose(m(x), x @ exact.T, atol=1e-5)         # what merging must keep
            qt, changed = m.merged_on_grid()
            err = float((qt.dequantize() - exact).norm() / delta.norm())
        if pooled:   # constant across each group: only the offsets move (fp16-rounded)
            assert changed == 0.0 and torch.equal(qt.codes, m.qt.codes)
            assert torch.equal(qt.scale, m.qt.scale) and err < 0.05   # fp16 offsets: ~1 %
            assert torch.allclose(delta[:, :64], delta[:, :1].expand(-1, 64))
        else:        # off the grid: re-quantizing loses a large part of the update
            assert changed > 0.01 and err > 0.3


@pytest.mark.fast
def test_a_rank_above_the_number_of_groups_is_a_clear_error():
    with pytest.raises(LoRAError, match="group means"):
        QALoRALinear(torch.nn.Linear(128, 32), 4, group_size=64)


def test_qalora_trains_and_merges_on_the_tiny_model():
    from edgellm.lora.apply import prepare
    from edgellm.lora.merge import merge_int4

    m, cfg = prepare(tiny_llama(), method="qalora", rank=1, alpha=None, targets="all",
                     dropout=0.0, rslora=False, seed=0, grad_checkpointing=False)
    assert cfg is None
    res = train(m, None, steps=3, lr=5e-2, loss_fn=answer_loss, batches=[BATCH] * 3)
    assert res.losses[-1] < res.losses[0]
    ids = BATCH["input_ids"]
    with torch.no_grad():
        want = m(input_ids=ids).logits
        info = merge_int4(m, on_grid=True)
        got = m(input_ids=ids).logits
    assert info["changed_codes_median"] == 0.0 and info["requant_rel_err_median"] < 0.05
    assert (got - want).abs().max() < 1e-2 * want.abs().max()
