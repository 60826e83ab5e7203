"""Pruning on the real default model (a few layers, small calibration), recovery, and the CLI."""

import copy
import json
import math

import pytest
import torch

from edgellm.calib import LayerStream, collect_inputs, layer_linears
from edgellm.prune import apply_structured, input_norms, magnitude_prune, sparsegpt_prune
from edgellm.prune.masks import PruneError, sparsity_of

# tiny-model tests here run in the fast tier; those on the default model are marked


@pytest.mark.integration
def test_sparsegpt_reconstruction_beats_magnitude_on_real_layers(default_model):
    from edgellm.prune import wanda_prune

    model, tok = default_model
    from edgellm import get_calibration

    calib = get_calibration("pydoc", 4, 128, seed=0, tokenizer=tok)
    stream = LayerStream(model, calib)
    for index in range(2):  # the first two decoder layers
        layer = stream.layers[index]
        lins = layer_linears(model, index)
        stats = collect_inputs(layer, lins, stream, xtx=True, keep=4)
        for name in (f"model.layers.{index}.self_attn.q_proj", f"model.layers.{index}.mlp.down_proj"):
            W, st = lins[name].weight, stats[name]
            X = st.X.reshape(-1, W.shape[1])  # (tokens, in) the layer's real inputs

            def err(Wp, W=W, X=X):
                return (X @ (W - Wp).T).square().mean().item()

            for nm in (None, (2, 4)):
                Ws, _ = sparsegpt_prune(W, st.H, 0.5, nm)
                Ww, _ = wanda_prune(W, input_norms(X), 0.5, nm)
                Wm, _ = magnitude_prune(W, 0.5, nm)
                assert sparsity_of(Ws) == pytest.approx(0.5, abs=1e-3)
                assert err(Ws) < err(Wm), (name, nm)
                assert err(Ww) < err(Wm), (name, nm)
        stream.advance(layer)


@pytest.mark.integration
def test_real_model_drop_layers_save_reload_generate(default_model, tmp_path):
    from edgellm import get_calibration, load_model
    from edgellm.models import generate, n_params

    model, tok = default_model
    m = copy.deepcopy(model)
    calib = get_calibration("pydoc", 2, 64, seed=0, tokenizer=tok)
    info = apply_structured(m, calib, kind="layers", ratio=0.1)  # 3 of 30 layers
    assert info["num_hidden_layers"] == 27 and len(info["dropped"]) == 3
    assert n_params(m) < n_params(model)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    r, rtok = load_model(str(tmp_path), quiet=True)
    ids = calib[:1, :32]
    with torch.no_grad():
        assert torch.equal(m(ids).logits, r(ids).logits)
    text = generate(r, rtok, "What is a Python list?", max_new_tokens=12)
    assert isinstance(text, str) and len(text.strip()) > 0
    prompt = ids[:, :16]
    assert torch.equal(r.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True),
                       r.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_recovery_keeps_zeros_and_lowers_loss(tmp_path):
    from edgellm import tiny_llama
    from edgellm.prune import apply_magnitude, prunable_linears
    from edgellm.prune.recover import finetune, zero_masks

    m = tiny_llama()
    apply_magnitude(m, sparsity=0.5)
    masks = zero_masks(m)
    tokens = torch.arange(2000) % 17 + 3  # a learnable periodic sequence
    ft = finetune(m, tokens, steps=15, batch_size=2, seq_len=32, lr=3e-3, masks=masks)
    assert ft.losses[-1] < ft.losses[0]
    for n, lin in prunable_linears(m).items():
        assert (lin.weight[~masks[n]] == 0).all()  # the pruned weights stayed pruned
        assert (lin.weight != 0).sum() > 0
    m2 = tiny_llama()
    apply_structured(m2, None, kind="channels", ratio=0.5)
    ft2 = finetune(m2, tokens, steps=10, batch_size=2, seq_len=32, lr=3e-3, lora=True)
    assert ft2.losses[-1] < ft2.losses[0]
    assert not any("lora" in n for n, _ in m2.named_parameters())  # merged and unloaded
    from transformers import AutoModelForCausalLM

    m2.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens[:24].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids).logits, r(input_ids=ids).logits)


