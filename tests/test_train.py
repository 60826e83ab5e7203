"""The training loop: the loss goes down on the tiny model, clipping and schedules are applied,
pruning recovery keeps its zeros and is the same loop (same numbers), checkpoints are whole."""

import copy

import pytest
import torch

from edgellm import tiny_llama
from edgellm.train import (
    TrainError,
    lm_loss,
    load_checkpoint,
    lr_factor,
    train,
    train_windows,
)

TOKENS = torch.arange(2000) % 17 + 3  # a learnable periodic sequence


def _trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(not ("embed" in name or "lm_head" in name))
    return model


def test_loss_decreases_on_tiny_model():
    m = _trainable(tiny_llama())
    res = train(m, TOKENS, steps=15, batch_size=2, seq_len=32, lr=3e-3)
    assert res.steps == 15 and len(res.losses) == 15
    assert res.losses[-1] < 0.8 * res.losses[0]
    assert res.trainable_params == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert not m.training  # left in eval mode


def test_same_seed_same_numbers_and_windows():
    a = train(_trainable(tiny_llama()), TOKENS, steps=4, batch_size=2, seq_len=16, lr=1e-3)
    b = train(_trainable(tiny_llama()), TOKENS, steps=4, batch_size=2, seq_len=16, lr=1e-3)
    assert a.losses == b.losses
    assert torch.equal(train_windows(TOKENS, 6, 16, seed=1), train_windows(TOKENS, 6, 16, seed=1))
    assert not torch.equal(train_windows(TOKENS, 6, 16, seed=1),
                           train_windows(TOKENS, 6, 16, seed=2))


def test_gradient_clipping_is_applied():
    m = _trainable(tiny_llama())
    norms = []

    def after_step(model):  # the gradients the optimizer used, after clipping
        g = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([x.norm() for x in g])).item())

    res = train(m, TOKENS, steps=3, batch_size=2, seq_len=16, lr=1e-3, max_grad_norm=1e-2,
                after_step=after_step)
    assert len(res.grad_norms) == 3 and all(n > 1e-2 for n in res.grad_norms)  # were larger
    assert all(n <= 1e-2 * (1 + 1e-4) for n in norms)  # clipped to the limit
    # without a limit, nothing is clipped or recorded
    norms.clear()
    res = train(_trainable(tiny_llama()), TOKENS, steps=3, batch_size=2, seq_len=16, lr=1e-3,
                after_step=after_step)
    assert res.grad_norms == [] and max(norms) > 1e-2


def test_schedules_and_warmup():
    assert [lr_factor(s, 4) for s in range(4)] == [1.0] * 4
    assert [lr_factor(s, 4, schedule="linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(0, 10, schedule="cosine") == 1.0
    assert lr_factor(5, 10, schedule="cosine") == pytest.approx(0.5)
    assert [lr_factor(s, 10, warmup_steps=2) for s in range(3)] == [0.5, 1.0, 1.0]
    res = train(_trainable(tiny_llama()), TOKENS, steps=4, batch_size=1, seq_len=16, lr=1e-3,
                schedule="linear", warmup_steps=1)
    assert res.lrs == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])


def test_custom_loss_fn_and_loss_mask():
    seen = []

    def loss_fn(model, batch):  # e.g. distillation: any differentiable scalar
        seen.append(batch.shape)
        return lm_loss(model, batch)

    m = _trainable(tiny_llama())
    train(m, TOKENS, steps=2, batch_size=3, seq_len=8, lr=1e-3, loss_fn=loss_fn)
    assert seen == [torch.Size([3, 8])] * 2
    # masking the targets: only the second half of each window counts
    m = tiny_llama()
    batch = TOKENS[:16].reshape(2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 4:] = True
    with torch.no_grad():
        full, half = lm_loss(m, batch), lm_loss(m, batch, mask=mask)
        logits = m(input_ids=batch).logits[:, 3:-1]  # predictions of tokens 4..7
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch[:, 4:].reshape(-1))
    assert torch.isclose(half, want, rtol=1e-5) and not torch.isclose(half, full)
    train(_trainable(tiny_llama()), TOKENS, steps=1, batch_size=1, seq_len=8, lr=1e-3,
          loss_mask=lambda b: torch.ones_like(b, dtype=torch.bool))


def test_checkpoint_written_whole(tmp_path):
    m = _trainable(tiny_llama())
    res = train(m, TOKENS, steps=4, batch_size=1, seq_len=16, lr=1e-3, checkpoint_dir=tmp_path,
                checkpoint_every=2)
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 4 and ck["losses"] == res.losses
    assert [p.name for p in tmp_path.iterdir()] == ["trainer.pt"]  # no temporary file left
    state = dict(m.named_parameters())
    for name, t in ck["model"].items():
        assert torch.equal(t, state[name])
    assert not any("embed" in n for n in ck["model"])  # frozen weights are not saved


def test_bad_settings():
    m = _trainable(tiny_llama())
    with pytest.raises(TrainError, match="steps=-1"):
        train(m, TOKENS, steps=-1)
    with pytest.raises(TrainError, match="schedule"):
        train(m, TOKENS, steps=1, schedule="step")
    with pytest.raises(TrainError, match="max_grad_norm"):
        train(m, TOKENS, steps=1, max_grad_norm=0)
    with pytest.raises(TrainError, match="too few"):
        train(m, TOKENS[:10], steps=1, seq_len=16)
    with pytest.raises(TrainError, match="loss_mask"):
        train(m, TOKENS, steps=1, loss_fn=lm_loss, loss_mask=lambda b: b > 0)
    with pytest.raises(TrainError, match="no trainable"):
        train(tiny_llama().requires_grad_(False), TOKENS, steps=1, seq_len=16)


def _reference_finetune(model, tokens, masks, *, steps, batch_size, seq_len, lr, seed=0):
    """The pruning-recovery loop as it was written before :mod:`edgellm.train` existed."""
    from edgellm.prune.layers import prunable_linears

    torch.manual_seed(seed)
    data = train_windows(tokens, steps * batch_size, seq_len, seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not ("embed" in name or "lm_head" in name))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lins = prunable_linears(model)
    losses = []
    model.train()
    for step in range(steps):
        ids = data[step * batch_size:(step + 1) * batch_size]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, lin in lins.items():
                lin.weight.mul_(masks[n])
        losses.append(loss.item())
    model.eval()
    return losses


def test_prune_recovery_keeps_masks_and_same_numbers():
    from edgellm.prune import apply_magnitude, prunable_linears
    from edgellm.prune.recover import finetune, zero_masks

    m = tiny_llama()
    apply_magnitude(m, sparsity=0.5)
    ref = copy.deepcopy(m)
    masks = zero_masks(m)
    res = finetune(m, TOKENS, steps=6, batch_size=2, seq_len=32, lr=3e-3, masks=masks)
    for n, lin in prunable_linears(m).items():
        assert (lin.weight[~masks[n]] == 0).all()  # the masks stayed zero through training
    assert res.losses[-1] < res.losses[0]
    want = _reference_finetune(ref, TOKENS, masks, steps=6, batch_size=2, seq_len=32, lr=3e-3)
    assert res.losses == want  # same seed, batches, optimizer: the very same numbers
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not any(p.requires_grad for p in m.parameters())  # frozen again afterwards


def test_training_leaves_no_gradients_behind():
    # the model is evaluated next: the last step's gradients (a model's worth of memory) go
    m = _trainable(tiny_llama())
    train(m, TOKENS, steps=2, batch_size=2, seq_len=16, lr=1e-3)
    assert all(p.grad is None for p in m.parameters())
