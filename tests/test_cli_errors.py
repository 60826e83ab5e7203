"""The newcomer path: every ``edgellm`` subcommand answers bad input with one message and exit
code 2 (never a traceback, before any model load), and ``make course`` / ``make test`` name a
missing system part in their first seconds."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
EDGELLM = Path(sys.executable).parent / "edgellm"
FAIL_FAST_S = 15.0

# one bad input (or more) per subcommand, keyed by its path in the parser ("course run").
# {tmp} is a fresh temporary folder: commands that would write get it, so a regression can never
# touch the checkout (an unchecked `exercises generate --src` once emptied exercises/)
BAD_INPUT: dict[str, list[list[str]]] = {
    "info": [["--nonesuch"]],
    "fetch": [["--model", "nonesuch"]],
    "ppl": [["--model", "nonesuch"], ["--data", "nonesuch"], ["--model", "/no/such.gguf"],
            ["--runtime", "llamacpp", "--model", "{tmp}/cut.gguf"],
            ["--model", "{tmp}"], ["--data", "{tmp}/binary.txt"], ["--ctx", "0"],
            ["--runtime", "llamacpp"], ["--runtime", "llamacpp", "--model", "/no/such.gguf"],
            ["--runtime", "llamacpp", "--model", "{tmp}/binary.txt"],
            ["--runtime", "onnxruntime", "--model", "{tmp}/junk.onnx"],
            ["--runtime", "onnxruntime", "--model", "{tmp}/junk.gguf"],
            ["--runtime", "executorch", "--model", "{tmp}/junk.pte"],
            ["--runtime", "executorch", "--model", "/no/such.pte"],
            ["--runtime", "onnxruntime", "--model", "{tmp}/graph.onnx", "--threads", "0"]],
    "qat": [["--bits", "5"], ["--bits", "1.5"], ["--bits", "4", "--group-size", "64"],
            ["--ramp", "200"], ["--bits", "1.58", "--out", "{tmp}/q"],
            ["--out", "{tmp}/binary.txt"], ["--lsq", "--bits", "4"], ["--curve-every", "-1"],
            ["--steps", "-1"], ["--lr", "0"], ["--data", "nonesuch"], ["--n-samples", "0"],
            ["--model", "nonesuch"], ["--time-steps", "-2"], ["--group-size", "0"],
            ["--init", "nonesuch"], ["--device", "cuda:99"]],
    "kl": [["--model", "/no/such.gguf"], ["--model", "smollm2-135m", "--reference", "nonesuch"],
           ["--runtime", "llamacpp", "--model", "smollm2-135m"]],
    "quantize": [["--method", "gguf", "--type", "Q9_9"], ["--data", "nonesuch"],
                 ["--gguf", "{tmp}/q.gguf", "--bits", "3", "--group-size", "32"],
                 ["--gguf", "{tmp}/q.gguf", "--group-size", "64"],
                 ["--gguf", "{tmp}/q.gguf", "--bits", "8", "--group-size", "32"],
                 ["--gguf", "{tmp}", "--group-size", "32"],
                 ["--gguf", "{tmp}/q.gguf", "--group-size", "32", "--a-bits", "8"],
                 ["--gguf", "{tmp}/q.gguf", "--group-size", "32", "--threads", "0"],
                 ["--gguf", "{tmp}/q.gguf", "--group-size", "32", "--eval", "--protocol",
                  "sliding"],
                 ["--out", "{tmp}/binary.txt/sub"], ["--method", "lwc", "--save-clips", "{tmp}"],
                 ["--lorc-rank", "-1"], ["--method", "llm_int8", "--lorc-rank", "4"],
                 ["--method", "awq", "--lorc-rank", "4"],
                 ["--lorc-rank", "4", "--out", "{tmp}/q"],
                 ["--keep-salient", "0"], ["--keep-salient", "0.9"],
                 ["--method", "gptq", "--keep-salient", "0.01"],
                 ["--keep-salient", "0.01", "--salient-by", "hessian"],
                 ["--act-order"], ["--method", "gptq", "--damp", "0"],
                 ["--method", "gptq", "--damp", "1.5"],
                 ["--method", "awq", "--group-params", "block_start"],
                 ["--method", "gptq", "--group-params", "nonesuch"],
                 ["--method", "gptq", "--act-order", "--bpw-budget", "4.5"]],
    "prune": [["--data", "nonesuch"], ["--sparsity", "1.5"], ["--out", "{tmp}/binary.txt"],
              ["--baseline-calib", "nonesuch"],
              ["--method", "magnitude", "--sparsity", "0.5", "--baseline-calib", "stdlib"],
              ["--method", "sparsegpt", "--allocate", "sensitivity"],
              ["--method", "wanda", "--nm", "2:4", "--allocate", "sensitivity"],
              ["--method", "wanda", "--sparsity", "0.5", "--allocate", "sensitivity",
               "--spread", "0.5"],
              ["--method", "wanda", "--allocate", "sensitivity", "--sensitivity-tokens", "8"]],
    "distill": [["--loss", "nonesuch"], ["--student", "nonesuch"], ["--ratio", "1.5"],
                ["--ratio", "0"], ["--temperature", "0"], ["--top-k", "-1"],
                ["--top-k", "64", "--loss", "rkl"], ["--out", "{tmp}"],
                ["--teacher-gguf", "{tmp}/binary.txt", "--loss", "seqkd"],
                ["--loss", "seqkd", "--teacher-url", "http://127.0.0.1:9/v1"],
                ["--save-as", "nonesuch"], ["--data", "nonesuch"]],
    "lowrank": [["--ratio", "1.5"], ["--rank", "0"],
                ["--ratio", "0.2", "--data", "nonesuch"],
                ["--rank", "8", "--allocate", "sensitivity"],
                ["--ratio", "0.2", "--allocate", "sensitivity", "--spread", "0.3"],
                ["--ratio", "0.2", "--allocate", "sensitivity", "--sensitivity-tokens", "8"]],
    "bnb": [["--model", "nonesuch"], ["--mode", "nonesuch"]],
    "torchao": [["--data", "nonesuch"]],
    "course run": [["--only", "nonesuch", "--out", "{tmp}/course"],
                   ["--out", "{tmp}/binary.txt"]],
    "exercises generate": [["--src", "/no/such", "--dst", "{tmp}/ex"],
                           ["--src", "{tmp}", "--dst", "{tmp}/ex"]],
    "exercises check-drift": [["--src", "/no/such", "--dst", "{tmp}/ex"]],
    "exercises grade": [["/no/such.ipynb"], ["{tmp}/binary.txt"], ["{tmp}/junk.ipynb"]],
    "exercises nbgrader": [["{tmp}/binary.txt/out"]],
    "finetune": [["--rank", "0"], ["--targets", "mlp"], ["--task", "{tmp}/binary.txt"],
                 ["--task", "nonesuch"], ["--out", "{tmp}"], ["--dropout", "1.5"],
                 ["--method", "full", "--out", "{tmp}/new"], ["--eval-llamacpp"],
                 ["--eval", "--eval-llamacpp", "--method", "dora"],
                 ["--eval", "--eval-llamacpp", "--threads", "0"], ["--eval", "--eval-merged"],
                 ["--method", "qlora", "--eval-merged"]],
    "eval-task": [["--task", "{tmp}/junk.ipynb"], ["--adapter", "{tmp}"],
                  ["--max-examples", "0"], ["--task", "{tmp}/prose.jsonl", "--decoding", "grammar"],
                  ["--runtime", "llamacpp"], ["--merge"],
                  ["--runtime", "llamacpp", "--adapter", "{tmp}", "--prompt", "fewshot"]],
    "export": [["--type", "Q9_X", "--out", "{tmp}/m.gguf"], ["--type", "IQ2_XS", "--out", "{tmp}/m.gguf"],
               ["--type", "Q8_0", "--calib", "pydoc", "--out", "{tmp}/m.gguf"],
               ["--type", "Q4_K_M", "--imatrix", "/no/such.gguf", "--out", "{tmp}/m.gguf"],
               ["--type", "Q4_K_M", "--calib", "nonesuch", "--out", "{tmp}/m.gguf"],
               ["--type", "Q4_K_M", "--calib", "pydoc", "--n-samples", "0", "--out", "{tmp}/m.gguf"],
               ["--type", "Q4_0", "--token-embedding-type", "Q9", "--out", "{tmp}/m.gguf"],
               ["--type", "Q4_0", "--eval", "--protocol", "sliding", "--out", "{tmp}/m.gguf"],
               ["--type", "Q4_0", "--threads", "0", "--out", "{tmp}/m.gguf"],
               ["--adapter", "{tmp}", "--type", "Q4_K_M", "--out", "{tmp}/a.gguf"],
               ["--merge", "--out", "{tmp}/m.gguf"],
               ["--adapter", "{tmp}/none", "--out", "{tmp}/a.gguf"],
               ["--adapter", "{tmp}", "--out", "{tmp}/a.gguf"], ["--out", "{tmp}"],
               ["--model", "nonesuch", "--out", "{tmp}/m.gguf"],
               ["--format", "onnx", "--type", "int4", "--out", "{tmp}/m.onnx"],
               ["--format", "onnx", "--out", "{tmp}/m.gguf"],
               ["--format", "onnx", "--adapter", "{tmp}", "--out", "{tmp}/m.onnx"],
               ["--format", "onnx", "--imatrix", "{tmp}/binary.txt", "--out", "{tmp}/m.onnx"],
               ["--format", "executorch", "--type", "Q4_0", "--out", "{tmp}/m.pte"],
               ["--format", "executorch", "--max-len", "1", "--out", "{tmp}/m.pte"],
               ["--format", "executorch", "--eval", "--ctx", "1024", "--out", "{tmp}/m.pte"],
               ["--format", "executorch", "--eval", "--protocol", "sliding",
                "--out", "{tmp}/m.pte"]],
    "bench-runtime": [["--runtime", "llamacpp", "--model", "{tmp}/junk.gguf"],
                      ["--runtime", "llamacpp", "--model", "{tmp}/cut.gguf"],
                      ["--runtime", "llamacpp"], ["--runtime", "llamacpp", "--model", "/no/such.gguf"],
                      ["--runtime", "onnx"], ["--runtime", "torch", "--gen-tokens", "1"],
                      ["--runtime", "torch", "--threads", "0"],
                      ["--runtime", "torch", "--model", "nonesuch"],
                      ["--runtime", "onnxruntime"], ["--runtime", "executorch"],
                      ["--runtime", "onnxruntime", "--model", "{tmp}/junk.onnx"],
                      ["--runtime", "onnxruntime", "--model", "{tmp}/graph.onnx"],
                      ["--runtime", "executorch", "--model", "{tmp}/junk.pte"],
                      ["--runtime", "executorch", "--model", "{tmp}/junk.gguf"]],
    "roofline": [["--model", "{tmp}/junk.gguf"], ["--model", "{tmp}/cut.gguf"],
                 ["--threads", "0"], ["--size-mib", "1"], ["--model", "/no/such.gguf"],
                 ["--model", "{tmp}/binary.txt"], ["--position", "-1"]],
    "kernels bench": [["--shapes", "1536"], ["--shapes", "1536x500"], ["--threads", "0"],
                      ["--variants", "nonesuch"], ["--variants", ","], ["--repeats", "0"],
                      ["--footprint-mib", "0"]],
    "kernels fusion": [["--tokens", "0"], ["--tokens", "one"], ["--threads", "0"],
                       ["--intermediate", "0"]],
    "kernels sparsity": [["--n-samples", "1"], ["--top", "1.5"], ["--data", "nonesuch"],
                         ["--model", "nonesuch"], ["--seq-len", "0"]],
    "serve": [["--model", "/no/such.gguf"], ["--model", "{tmp}/junk.gguf"],
              ["--model", "{tmp}/cut.gguf"], ["--model", "{tmp}/binary.txt"],
              ["--model", "{tmp}/gguf-head.gguf", "--port", "70000"],
              ["--model", "{tmp}/gguf-head.gguf", "--parallel", "4", "--engine",
               "llama-cpp-python"],
              ["--model", "{tmp}/gguf-head.gguf", "--threads", "0"],
              ["--model", "{tmp}/gguf-head.gguf", "--lora", "/no/such.gguf"],
              ["--model", "{tmp}/gguf-head.gguf", "--lora", "{tmp}"]],
    "speculative": [["--gamma", "0"], ["--gamma", "100"], ["--prompts", "0"],
                    ["--new-tokens", "-1"], ["--threads", "0"], ["--target", "nonesuch"],
                    ["--draft", "nonesuch"], ["--draft", "/no/such/folder"],
                    ["--draft", "{tmp}"], ["--data", "nonesuch"], ["--runtime", "llamacpp"]],
    "loadtest": [["--url", "http://127.0.0.1:9/v1"], ["--url", "127.0.0.1:8080"],
                 ["--url", "http://127.0.0.1:9/v1", "--clients", "0"],
                 ["--url", "http://127.0.0.1:9/v1", "--clients", "1000"],
                 ["--url", "http://127.0.0.1:9/v1", "--data", "nonesuch"],
                 ["--model", "{tmp}/junk.gguf"], ["--model", "/no/such.gguf"],
                 ["--model", "{tmp}/gguf-head.gguf", "--parallel", "0"],
                 ["--model", "{tmp}/gguf-head.gguf", "--parallel", "2", "--engine",
                  "llama-cpp-python"], ["--clients", "2"]],
    "pipeline run": [["/no/such.yaml"], ["{tmp}/binary.txt"], ["{tmp}/prose.jsonl"]],
    "pipeline grade": [["/no/such.yaml"], ["{tmp}/junk.ipynb", "--budget", "phone"],
                       [str(ROOT / "recipes" / "phone.yaml"), "--budget", "nonesuch"],
                       [str(ROOT / "recipes" / "phone.yaml"), "--threads", "0"]],
    "results": [["nonesuch"]],
}


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every leaf subcommand of ``parser``, nested ones as ``"course run"``."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                out += subcommands(sub, path) or [path]
    return out


def test_every_subcommand_has_a_bad_input_case():
    found = subcommands(build_parser())
    assert {"ppl", "course run", "exercises grade", "results"} <= set(found)  # the walk works
    for name in found:
        assert name in BAD_INPUT, f"add a bad-input case for {name} to BAD_INPUT in {__file__}"
    stale = set(BAD_INPUT) - set(found)
    assert not stale, f"BAD_INPUT names subcommands that no longer exist: {sorted(stale)}"


CASES = [(name, argv) for name, cases in BAD_INPUT.items() for argv in cases]


def _bad_files(tmp_path: Path) -> None:
    (tmp_path / "binary.txt").write_bytes(b"\x00\xff\xfe not text")
    (tmp_path / "junk.ipynb").write_text("not a notebook")
    (tmp_path / "junk.gguf").write_text("junk")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x09" * 20)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 not a model at all \xff" * 3)
    (tmp_path / "junk.pte").write_bytes(b"\x00" * 4 + b"XXXX junk")
    _onnx_without_cache(tmp_path / "graph.onnx")
    _small_gguf(tmp_path / "gguf-head.gguf")
    (tmp_path / "prose.jsonl").write_text('{"prompt": "Greet.", "answer": "Hello there!", '
                                          '"split": "test"}\n')


def _small_gguf(path: Path) -> None:
    """A complete GGUF file with one key and one tiny tensor (no model in it)."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tensor("t", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _onnx_without_cache(path: Path) -> None:
    """A valid ONNX model that is not a decoder with a KV cache (Identity on one input)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))


def _argv(name: str, argv: list[str], tmp_path: Path) -> list[str]:
    return [*name.split(), *(a.replace("{tmp}", str(tmp_path)) for a in argv)]


def run_main_without_model(argv, monkeypatch, capsys, tmp_path) -> tuple[int, str]:
    """``edgellm.cli.main(argv)`` in ``tmp_path`` (with the bad files) with every model load
    refused: its exit code and what it printed to stderr."""
    from edgellm import models
    from edgellm.cli import main

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(models, "ensure_cached", no_load)
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name,argv", CASES, ids=[f"{n} {' '.join(a)}" for n, a in CASES])
def test_bad_input_is_one_message_exit_2_before_any_model_load(name, argv, tmp_path, monkeypatch,
                                                                capsys):
    """In process, so every case is cheap: an exception escaping ``main`` is what prints a
    traceback from the real command; a model load before the error is refused."""
    code, err = run_main_without_model(_argv(name, argv, tmp_path), monkeypatch, capsys, tmp_path)
    assert code == 2, err
    assert "error" in err and len(err.strip()) > 20, err


@pytest.mark.integration  # reads the cached model's config.json (no weights are loaded)
def test_impossible_rank_fails_before_the_model_load(monkeypatch, capsys):
    from edgellm import models
    from edgellm.cli import main

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the bad rank was rejected")

    monkeypatch.setattr(models, "load_model", no_load)
    assert main(["lowrank", "--rank", "600"]) == 2
    err = capsys.readouterr().err
    assert "600" in err and "error" in err, err


# the real entry point, one case of each kind of check, in a subprocess: no traceback, fast
SUBPROCESS_CASES = [("ppl", ["--model", "nonesuch"]), ("results", ["nonesuch"]),
                    ("exercises grade", ["/no/such.ipynb"]), ("quantize", ["--bits", "99"])]


@pytest.fixture(scope="module")
def startup_s() -> float:
    """Seconds for `edgellm` to start and reject a flag (imports torch): the floor of every case."""
    t0 = time.perf_counter()
    subprocess.run([str(EDGELLM), "info", "--nonesuch"], capture_output=True, timeout=120)
    return time.perf_counter() - t0


@pytest.mark.parametrize("name,argv", SUBPROCESS_CASES,
                         ids=[f"{n} {' '.join(a)}" for n, a in SUBPROCESS_CASES])
def test_the_command_prints_no_traceback_and_fails_fast(name, argv, tmp_path, startup_s):
    _bad_files(tmp_path)
    cmd = [str(EDGELLM), *_argv(name, argv, tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    shown = f"$ {' '.join(cmd)}\nexit {r.returncode}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr + r.stdout, shown
    assert r.returncode == 2, shown
    assert "error" in r.stderr and len(r.stderr.strip()) > 20, shown
    assert "Loading weights" not in r.stderr, f"a model was loaded first\n{shown}"
    # 15 s on an idle laptop; on a machine busy with other work, 3x what a bare start takes here
    limit = max(FAIL_FAST_S, 3 * startup_s)
    assert seconds < limit, f"{seconds:.1f} s (limit {limit:.1f} s): must fail fast\n{shown}"


# --------------------------------------------------------------------------------------------
# scripts/check_prereqs.sh: missing system parts, said in the first seconds


def _path_without(tmp_path: Path, *hidden: str) -> str:
    """A PATH like this one, minus the named programs: a folder of links to everything else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = bin_dir / entry.name
            if entry.name in hidden or link.exists() or link.is_symlink():
                continue
            try:
                if entry.is_file() and os.access(entry.path, os.X_OK):
                    link.symlink_to(entry.path)
            except OSError:
                continue
    for name in hidden:
        assert shutil.which(name, path=str(bin_dir)) is None
    return str(bin_dir)


