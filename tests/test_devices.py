"""Beyond one laptop: ``--device`` and ``EDGELLM_DEVICE`` reach the model, every batch follows
the model to its device, and a device this machine lacks is one clear line before any load.

The suite runs on the CPU.  The plumbing is checked with PyTorch's ``meta`` device (shapes, no
data): a model moved there only accepts inputs that were moved there too, and a spy on its
forward pass records where each batch arrived.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from conftest import random_ids
from test_cli_errors import _argv, run_main_without_model, subcommands

from edgellm.cli import build_parser
from edgellm.devices import (
    DeviceError,
    check_cpu_only,
    check_device,
    default_device,
    model_device,
    to_device,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = torch.backends.mps.is_available()


# --------------------------------------------------------------------------------------------
# the names


def test_check_device_accepts_the_cpu_and_meta():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(None) == torch.device("cpu")
    assert check_device("meta") == torch.device("meta")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda0", "CPU", ""])
def test_unknown_device_is_a_clear_error(name):
    with pytest.raises(DeviceError, match="unknown device; use one of cpu, cuda, mps"):
        check_device(name)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(DeviceError, match=rf"--device {name}: this machine has no CUDA GPU"):
        check_device(name)


@pytest.mark.skipif(HAS_MPS, reason="this machine has Apple's Metal GPU")
def test_mps_without_metal_is_a_clear_error():
    with pytest.raises(DeviceError, match="--device mps: Apple's Metal GPU is not available"):
        check_device("mps")


def test_edgellm_device_is_read_in_one_place(monkeypatch):
    monkeypatch.delenv("EDGELLM_DEVICE", raising=False)
    assert default_device() == "cpu"
    monkeypatch.setenv("EDGELLM_DEVICE", "meta")
    assert default_device() == "meta"
    monkeypatch.setenv("EDGELLM_DEVICE", "gpu")
    with pytest.raises(DeviceError, match="EDGELLM_DEVICE=gpu: unknown device"):
        default_device()
    # the only reader of the variable in the package
    read = re.compile(r"(environ\.get\(|environ\[|getenv\()\s*(ENV|[\"']EDGELLM_DEVICE)")
    readers = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "edgellm").rglob("*.py")
               if read.search(p.read_text())]
    assert readers == ["src/edgellm/devices.py"], readers


def test_cpu_only_paths_refuse_another_device():
    check_cpu_only(None, "llama.cpp")
    check_cpu_only("cpu", "llama.cpp")
    with pytest.raises(DeviceError, match="--device cuda: llama.cpp runs on the CPU only"):
        check_cpu_only("cuda", "llama.cpp")
    with pytest.raises(DeviceError, match="runs on the CPU only"):
        check_cpu_only("meta", "llama.cpp")


def test_to_device_moves_tensors_in_containers_and_leaves_the_rest():
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "n": 3,
             "parts": [torch.ones(1), "text"]}
    moved = to_device(batch, "meta")
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].shape == (2, 3)
    assert moved["parts"][0].device.type == "meta" and moved["parts"][1] == "text"
    assert moved["n"] == 3
    x = torch.zeros(2)
    assert to_device(x, "cpu") is x  # already there: no copy


def test_model_device(tiny):
    assert model_device(tiny) == torch.device("cpu")
    assert model_device(tiny.to("meta")) == torch.device("meta")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters


# --------------------------------------------------------------------------------------------
# every batch follows the model: a spy on the forward pass of a model on the meta device


class Arrived(Exception):
    """Raised by the spy once a batch reached the model: nothing after the forward can run on
    the meta device (it holds no numbers), and nothing after it is under test here."""


def spy_on(module) -> list[torch.device]:
    """Record the device of each forward's first tensor input, then stop the run."""
    seen = []

    def pre(mod, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("hidden_states", args[0] if args else None))
        seen.append(x.device)
        raise Arrived

    module.register_forward_pre_hook(pre, with_kwargs=True)
    return seen


def test_evaluation_moves_its_windows_to_the_models_device(tiny):
    from edgellm.metrics import token_logprobs

    model = tiny.to("meta")
    seen = spy_on(model)
    with pytest.raises(Arrived):
        token_logprobs(model, random_ids(1, 64).flatten(), "gptq", ctx=16, progress=False)
    assert seen == [torch.device("meta")]


def test_the_reference_gets_the_windows_on_its_own_device(tiny):
    from edgellm.metrics import token_logprobs
    from edgellm.models import tiny_llama

    reference = tiny_llama().to("meta")
    seen = spy_on(reference)
    with pytest.raises(Arrived):  # model on the CPU, reference elsewhere
        token_logprobs(tiny, random_ids(1, 64).flatten(), "gptq", ctx=16, progress=False,
                       reference=reference)
    assert seen == [torch.device("meta")]


def test_training_moves_its_batches_to_the_models_device(tiny):
    from edgellm.train import train

    model = tiny.to("meta")
    seen = spy_on(model)
    with pytest.raises(Arrived):
        train(model, random_ids(1, 200).flatten(), steps=2, batch_size=2, seq_len=16)
    assert seen == [torch.device("meta")]


