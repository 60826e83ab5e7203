"""``edgellm finetune`` / ``eval-task``: bad input that needs more than a flag (no bitsandbytes, an
adapter for another base, an impossible rank read from the model's config), QLoRA and the peft
variants on the tiny model, and one end-to-end run on the default model."""

import json
import sys

import pytest
import torch

from edgellm import tiny_llama
from edgellm.cli import main
from edgellm.lora.apply import apply_peft, apply_qlora, peft_config, save_adapter, trainable_params
from edgellm.lora.chat import answer_loss, left_pad
from edgellm.train import train

BATCH = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0, [[0, 0, 0, 1, 1], [0, 1, 1]])


def _no_model(monkeypatch):
    from edgellm import models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the bad input was rejected")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(models, "ensure_cached", no_load)


@pytest.mark.fast
def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch, capsys):
    _no_model(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)      # import bitsandbytes fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    assert main(["finetune", "--method", "qlora"]) == 2
    err = capsys.readouterr().err
    assert "bitsandbytes" in err and "--method lora" in err, err


@pytest.mark.fast
def test_eval_task_refuses_an_adapter_for_another_base(tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    m = tiny_llama()
    from edgellm.lora.apply import apply_lora

    apply_lora(m, rank=2, targets="qv")
    save_adapter(m, tmp_path / "ad", config=peft_config(rank=2, targets="qv"))
    assert main(["eval-task", "--adapter", str(tmp_path / "ad")]) == 2
    err = capsys.readouterr().err
    assert "tiny-llama" in err and "--model" in err, err


@pytest.mark.fast
@pytest.mark.parametrize("method", ["dora", "pissa"])
def test_peft_variants_train_on_the_tiny_model(method):
    m = apply_peft(tiny_llama(), method=method, rank=4)
    res = train(m, None, steps=3, lr=1e-2, loss_fn=answer_loss, batches=[BATCH] * 3)
    assert res.losses[-1] < res.losses[0]
    assert trainable_params(m) >= 2 * 7 * 4 * 64  # A and B of 7 linears in 2 layers at least


def test_qlora_trains_adapters_on_an_nf4_base(tmp_path):
    import bitsandbytes as bnb

    m = apply_qlora(tiny_llama(), rank=4)
    q = m.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.nested   # double quant
    res = train(m, None, steps=3, lr=1e-2, loss_fn=answer_loss, batches=[BATCH] * 3)
    assert res.losses[-1] < res.losses[0]
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    out = save_adapter(m, tmp_path / "ad")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.integration  # reads the cached model's config.json (no weights are loaded)
def test_impossible_rank_fails_before_the_model_load(monkeypatch, capsys):
    _no_model(monkeypatch)
    assert main(["finetune", "--rank", "999", "--targets", "qv"]) == 2
    assert "999" in capsys.readouterr().err


@pytest.mark.integration
def test_finetune_then_eval_task_on_the_default_model(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "ad"
    assert main(["finetune", "--rank", "2", "--targets", "qv", "--steps", "2", "--batch-size",
                 "2", "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["method"] == "lora" and rec["trainable_params"] > 0
    assert rec["speed_protocol"]["train_tokens_per_s"]["name"] == "train"
    assert rec["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert main(["eval-task", "--adapter", str(out), "--max-examples", "4", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n_test"] == 4 and 0 <= ev["accuracy"] <= 1 and ev["prompt_style"] == "plain"
    from edgellm.cli import run_record
    from edgellm.cli.common import UsageError

    with pytest.raises(UsageError, match="not empty"):
        run_record(["finetune", "--out", str(out)])


@pytest.mark.fast
def test_a_pissa_adapter_loads_on_the_original_base(tmp_path):
    from edgellm.lora.apply import keep_initial_adapter, load_adapter

    m = apply_peft(tiny_llama(), method="pissa", rank=4)
    keep_initial_adapter(m)
    train(m, None, steps=3, lr=1e-2, loss_fn=answer_loss, batches=[BATCH] * 3)
    out = save_adapter(m, tmp_path / "ad")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8   # 2r on W itself
    ids = BATCH["input_ids"]
    with torch.no_grad():
        want = m(input_ids=ids).logits
        got = load_adapter(tiny_llama(), out)(ids).logits
    assert (got - want).abs().max() <= 1e-4

def test_step_times_compare_forward_lora_and_qlora_on_copies():
    from edgellm.lora.steps import step_times

    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = step_times(m, BATCH, rank=2, repeats=1)
    assert r["lora_over_forward"] == pytest.approx(r["seconds_lora_step"] / r["seconds_forward"])
    assert r["qlora_over_lora"] == pytest.approx(r["seconds_qlora_step"] / r["seconds_lora_step"])
    assert r["step_time_batch"] == [2, 5]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # model untouched