def _no_npm_env(tmp_path: Path, *hidden: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGELLM_NODE_MODULES", "CI")}
    env.update(PATH=_path_without(tmp_path, "npm", "node", *hidden),
               EDGELLM_CACHE=str(tmp_path / "cache"))  # no web assets installed there either
    return env


def _run(cmd, env) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    return r, time.perf_counter() - t0


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def test_prereqs_course_without_npm_stops_with_one_message(tmp_path):
    env = _no_npm_env(tmp_path)
    r, seconds = _run(["bash", "scripts/check_prereqs.sh", "course"], env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "npm" in r.stderr and "COURSE_ARGS=--no-web-assets" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and seconds < 10
    # --no-web-assets needs no npm
    r, _ = _run(["bash", "scripts/check_prereqs.sh", "course", "--no-web-assets"], env)
    assert r.returncode == 0, r.stderr


@needs_make
def test_make_course_without_npm_says_so_within_10_s(tmp_path):
    env = _no_npm_env(tmp_path)
    r, seconds = _run(["make", "--no-print-directory", "course", f"OUT={tmp_path / 'course'}"],
                      env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "make course: missing" in r.stderr and "npm" in r.stderr, r.stdout + r.stderr
    assert seconds < 10, f"{seconds:.1f} s"


def test_prereqs_first_setup_needs_compiler_and_cmake(tmp_path):
    # no environment yet (an empty VENV): the first setup compiles llama-cpp-python
    env = _no_npm_env(tmp_path, "cc", "gcc", "clang", "c++", "g++", "clang++", "cmake")
    env.update(VENV=str(tmp_path / "venv"), PYTHON=sys.executable)
    r, seconds = _run(["bash", "scripts/check_prereqs.sh", "setup"], env)
    assert r.returncode != 0 and seconds < 10
    assert "C/C++ compiler" in r.stderr and "build-essential" in r.stderr, r.stderr
    assert "cmake" in r.stderr and "npm" not in r.stderr, r.stderr
    # an existing environment does not need them again
    env["VENV"] = str(Path(sys.executable).parents[1])
    r, _ = _run(["bash", "scripts/check_prereqs.sh", "setup"], env)
    assert r.returncode == 0, r.stderr


def test_prereqs_test_reports_skips_without_failing(tmp_path):
    env = _no_npm_env(tmp_path, "chromium")
    env["CHROMIUM"] = ""
    r, _ = _run(["bash", "scripts/check_prereqs.sh", "test"], env)
    assert r.returncode == 0, r.stderr
    assert "will be skipped" in r.stdout and "npm" in r.stdout, r.stdout


def test_prereqs_python_3_11_is_required(tmp_path):
    env = _no_npm_env(tmp_path, "python3.11", "python3")
    env.update(VENV=str(tmp_path / "venv"), PYTHON="/no/such/python")
    r, _ = _run(["bash", "scripts/check_prereqs.sh", "setup"], env)
    assert r.returncode != 0 and "Python 3.11" in r.stderr, r.stderr
