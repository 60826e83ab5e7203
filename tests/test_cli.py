"""The edgellm command as a user runs it: JSON keys, exit codes, error messages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EDGELLM = [str(Path(sys.executable).with_name("edgellm"))]


def run(*args, ok=True):
    proc = subprocess.run(EDGELLM + list(args), capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_info_json():
    rec = json.loads(run("info", "--json").stdout)
    assert rec["default_model"] == "smollm2-135m"
    assert {"torch", "transformers", "python"} <= set(rec["versions"])
    assert rec["threads"] >= 1 and "cache" in rec


@pytest.mark.integration
def test_ppl_json_has_the_public_keys():
    rec = json.loads(run("ppl", "--model", "smollm2-135m", "--data", "pydoc", "--protocol",
                         "llamacpp", "--ctx", "128", "--chunks", "2", "--json").stdout)
    for key in ("ppl", "nll", "n_tokens", "protocol", "ctx", "seconds", "model", "data",
                "ppl_stderr", "bits_per_byte", "eval_tokens_per_s", "versions", "seed", "command"):
        assert key in rec, key
    assert "tokens_per_s" not in rec and rec["speed_protocol"]["eval_tokens_per_s"]["name"] == \
        "eval-wall"
    assert rec["n_tokens"] == 2 * (128 - 1 - 64) and rec["protocol"] == "llamacpp"
    assert 2 < rec["ppl"] < 100
    assert rec["command"].startswith("edgellm ppl --model smollm2-135m")


@pytest.mark.integration
def test_kl_of_the_model_against_itself():
    rec = json.loads(run("kl", "--model", "smollm2-135m", "--reference", "smollm2-135m",
                         "--ctx", "64", "--chunks", "2", "--json").stdout)
    assert rec["kl_mean"] == pytest.approx(0, abs=1e-6) and rec["top1_agreement"] == 1.0
    assert rec["ppl"] == pytest.approx(rec["ppl_base"])


@pytest.mark.parametrize("args,message", [
    (["ppl", "--model", "nonesuch"], "unknown model name 'nonesuch'; registered names: smollm2-135m"),
    (["ppl", "--data", "nonesuch"], "unknown corpus 'nonesuch'; registered corpora: pydoc, stdlib, wikitext2"),
    pytest.param(["ppl", "--ctx", "100000"], "ctx=100000 exceeds the model's maximum of 8192 positions",
                 marks=pytest.mark.integration),  # reads the default model's config
    pytest.param(["ppl", "--max-tokens", "100", "--ctx", "512"],
                 "the text has 100 tokens; protocol 'gptq' with ctx=512 needs at least 512",
                 marks=pytest.mark.integration),  # tokenizes with the default model's tokenizer
    (["ppl", "--model", "HuggingFaceTB/SmolLM2-360M"], "offline default 'smollm2-135m'"),
])
def test_bad_input_exits_2_with_a_clear_message(args, message):
    proc = run(*args, ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_every_model_name_the_error_lists_passes_the_name_check():
    # the error message lists registry, control and derived names: each must be accepted
    from edgellm.cli.common import check_model_name
    from edgellm.models import CONTROLS, DERIVED, REGISTRY

    names = [*REGISTRY, *CONTROLS, *DERIVED]
    assert "smollm2-135m-degrid" in names and "smollm2-135m-draft" in names
    for name in names:
        check_model_name(name)


@pytest.mark.integration
def test_text_too_short_says_how_many_tokens(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    proc = run("ppl", "--data", str(short), "--protocol", "llamacpp", "--ctx", "64", ok=False)
    assert proc.returncode == 2 and "needs at least 128" in proc.stderr
