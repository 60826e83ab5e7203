"""Low-rank factorization on the default model: the ranks a ratio gives on SmolLM2-135M, SVD-LLM's
lower layer output error on real activations, and the CLI record with its break-even warning."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EDGELLM = Path(sys.executable).parent / "edgellm"


@pytest.mark.integration
def test_ratio_ranks_and_svdllm_beats_svd_on_real_activations(default_model):
    from edgellm.calib import collect_inputs, sequential
    from edgellm.data import get_calibration
    from edgellm.lowrank.apply import factorize_model
    from edgellm.lowrank.layers import lowrank_modules

    model, tok = default_model
    ids = get_calibration("pydoc", 4, 256, 0, tokenizer=tok)
    held = get_calibration("pydoc", 4, 256, 1, tokenizer=tok)  # other windows
    errs = {}
    for method in ("svd", "svdllm"):
        m = copy.deepcopy(model)
        res = factorize_model(m, ids, method=method, ratio=0.2, layers=[0])
        roles = res.info()["ranks_by_role"]
        assert roles == {"q_proj": 230, "k_proj": 115, "v_proj": 115, "o_proj": 230,
                         "gate_proj": 335, "up_proj": 335, "down_proj": 335}
        lr = lowrank_modules(m)
        name = "model.layers.0.mlp.down_proj"
        W = model.get_submodule(name).weight
        seen = {}

        def grab(i, layer, stream):  # held-out inputs of layer 0's down_proj (original model)
            seen.update(collect_inputs(layer, {name: model.get_submodule(name)}, stream, keep=4))

        sequential(model, held, grab, layers=[0], progress=False)
        X = seen[name].X.reshape(-1, W.shape[1])
        with torch.no_grad():
            errs[method] = float((X @ (W - lr[name].dense_weight()).T).square().mean())
    assert errs["svdllm"] < 0.8 * errs["svd"]


@pytest.mark.integration
def test_cli_record_and_break_even_warning(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([str(EDGELLM), "lowrank", "--method", "svd", "--rank", "150",
                           "--out", str(out), "--json"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "break-even rank 144" in proc.stderr
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("method", "ratio", "rank", "n_params", "n_params_base", "bpw", "size_bytes",
                "prefill_tokens_per_s", "speed_protocol", "ppl", "ppl_base", "kl_mean"):
        assert key in rec
    assert rec["rank"] == 150 and rec["n_params"] < rec["n_params_base"]
    assert rec["rank_warnings"] and "144" in rec["rank_warnings"][0]
    from edgellm.measure import check_speed_keys

    check_speed_keys(rec)
    from edgellm.lowrank.layers import load_factorized

    model, tok, info = load_factorized(out)
    assert info["rank"] == 150 and tok is not None
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
