"""LoftQ from scratch (edgellm.lora.loftq): the alternation, the NF4 base it leaves, and the
adapter it saves, expressed on the original weights."""

import json

import pytest
import torch

from edgellm import tiny_llama
from edgellm.lora.chat import answer_loss, left_pad
from edgellm.lora.loftq import loftq
from edgellm.quant.backends.bitsandbytes import nf4_roundtrip
from edgellm.train import train

BATCH = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0, [[0, 0, 0, 1, 1], [0, 1, 1]])


@pytest.mark.fast
def test_loftq_fits_the_weight_better_than_nf4_and_improves_with_iterations():
    torch.manual_seed(0)
    w = torch.randn(96, 192) * 0.02
    w[:, :4] *= 10                                       # a few outlier inputs, as in real layers
    r = loftq(w, 8, iters=4, scaling=2.0)
    errs = r["rel_err"]
    assert errs[0] < r["rel_err_nf4"]                     # the adapter takes the top of the error
    assert all(b <= a + 1e-7 for a, b in zip(errs, errs[1:], strict=False)) and errs[-1] < errs[0]
    assert torch.equal(r["base"], nf4_roundtrip(r["quant_input"]))
    approx = r["base"] + 2.0 * r["B"] @ r["A"]            # B comes divided by the scaling
    assert abs(float((w - approx).norm() / w.norm()) - errs[-1]) < 1e-5
    one = loftq(w, 8, iters=1)
    assert torch.equal(one["quant_input"], w)             # iteration 1 quantizes W: QLoRA's base
    with pytest.raises(ValueError, match="iters"):
        loftq(w, 8, iters=0)


def test_a_loftq_model_has_the_loftq_base_and_saves_a_lora_on_the_original_weights(tmp_path):
    from edgellm.lora.apply import load_adapter, prepare, save_adapter
    from edgellm.quant.backends.bitsandbytes import bnb_dequantize

    m, cfg = prepare(tiny_llama(), method="loftq", rank=4, alpha=None, targets="all",
                     dropout=0.0, rslora=False, seed=0, grad_checkpointing=False)
    ref = tiny_llama()
    q = m.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    w = ref.model.layers[0].self_attn.q_proj.weight.detach()
    base = bnb_dequantize(q.base_layer)
    start = base + q.lora_B["default"].weight @ q.lora_A["default"].weight
    assert (start - w).norm() < (nf4_roundtrip(w) - w).norm()     # LoftQ starts closer to W
    train(m, None, steps=3, lr=1e-2, loss_fn=answer_loss, batches=[BATCH] * 3)
    out = save_adapter(m, tmp_path / "ad", config=cfg)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8   # 2r on W itself
    assert json.loads((out / "edgellm_adapter.json").read_text())["converted_from"] == "loftq"
    ids = BATCH["input_ids"]
    with torch.no_grad():
        want = m(input_ids=ids).logits
        bare = ref(ids).logits
        got = load_adapter(ref, out)(ids).logits
    # on the original W the converted adapter reproduces the trained model up to LoftQ's last
    # quantization error, far closer than W without it
    assert (got - want).norm() < 0.5 * (bare - want).norm()


@pytest.mark.fast
def test_paired_difference():
    from edgellm.lora.merge import paired

    r = paired([True, True, False, False], [True, False, True, True])
    assert r["delta"] == 0.25 and r["n_changed"] == 3
    assert r["delta_se"] == pytest.approx((((1 - .25) ** 2 * 2 + (-1 - .25) ** 2 + .25 ** 2) / 3 / 4) ** .5)


def test_a_qlora_adapter_merged_in_fp32_computes_what_the_unmerged_model_does():
    from edgellm.lora.apply import apply_qlora
    from edgellm.lora.merge import merge_qlora_into

    m = apply_qlora(tiny_llama(), rank=4)
    train(m, None, steps=3, lr=5e-2, loss_fn=answer_loss, batches=[BATCH] * 3)
    ids = BATCH["input_ids"]
    fp32, plain = tiny_llama(), tiny_llama()
    assert merge_qlora_into(m, fp32) == [0.0] * 14             # 7 linears in each of 2 layers
    errs = merge_qlora_into(m, plain, requantize=True)
    with torch.no_grad():
        want, got, rounded = m(input_ids=ids).logits, fp32(ids).logits, plain(ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale            # kernel precision only
    assert min(errs) > 0.05                                    # NF4 loses part of every update
    assert (rounded - want).abs().max() > (got - want).abs().max()
