"""LoRALinear from scratch against peft on the tiny model: same outputs for the same A and a
non-zero B, same weights after 3 AdamW steps, same merged weights; parameter counts, rank checks,
adapters saved in peft's format and refused on another base, the answer-masked loss."""

import copy
import json

import pytest
import torch

from edgellm import tiny_llama
from edgellm.lora.apply import (
    ADAPTER_WEIGHTS,
    TARGETS,
    adapter_param_bytes,
    apply_lora,
    apply_peft,
    check_lora_args,
    load_adapter,
    lora_layers,
    merge_lora,
    peft_config,
    save_adapter,
    trainable_params,
    unmerge_lora,
)
from edgellm.lora.chat import answer_loss, left_pad
from edgellm.lora.layers import LoRAError, LoRALinear, lora_scaling
from edgellm.train import TrainError, train
from tests.conftest import random_ids

pytestmark = pytest.mark.fast


def _pair(targets="all", rank=4, alpha=8.0, rslora=False):
    """(ours, peft) on two copies of one tiny model; peft's A copied from ours, B set non-zero
    and equal in both."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    apply_lora(ours, rank=rank, alpha=alpha, targets=targets, rslora=rslora)
    theirs = apply_peft(copy.deepcopy(base), rank=rank, alpha=alpha, targets=targets,
                        rslora=rslora)
    g = torch.Generator().manual_seed(1)
    peft_modules = dict(theirs.base_model.model.named_modules())
    for name, m in lora_layers(ours).items():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
            p = peft_modules[name]
            p.lora_A["default"].weight.copy_(m.lora_A)
            p.lora_B["default"].weight.copy_(m.lora_B)
    return ours, theirs


def test_lora_linear_starts_at_the_base_and_merges():
    lin = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    m = LoRALinear(copy.deepcopy(lin), rank=2, alpha=4)
    assert torch.equal(m(x), lin(x))                      # B = 0
    assert m.scaling == 2.0 and lora_scaling(4, 8, rslora=True) == 4.0
    with torch.no_grad():
        m.lora_B.normal_()
    y = m(x)
    assert not torch.allclose(y, lin(x))
    m.merge()
    assert torch.allclose(m(x), y, atol=1e-6)
    m.unmerge()
    assert torch.allclose(m.base.weight, lin.weight, atol=1e-6)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("targets", list(TARGETS))
def test_same_outputs_as_peft(targets):
    ours, theirs = _pair(targets)
    ids = random_ids()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-6
    assert trainable_params(ours) == trainable_params(theirs)


@pytest.mark.parametrize("rslora", [False, True])
def test_same_weights_as_peft_after_three_adamw_steps(rslora):
    ours, theirs = _pair(rslora=rslora)
    batches = [random_ids(seed=s) for s in range(3)]
    for model in (ours, theirs):
        train(model, None, steps=3, lr=1e-2, loss_fn=lambda m, b: m(input_ids=b, labels=b).loss,
              batches=batches)
    peft_modules = dict(theirs.base_model.model.named_modules())
    worst = 0.0
    for name, m in lora_layers(ours).items():
        p = peft_modules[name]
        worst = max(worst, (m.lora_A - p.lora_A["default"].weight).abs().max().item(),
                    (m.lora_B - p.lora_B["default"].weight).abs().max().item())
    assert worst <= 1e-6
    # after merging, the merged weights agree too
    merge_lora(ours)
    merged = theirs.merge_and_unload()
    ref = dict(merged.named_parameters())
    for name, m in lora_layers(ours).items():
        assert (m.base.weight - ref[name + ".weight"]).abs().max() <= 1e-6
    ids = random_ids(seed=9)
    with torch.no_grad():
        assert (ours(ids).logits - merged(ids).logits).abs().max() <= 1e-5
    unmerge_lora(ours)


def test_trainable_params_and_adapter_bytes():
    m = tiny_llama()  # hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads → kv 32
    apply_lora(m, rank=2, targets="qv")
    # q: A 2×64 + B 64×2; v: A 2×64 + B 32×2  → per layer 256 + 192, two layers
    assert trainable_params(m) == 2 * (2 * 64 + 64 * 2 + 2 * 64 + 32 * 2)
    assert adapter_param_bytes(m) == 4 * trainable_params(m)
    assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)


def test_bad_settings_are_clear_errors():
    with pytest.raises(LoRAError, match="rank=0"):
        apply_lora(tiny_llama(), rank=0)
    with pytest.raises(LoRAError, match="larger than"):
        apply_lora(tiny_llama(), rank=65, targets="qv")
    with pytest.raises(LoRAError, match="unknown targets"):
        check_lora_args(targets="mlp_only")
    with pytest.raises(LoRAError, match="unknown method"):
        check_lora_args(method="ia3")
    with pytest.raises(LoRAError, match="dropout"):
        check_lora_args(dropout=1.5)


def test_adapter_round_trip_in_peft_format(tmp_path):
    ours, _ = _pair(targets="attn")
    out = save_adapter(ours, tmp_path / "ad", config=peft_config(rank=4, alpha=8.0,
                                                                  targets="attn",
                                                                  base="tiny-llama"))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", ADAPTER_WEIGHTS,
                                                     "edgellm_adapter.json"]
    assert not list(tmp_path.glob(".ad-*"))               # no temporary folder left
    ids = random_ids()
    with torch.no_grad():
        want = ours(ids).logits
        mine = load_adapter(tiny_llama(), out)
        assert (mine(ids).logits - want).abs().max() <= 1e-6
        from peft import PeftModel

        theirs = PeftModel.from_pretrained(tiny_llama(), str(out))
        assert (theirs(input_ids=ids).logits - want).abs().max() <= 1e-6
    with pytest.raises(Exception, match="not an empty folder"):
        save_adapter(ours, out, config=peft_config(rank=4, targets="attn"))


def test_adapter_for_another_base_is_refused(tmp_path):
    m = tiny_llama()
    apply_lora(m, rank=2, targets="qv")
    out = save_adapter(m, tmp_path / "ad", config=peft_config(rank=2, targets="qv"))
    other = tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(LoRAError, match="made for base model"):
        load_adapter(other, out)
    meta = json.loads((out / "edgellm_adapter.json").read_text())
    meta["base"]["base_model"] = "some/other-model"
    (out / "edgellm_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(LoRAError, match="some/other-model"):
        load_adapter(tiny_llama(), out)


def test_interrupted_save_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch as st

    m = tiny_llama()
    apply_lora(m, rank=2, targets="qv")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(m, tmp_path / "ad", config=peft_config(rank=2, targets="qv"))
    assert list(tmp_path.iterdir()) == []


def test_answer_loss_counts_only_answer_tokens():
    m = tiny_llama()
    rows, masks = [[5, 6, 7, 8, 9], [10, 11, 12]], [[0, 0, 0, 1, 1], [0, 1, 1]]
    batch = left_pad(rows, 0, masks)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]]
    assert batch["position_ids"][1].tolist() == [0, 0, 0, 1, 2]
    loss = answer_loss(m, batch)
    # reference: full logits, cross-entropy on the masked targets of each row separately
    nll = []
    for r, k in zip(rows, masks, strict=True):
        ids = torch.tensor([r])
        logp = torch.log_softmax(m(ids).logits[0, :-1].float(), -1)
        for t in range(1, len(r)):
            if k[t]:
                nll.append(-logp[t - 1, r[t]])
    assert torch.allclose(loss, torch.stack(nll).mean(), atol=1e-5)


def test_train_takes_prebuilt_batches_and_needs_a_loss_fn():
    m = tiny_llama()
    apply_lora(m, rank=2)
    batch = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0, [[0, 0, 0, 1, 1], [0, 1, 1]])
    res = train(m, None, steps=5, lr=1e-2, loss_fn=answer_loss, batches=[batch] * 5)
    assert res.losses[-1] < res.losses[0]
    with pytest.raises(TrainError, match="loss_fn"):
        train(m, None, steps=1, batches=[batch])
    with pytest.raises(TrainError, match="one per step"):
        train(m, None, steps=2, loss_fn=answer_loss, batches=[batch])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_step(method):
    from edgellm.lora.apply import prepare

    batch = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0, [[0, 0, 0, 1, 1], [0, 1, 1]])
    losses = []
    for gc in (False, True):
        m, _ = prepare(tiny_llama(), method=method, rank=2, alpha=None, targets="all",
                       dropout=0.0, rslora=False, seed=0, grad_checkpointing=gc)
        losses.append(train(m, None, steps=2, lr=1e-2, loss_fn=answer_loss,
                            batches=[batch] * 2).losses)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