def test_training_moves_dict_batches_too(tiny):
    from edgellm.train import train

    model = tiny.to("meta")
    seen = spy_on(model)
    batch = {"input_ids": random_ids(2, 16)}

    def loss_fn(m, b):
        return m(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss

    with pytest.raises(Arrived):
        train(model, None, steps=1, batches=[batch], loss_fn=loss_fn)
    assert seen == [torch.device("meta")]


def test_calibration_stream_starts_on_the_models_device(tiny):
    from edgellm.calib import LayerStream

    model = tiny.to("meta")
    stream = LayerStream(model, random_ids(2, 16))
    assert stream.hidden.device.type == "meta" and stream.hidden.shape == (2, 16, 64)
    assert stream.position_ids.device.type == "meta"


def test_timed_forward_passes_feed_the_models_device(tiny):
    from edgellm.measure import paired_prefill

    model = tiny.to("meta")
    seen = spy_on(model)
    with pytest.raises(Arrived):
        paired_prefill(model, model, random_ids(1, 64).flatten(), seq_len=16)
    assert seen == [torch.device("meta")]


# --------------------------------------------------------------------------------------------
# load_model: a tiny saved model, on the CPU, and spread by accelerate


@pytest.fixture()
def tiny_folder(tmp_path, tiny) -> Path:
    """A saved tiny Llama with a word-level tokenizer of its 256 ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "tiny"
    tiny.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(256)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")))
    tok.save_pretrained(folder)
    return folder


def test_load_model_on_the_cpu_and_evaluate(tiny_folder, tiny, monkeypatch):
    from edgellm.metrics import perplexity
    from edgellm.models import load_model

    monkeypatch.delenv("EDGELLM_DEVICE", raising=False)
    model, _ = load_model(str(tiny_folder), device="cpu", quiet=True)
    assert model_device(model) == torch.device("cpu")
    tokens = random_ids(1, 64).flatten()
    ours = perplexity(model, tokens, "gptq", ctx=16, progress=False)
    ref = perplexity(tiny, tokens, "gptq", ctx=16, progress=False)
    assert ours["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    assert ours["n_tokens"] == 4 * 15


def test_load_model_follows_edgellm_device(tiny_folder, monkeypatch):
    from edgellm.models import load_model

    monkeypatch.setenv("EDGELLM_DEVICE", "meta")
    model, _ = load_model(str(tiny_folder), quiet=True)
    assert model_device(model).type == "meta"
    monkeypatch.setenv("EDGELLM_DEVICE", "gpu")
    with pytest.raises(DeviceError, match="EDGELLM_DEVICE=gpu"):
        load_model(str(tiny_folder), quiet=True)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")
def test_load_model_refuses_cuda_before_reading_weights(monkeypatch):
    from edgellm import models

    def no_load(*a, **k):
        raise AssertionError("weights were read before the device was checked")

    monkeypatch.setattr(models, "_load_folder", no_load)
    monkeypatch.setattr(models, "ensure_cached", no_load)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        models.load_model(device="cuda")


def test_a_model_larger_than_memory_is_offloaded_and_still_evaluates(tiny_folder, tiny,
                                                                      tmp_path, monkeypatch):
    """``device_map="auto"`` with less memory than the weights (a 100 kB cap for a 0.6 MB
    model): accelerate keeps them on disk, and the same evaluation gives the same numbers."""
    from edgellm.metrics import perplexity
    from edgellm.models import load_model

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(str(tiny_folder), device_map="auto", quiet=True,
                          max_memory={"cpu": 100_000})
    assert model.hf_device_map == {"": "disk"}
    assert next(model.parameters()).device.type == "meta"  # the weights are not in memory
    assert model_device(model) == torch.device("cpu")      # accelerate's hooks move inputs
    tokens = random_ids(1, 48).flatten()
    ours = perplexity(model, tokens, "gptq", ctx=16, progress=False)
    ref = perplexity(tiny, tokens, "gptq", ctx=16, progress=False)
    assert ours["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)


def test_device_map_auto_fits_a_small_model_in_memory(tiny_folder, tmp_path, monkeypatch):
    from edgellm.models import load_model

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(str(tiny_folder), device_map="auto", quiet=True)
    assert next(model.parameters()).device.type == ("cuda" if HAS_CUDA else "cpu")


def test_device_map_without_accelerate_names_the_install(tiny_folder, monkeypatch):
    import builtins

    from edgellm.models import ModelUnavailable, load_model

    real_import = builtins.__import__

    def no_accelerate(name, *a, **k):
        if name == "accelerate":
            raise ImportError("No module named 'accelerate'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_accelerate)
    with pytest.raises(ModelUnavailable, match="pip install accelerate"):
        load_model(str(tiny_folder), device_map="auto", quiet=True)


# --------------------------------------------------------------------------------------------
# the command line: --device on every subcommand that loads a model, checked before the load

# a subcommand's required flags, so that parsing succeeds and the device check is what fails
REQUIRED = {"export": ["--out", "{tmp}/m.gguf"], "serve": ["--model", "{tmp}/gguf-head.gguf"],
            "loadtest": ["--model", "{tmp}/gguf-head.gguf"], "kl": ["--model", "smollm2-135m"],
            "bench-runtime": ["--runtime", "torch"], "lowrank": ["--ratio", "0.2"]}
NO_MODEL_LOAD = {"fetch"}  # downloads and caches only


def _leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                out.update(_leaf_parsers(sub, path) or {path: sub})
    return out


LEAVES = _leaf_parsers(build_parser())
WITH_DEVICE = sorted(n for n, p in LEAVES.items() if "--device" in p._option_string_actions)


def test_every_subcommand_that_loads_a_model_takes_device():
    assert set(LEAVES) == set(subcommands(build_parser()))  # the same walk as test_cli_errors
    loads = {n for n, p in LEAVES.items()
             if {"--model", "--target"} & set(p._option_string_actions)} - NO_MODEL_LOAD
    assert {"ppl", "kl", "quantize", "prune", "distill", "lowrank", "finetune"} <= loads
    missing = sorted(loads - set(WITH_DEVICE))
    assert missing == [], (f"{missing} load a model but take no --device: use add_model_arg or "
                           "add_device_arg of edgellm.cli.common")


def _run_main(argv, monkeypatch, capsys, tmp_path) -> tuple[int, str]:
    return run_main_without_model(argv, monkeypatch, capsys, tmp_path)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name", WITH_DEVICE)
def test_device_cuda_without_a_gpu_is_one_line_exit_2(name, tmp_path, monkeypatch, capsys):
    argv = _argv(name, [*REQUIRED.get(name, []), "--device", "cuda"], tmp_path)
    code, err = _run_main(argv, monkeypatch, capsys, tmp_path)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(rf"edgellm {name.split()[0]}: error: --device cuda: ", lines[0]), err
    assert "no CUDA GPU" in err or "runs on the CPU only" in err, err


@pytest.mark.parametrize("name", WITH_DEVICE)
def test_unknown_device_is_refused_by_the_parser(name, tmp_path, monkeypatch, capsys):
    argv = _argv(name, [*REQUIRED.get(name, []), "--device", "tpu"], tmp_path)
    code, err = _run_main(argv, monkeypatch, capsys, tmp_path)
    assert code == 2 and "invalid choice: 'tpu'" in err, err


@pytest.mark.parametrize("argv,what", [
    (["ppl", "--runtime", "llamacpp", "--model", "m.gguf", "--device", "meta"], "--runtime llamacpp"),
    (["quantize", "--method", "gguf", "--device", "meta"], "--method gguf"),
    (["finetune", "--method", "qlora", "--device", "meta"], "--method qlora"),
    (["eval-task", "--runtime", "llamacpp", "--adapter", "a", "--device", "meta"],
     "--runtime llamacpp"),
])
def test_cpu_only_paths_of_gpu_commands_say_so(argv, what, tmp_path, monkeypatch, capsys):
    """A command that scales has CPU-only options; those refuse another device (``meta`` stands
    for a GPU here: it passes the availability check, so the option's own check speaks)."""
    parser = build_parser()
    for action in parser._actions:  # let the parser accept meta for this test
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                dev = sub._option_string_actions.get("--device")
                if dev is not None:
                    dev.choices = (*dev.choices, "meta")
    monkeypatch.setattr("edgellm.cli.build_parser", lambda: parser)
    code, err = _run_main(argv, monkeypatch, capsys, tmp_path)
    assert code == 2, err
    assert f"{what}" in err and "runs on the CPU only" in err, err


@pytest.mark.parametrize("argv", [
    ["ppl", "--device-map", "auto", "--device", "cpu"],
    ["kl", "--model", "smollm2-135m", "--device-map", "auto", "--runtime", "llamacpp"],
])
def test_device_map_excludes_device_and_runtime(argv, tmp_path, monkeypatch, capsys):
    code, err = _run_main(argv, monkeypatch, capsys, tmp_path)
    assert code == 2 and "--device-map auto places a PyTorch model itself" in err, err


def test_device_defaults_to_none_so_edgellm_device_decides():
    args = build_parser().parse_args(["ppl"])
    assert args.device is None and args.cpu_only is None
    args = build_parser().parse_args(["export", "--out", "m.gguf"])
    assert args.device is None and "export" in args.cpu_only


# --------------------------------------------------------------------------------------------
# the README's GPU track: every command parses (the docs cannot rot)


def gpu_track_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    if "\n## GPU track" not in text:
        return []  # test_the_gpu_track_lists_commands fails
    section = text.split("\n## GPU track", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # leading VAR=value assignments
            if line.startswith("edgellm "):
                cmds.append(line)
    return cmds


def test_the_gpu_track_lists_commands():
    cmds = gpu_track_commands()
    assert len(cmds) >= 6, cmds
    assert all("--device cuda" in c or "--device-map auto" in c for c in cmds), cmds


@pytest.mark.parametrize("command", gpu_track_commands())
def test_every_gpu_track_command_parses(command):
    import shlex

    argv = shlex.split(command)[1:]
    args = build_parser().parse_args(argv)  # SystemExit on an unknown flag or choice
    assert callable(args.func)