def test_cli_prune_bad_input(capsys):
    from edgellm.cli import main

    assert main(["prune", "--method", "magnitude", "--sparsity", "1.0", "--json"]) == 2
    assert "sparsity=1.0 is outside [0, 1)" in capsys.readouterr().err
    assert main(["prune", "--structured", "layers", "--ratio", "1.0", "--json"]) == 2
    assert "ratio=1.0 is outside [0, 1)" in capsys.readouterr().err
    assert main(["prune", "--calib", "nonesuch", "--json"]) == 2  # before loading the model
    assert "unknown corpus 'nonesuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--nm", "4:4"])
    with pytest.raises(PruneError):
        from edgellm.prune.apply import prune_model

        prune_model(None, method="obs")


@pytest.mark.integration
def test_cli_prune_json_keys(capsys, monkeypatch):
    from edgellm import measure
    from edgellm.cli import main

    # the paired speed measurement is what prefill_tokens_per_s reports, even after --eval
    paired = measure.protocol("paired-prefill", batch=1, seq_len=256)
    monkeypatch.setattr(measure, "paired_prefill", lambda *a, **k: {
        "prefill_tokens_per_s": 123.0, "prefill_tokens_per_s_base": 100.0, "speedup": 1.2,
        "speed_protocol": dict.fromkeys(("prefill_tokens_per_s", "prefill_tokens_per_s_base",
                                         "speedup"), paired)})
    # weights-only channel scores: no calibration pass, so this stays cheap
    assert main(["prune", "--method", "magnitude", "--structured", "channels", "--ratio", "0.1",
                 "--eval", "--ctx", "32", "--max-tokens", "64", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    for key in ("method", "sparsity", "ppl", "ppl_base", "kl_mean", "n_params", "size_bytes",
                "prefill_tokens_per_s", "eval_tokens_per_s"):
        assert key in rec
    assert rec["prefill_tokens_per_s"] == 123.0 and rec["prefill_tokens_per_s_base"] == 100.0
    assert rec["speed_protocol"]["speedup"]["name"] == "paired-prefill"
    assert rec["speed_protocol"]["eval_tokens_per_s"]["name"] == "eval-loop"
    measure.check_speed_keys(rec)
    assert rec["ppl"] > rec["ppl_base"] > 1
    assert rec["intermediate_size"] == 1376 and rec["structured"] == "channels"
    assert rec["n_params"] < rec["n_params_base"] and rec["size_bytes"] < rec["size_bytes_base"]
    assert rec["sparsity"] < 1e-3  # nothing zeroed: the matrices are smaller instead


@pytest.mark.integration
def test_cli_recovery_keeps_the_default_sparsity(capsys, monkeypatch):
    """Without --sparsity/--nm, prune_model applies 50 %; recovery must keep those zeros too."""
    from edgellm import measure
    from edgellm.cli import main

    monkeypatch.setattr(measure, "paired_prefill", lambda *a, **k: {})  # not what this checks
    assert main(["prune", "--method", "magnitude", "--recover-steps", "2", "--recover-batch", "1",
                 "--recover-seq-len", "32", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rec["sparsity_after_recovery"] == pytest.approx(rec["sparsity"], abs=1e-6)


@pytest.mark.integration
def test_cli_baseline_calib_pairs_two_masks_on_the_same_tokens(capsys, monkeypatch):
    """--baseline-calib: the same calibration gives the same mask (difference exactly 0); another
    corpus gives another mask, and the paired difference is what the two ΔNLLs vs dense imply."""
    from edgellm import measure
    from edgellm.cli import main

    monkeypatch.setattr(measure, "paired_prefill", lambda *a, **k: {})  # not what this checks
    common = ["prune", "--method", "wanda", "--sparsity", "0.5", "--n-samples", "2",
              "--seq-len", "64", "--eval", "--ctx", "64", "--max-tokens", "256", "--json"]
    assert main(common + ["--baseline-calib", "pydoc"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["delta_nll_vs_baseline"] == 0 and same["ppl_baseline"] == pytest.approx(same["ppl"])
    assert main(common + ["--calib", "stdlib", "--baseline-calib", "pydoc"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["baseline_calib"] == "pydoc" and other["delta_nll_vs_baseline"] != 0
    # NLL(stdlib mask) − NLL(pydoc mask) = ΔNLL(stdlib mask vs dense) − ΔNLL(pydoc mask vs dense)
    assert other["delta_nll_vs_baseline"] == pytest.approx(
        other["delta_nll"] - same["delta_nll"], abs=1e-9)
    assert 0 < other["delta_nll_vs_baseline_stderr"] < math.hypot(
        other["delta_nll_stderr"], same["delta_nll_stderr"])
