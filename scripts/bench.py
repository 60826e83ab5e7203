"""`make bench`: measure the foundation, weight quantization, low-rank factorization, knowledge
distillation and LoRA/QLoRA steps; record them in BENCHMARKS.md.

Over 400 lines because each section keeps its measurement beside the table it writes.

Also regenerates tests/fixtures/llamacpp_perplexity.json: llama.cpp's own llama-perplexity on an
f32 GGUF converted from the cached default model, which a test compares with our `llamacpp`
protocol on every run, and tests/fixtures/llamacpp_perplexity_tokens.json: the token ids it
evaluated, so that the test does not depend on the local Python's pydoc text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgellm.data import get_tokens, load_text, sha256_text
from edgellm.deploy import llamacpp
from edgellm.measure import bare_forward_seconds, peak_rss_bytes
from edgellm.metrics import perplexity
from edgellm.models import cache_dir, default_gguf, ensure_cached, load_model
from edgellm.records import versions, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "llamacpp_perplexity.json"
EVAL_TOKENS = FIXTURE.with_name("llamacpp_perplexity_tokens.json")
CTX, CHUNKS = 512, 16


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads{mem}, {platform.system()} {platform.machine()}"


def llamacpp_comparison(model, tok) -> dict:
    """llama.cpp's perplexity vs ours on the pydoc test split: tokens, scored count, PPL."""
    text = load_text("pydoc", "test")
    work = cache_dir() / "llama.cpp" / "compare"
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / "smollm2-135m-f32.gguf"
    if not gguf.is_file():
        llamacpp.convert_hf_to_gguf(ensure_cached(), gguf, outtype="f32")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        theirs = llamacpp.llama_perplexity(gguf, f.name, ctx=CTX, chunks=CHUNKS)
    finally:
        Path(f.name).unlink()
    ids_llama = llamacpp.llamacpp_tokenize(gguf, text)
    ids_ours = get_tokens("pydoc", tok, "test").tolist()
    ours = perplexity(model, torch.tensor(ids_ours), "llamacpp", CTX, chunks=CHUNKS,
                      progress=False)
    n_eval = CTX * min(CHUNKS, len(ids_llama) // CTX)  # llama-perplexity reads only these
    fixture = {
        "description": "llama.cpp llama-perplexity on an f32 GGUF converted (convert_hf_to_gguf.py) "
                       "from the cached smollm2-135m, on the pydoc test split",
        "data": "pydoc", "split": "test", "data_sha256": sha256_text(text),
        "n_text_tokens": len(ids_llama),
        "token_ids_sha256": hashlib.sha256(json.dumps(ids_llama).encode()).hexdigest(),
        "eval_tokens_file": EVAL_TOKENS.name, "n_eval_tokens": n_eval,
        "eval_token_ids_sha256": write_eval_tokens(ids_llama[:n_eval], EVAL_TOKENS),
        "ctx": CTX, "chunks": CHUNKS,
        "command": f"llama-perplexity -m smollm2-135m-f32.gguf -f pydoc-test.txt -c {CTX} "
                   f"-b {CTX} --chunks {CHUNKS}",
        "llama_cpp": theirs,
    }
    write_json(fixture, FIXTURE)
    return {"theirs": theirs, "ours": ours, "same_tokens": ids_llama == ids_ours}


def write_eval_tokens(ids: list[int], path: Path) -> str:
    """Write token ids as compact JSON (``{"ids": [...]}``, 32 a line); return the sha256 of
    ``json.dumps(ids)``, which the test checks before using them."""
    rows = [",".join(map(str, ids[i:i + 32])) for i in range(0, len(ids), 32)]
    write_text('{"ids": [\n' + ",\n".join(rows) + "\n]}\n", path)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def throughput(model, tok, n_windows: int = 8) -> dict:
    tokens = get_tokens("pydoc", tok, "test")
    bare_s, n = bare_forward_seconds(model, tokens, CTX, n_windows)
    res = perplexity(model, tokens, "gptq", CTX, chunks=n_windows, progress=False)
    bare_s2, _ = bare_forward_seconds(model, tokens, CTX, n_windows)  # bracket the harness run
    bare = n / min(bare_s, bare_s2)
    return {"bare_tokens_per_s": bare, "harness_tokens_per_s": res["eval_tokens_per_s"],
            "ratio": res["eval_tokens_per_s"] / bare, "n_tokens": n}


def load_times() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:  # cold: GGUF → fp32 safetensors cache
        (Path(tmp) / "downloads").mkdir()
        shutil.copy(default_gguf(), Path(tmp) / "downloads")
        code = ("import time;t=time.perf_counter();from edgellm.models import ensure_cached;"
                "ensure_cached(quiet=True);print(time.perf_counter()-t)")
        env = {**os.environ, "EDGELLM_CACHE": tmp}
        out["build_cache_s"] = float(subprocess.run([sys.executable, "-c", code], env=env,
                                                    capture_output=True, text=True,
                                                    check=True).stdout.split()[-1])
    t0 = time.perf_counter()
    load_model(quiet=True)
    out["cached_load_s"] = time.perf_counter() - t0
    return out


def write_section(lines: list[str], name: str = "foundation") -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin, *lines, end])
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(text, path)



@torch.no_grad()
def quantizer_benchmark(model=None, tok=None, *, n_samples: int = 128, seq_len: int = 512, bits: int = 4,
              group_size: int | None = 64, methods=("gptq", "awq"), seed: int = 0,
              batch_size: int = 8) -> dict:
    """Time GPTQ (and AWQ) on all linears against two plain forward passes over the same tokens.

    The floor: GPTQ needs one pass to collect each layer's inputs and one to propagate the
    quantized outputs, so two plain forward passes of the model over the calibration tokens,
    measured in the same run, are what it is compared with (``logits_to_keep=1``: the lm_head
    runs on one position only, since the quantizers never need logits; this makes the floor
    stricter).  Returns seconds, the ratios (goal: GPTQ ≤ 1.5× the floor) and the peak RSS of
    the process in bytes (goal ≤ 4 GB).  Run it on an otherwise idle machine.
    """
    import copy

    from edgellm.data import get_calibration
    from edgellm.models import load_model

    if model is None:
        model, tok = load_model(quiet=True)
    calib = get_calibration("pydoc", n_samples, seq_len, seed, tokenizer=tok)
    t0 = time.perf_counter()
    for _ in range(2):
        for i in range(0, n_samples, batch_size):
            model(input_ids=calib[i:i + batch_size], use_cache=False, logits_to_keep=1)
    floor = time.perf_counter() - t0
    rec = {"n_samples": n_samples, "seq_len": seq_len, "bits": bits, "group_size": group_size,
           "seconds_two_forward": floor, "threads": torch.get_num_threads()}
    for method in methods:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if method == "gptq":
            from edgellm.quant.gptq import apply_gptq

            apply_gptq(m, calib, bits=bits, group_size=group_size, batch_size=batch_size,
                       progress=False)
        elif method == "awq":
            from edgellm.quant.awq import apply_awq

            apply_awq(m, calib, bits=bits, group_size=group_size, batch_size=batch_size,
                      progress=False)
        else:
            raise ValueError(f"unknown method {method!r} for the benchmark; use gptq or awq")
        s = time.perf_counter() - t0
        rec[f"seconds_{method}"] = s
        rec[f"{method}_over_floor"] = s / floor
        del m
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return rec


def quant_section() -> list[str]:
    """GPTQ and AWQ on all 210 linears with 128×512 calibration tokens, against the floor of two
    plain forward passes over the same tokens measured in the same run (issue: Quantization I)."""

    r = quantizer_benchmark(n_samples=128, seq_len=512, bits=4, group_size=64)
    floor = r["seconds_two_forward"]
    return [
        "## Weight quantization (`make bench`)",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. 4-bit, groups of 64, "
        f"asymmetric; calibration {r['n_samples']}×{r['seq_len']} tokens of the pydoc train split "
        f"(seed 0); all 210 decoder linears.",
        "",
        "| what | seconds | × floor | goal |",
        "|---|---|---|---|",
        f"| floor: two plain forward passes over the calibration tokens | {floor:.0f} | 1.00 | |",
        f"| GPTQ (collect inputs, Hessians, quantize, propagate) | {r['seconds_gptq']:.0f} | "
        f"{r['gptq_over_floor']:.2f} | ≤ 1.5 |",
        f"| AWQ (scale grid + clip search per layer) | {r['seconds_awq']:.0f} | "
        f"{r['awq_over_floor']:.2f} | recorded |",
        f"| peak RSS of this run | {r['peak_rss_bytes'] / 2**30:.2f} GiB | | ≤ 4 GB |",
    ]


@torch.no_grad()
def lowrank_benchmark(model=None, tok=None, *, n_samples: int = 32, seq_len: int = 512,
                      ratio: float = 0.2, seed: int = 0, batch_size: int = 8) -> dict:
    """Time SVD-LLM on all 210 linears against its floor, measured in the same run.

    The floor: one plain forward pass over the calibration tokens (``logits_to_keep=1``) plus
    the SVDs alone (one thin SVD of every decoder weight, the shape SVD-LLM decomposes as
    ``W L``).  SVD-LLM adds what whitening costs: X^T X per input, the Gram eigendecompositions
    that give the SVD of ``W L`` (a Cholesky and a triangular solve for the weights taller than
    wide), and the second pass that feeds each layer the outputs of the already factorized ones.  The floor is measured before and after
    SVD-LLM (the machine may be shared); the ratio uses their mean.  Goal: ≤ 2×.
    """
    import copy

    from edgellm.data import get_calibration
    from edgellm.lowrank.apply import factorize_model
    from edgellm.lowrank.svd import svd
    from edgellm.models import linear_layers

    if model is None:
        model, tok = load_model(quiet=True)
    calib = get_calibration("pydoc", n_samples, seq_len, seed, tokenizer=tok)
    weights = [lin.weight for lin in linear_layers(model).values()]

    def floor() -> tuple[float, float]:
        t0 = time.perf_counter()
        for i in range(0, n_samples, batch_size):
            model(input_ids=calib[i:i + batch_size], use_cache=False, logits_to_keep=1)
        t1 = time.perf_counter()
        for W in weights:
            svd(W)
        return t1 - t0, time.perf_counter() - t1

    fwd1, svd1 = floor()
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    res = factorize_model(m, calib, method="svdllm", ratio=ratio, batch_size=batch_size)
    s = time.perf_counter() - t0
    del m
    fwd2, svd2 = floor()
    fwd, svds = (fwd1 + fwd2) / 2, (svd1 + svd2) / 2
    return {"n_samples": n_samples, "seq_len": seq_len, "ratio": ratio,
            "n_linears": len(res.ranks), "seconds_forward": fwd, "seconds_svds": svds,
            "seconds_floor_runs": [fwd1 + svd1, fwd2 + svd2], "seconds_svdllm": s,
            "svdllm_over_floor": s / (fwd + svds), "threads": torch.get_num_threads(),
            "peak_rss_bytes": peak_rss_bytes()}


def lowrank_section(shared: bool = False) -> list[str]:
    """SVD-LLM whitening on all 210 linears with 32×512 calibration tokens against one forward
    pass plus the SVDs alone (issue: lesson 08, Performance)."""
    r = lowrank_benchmark()
    floor = r["seconds_forward"] + r["seconds_svds"]
    runs = ", ".join(f"{x:.0f}" for x in r["seconds_floor_runs"])
    note = " The machine was shared with other jobs while this ran." if shared else ""
    return [
        "## Low-rank factorization (`scripts/bench.py --only lowrank`)",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. SVD-LLM (truncation-aware whitening) "
        f"at ratio {r['ratio']} on all {r['n_linears']} decoder linears; calibration "
        f"{r['n_samples']}×{r['seq_len']} tokens of the pydoc train split (seed 0). The floor "
        f"was measured before and after SVD-LLM ({runs} s); the ratio uses their mean.{note}",
        "",
        "| what | seconds | × floor | goal |",
        "|---|---|---|---|",
        f"| one plain forward pass over the calibration tokens | {r['seconds_forward']:.0f} | | |",
        f"| the SVDs alone (one thin SVD per linear, float32) | {r['seconds_svds']:.0f} | | |",
        f"| floor: forward + SVDs | {floor:.0f} | 1.00 | |",
        f"| SVD-LLM (inputs, XᵀX, Gram eigendecompositions, Cholesky for tall weights, solves, propagate) | "
        f"{r['seconds_svdllm']:.0f} | {r['svdllm_over_floor']:.2f} | ≤ 2 |",
        f"| peak RSS of this run | {r['peak_rss_bytes'] / 2**30:.2f} GiB | | ≤ 4 GB |",
    ]


def distill_benchmark(*, ratio: float = 0.2, batch_size: int = 4, seq_len: int = 256,
                      top_k: int = 64, repeats: int = 5, seed: int = 0) -> dict:
    """One KD training step against its parts, interleaved in one run (lesson 07, Performance):
    :func:`edgellm.distill.teacher.step_times` on the first training batch of a student with
    ``ratio`` of its layers dropped."""
    from edgellm.data import get_calibration
    from edgellm.distill.students import make_student
    from edgellm.distill.teacher import step_times
    from edgellm.train import train_windows

    teacher, tok = load_model(quiet=True)
    teacher.eval()
    calib = get_calibration("pydoc", 8, seq_len, seed, tokenizer=tok)  # block influence
    student, _ = make_student(teacher, "drop-layers", ratio=ratio, calib=calib)
    batch = train_windows(get_tokens("pydoc", tok, "train"), batch_size, seq_len, seed)
    r = step_times(student, teacher, batch, top_k=top_k, repeats=repeats)
    return {**r, "ratio": ratio, "top_k": top_k, "threads": torch.get_num_threads(),
            "peak_rss_bytes": peak_rss_bytes()}


def distill_section(shared: bool = False) -> list[str]:
    """A KD step ≤ 1.3× (student step + teacher forward); how much of the top-k ceiling the
    cached top-k logits reach (issue: lesson 07, Performance)."""
    r = distill_benchmark()
    ideal = r["seconds_student_step"] + r["seconds_teacher_forward"]
    # of the time a live KD step spends beyond a plain student step, the share a cache saves
    extra = r["seconds_kd_step"] - r["seconds_student_step"]
    reached = ((r["seconds_kd_step"] - r["seconds_kd_step_topk"]) / extra
               if extra > 0 else float("nan"))
    note = " The machine was shared with other jobs while this ran." if shared else ""
    B, T = r["step_time_batch"]
    return [
        "## Knowledge distillation (`scripts/bench.py --only distill`)",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. {r['threads']} torch "
        f"thread(s). Student: the default model with {r['ratio']:.0%} of its layers dropped; "
        f"one batch of {B}×{T} pydoc train tokens; each time the median of "
        f"{r['step_time_repeats']} interleaved repeats (speed protocol `train`, one step: "
        f"forward, backward, AdamW).{note}",
        "",
        "| what | seconds | ratio | goal |",
        "|---|---|---|---|",
        f"| teacher forward (no grad) | {r['seconds_teacher_forward']:.2f} | | |",
        f"| student step, cross-entropy | {r['seconds_student_step']:.2f} | | |",
        f"| sum of the two | {ideal:.2f} | 1.00 | |",
        f"| KD step, forward KL, live teacher | {r['seconds_kd_step']:.2f} | "
        f"{r['kd_overhead']:.2f} | ≤ 1.3 |",
        f"| KD step, forward KL, cached top-{r['top_k']} + tail bucket | "
        f"{r['seconds_kd_step_topk']:.2f} | {r['seconds_kd_step_topk'] / ideal:.2f} | |",
        "",
        f"Cached top-{r['top_k']} logits speed a KD step up {r['topk_speedup']:.2f}×. The student "
        f"still computes full logits, so the best a cache can do is a plain student step: it "
        f"saves {reached:.0%} of the time a live KD step spends beyond one (a top-{r['top_k']} "
        f"step costs {r['seconds_kd_step_topk'] / r['seconds_student_step']:.2f}× a student "
        f"step; the issue's ceiling (student + teacher) / student is "
        f"{r['topk_speedup_ceiling']:.2f}×). Peak RSS of this benchmark process (teacher, "
        f"student and the student's training copy): {r['peak_rss_bytes'] / 2**30:.2f} GiB.",
    ]


def lora_benchmark(*, batch_size: int = 8, repeats: int = 5) -> dict:
    """A LoRA step against a no-grad forward and a QLoRA step against a LoRA step, interleaved in
    one run (lessons 09 and 10): :func:`edgellm.lora.steps.step_times` on the first training
    batch of the funccall task (chat template, left-padded)."""
    from edgellm.lora.chat import TRAIN_STYLE, Prompting, answer_batches
    from edgellm.lora.steps import step_times
    from edgellm.lora.task import load_task

    model, tok = load_model(quiet=True)
    task = load_task("funccall")
    batch = answer_batches(tok, Prompting.from_style(TRAIN_STYLE), task.split("train"), steps=1,
                           batch_size=batch_size, seq_len=128)[0]
    r = step_times(model, batch, repeats=repeats)
    return {**r, "threads": torch.get_num_threads(), "peak_rss_bytes": peak_rss_bytes()}


def lora_section(shared: bool = False) -> list[str]:
    """A LoRA step ≤ 3× a no-grad forward; a QLoRA step ≤ 1.5× a LoRA step (issue: lessons
    09-10, Targets)."""
    r = lora_benchmark()
    note = " The machine was shared with other jobs while this ran." if shared else ""
    B, T = r["step_time_batch"]
    return [
        "## LoRA and QLoRA steps (`scripts/bench.py --only lora`)",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. {r['threads']} torch "
        f"thread(s). The default model; one left-padded chat-template batch of {B}×{T} tokens "
        f"of the funccall task; logits only over the answer span in every row (the loss's "
        f"need); rank {r['rank']} on `{r['targets']}` linears; each time the median of "
        f"{r['step_time_repeats']} interleaved repeats (speed protocol `train`: forward, "
        f"backward, AdamW).{note}",
        "",
        "| what | seconds | ratio | goal |",
        "|---|---|---|---|",
        f"| forward, no grad | {r['seconds_forward']:.3f} | 1.00 | |",
        f"| LoRA step (fp32 base) | {r['seconds_lora_step']:.3f} | "
        f"{r['lora_over_forward']:.2f} × forward | ≤ 3 |",
        f"| QLoRA step (NF4 base, double quant) | {r['seconds_qlora_step']:.3f} | "
        f"{r['qlora_over_lora']:.2f} × LoRA step | ≤ 1.5 |",
        "",
        f"Peak RSS of this benchmark process (three copies of the model): "
        f"{r['peak_rss_bytes'] / 2**30:.2f} GiB.",
    ]


SECTIONS = ("foundation", "quant", "lowrank", "distill", "lora")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=SECTIONS, action="append",
                    help="measure only these sections (default: all)")
    ap.add_argument("--shared", action="store_true",
                    help="say in BENCHMARKS.md that other jobs shared the machine")
    opts = ap.parse_args()
    only = opts.only or SECTIONS
    torch.manual_seed(0)
    if "lowrank" in only:
        lines = lowrank_section(opts.shared)
        write_section(lines, "lowrank")
        print("\n".join(lines))
    if "lora" in only:
        lines = lora_section(opts.shared)
        write_section(lines, "lora")
        print("\n".join(lines))
    if "distill" in only:
        lines = distill_section(opts.shared)
        write_section(lines, "distill")
        print("\n".join(lines))
    if "quant" in only:
        lines = quant_section()
        write_section(lines, "quant")
        print("\n".join(lines))
    if "foundation" not in only:
        return
    loads = load_times()
    model, tok = load_model(quiet=True)
    tp = throughput(model, tok)
    cmp = llamacpp_comparison(model, tok)
    theirs, ours = cmp["theirs"], cmp["ours"]
    rel = abs(ours["ppl"] - theirs["ppl"]) / theirs["ppl"]
    v = versions()
    lines = [
        "## Foundation (`make bench`)",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. torch {v['torch']}, "
        f"transformers {v['transformers']}, llama-cpp-python {llamacpp.llamacpp_version()}.",
        "",
        "| what | measured | goal |",
        "|---|---|---|",
        f"| build the fp32 cache from the GGUF (cold) | {loads['build_cache_s']:.1f} s | once |",
        f"| load the cached default model | {loads['cached_load_s']:.2f} s | a second or two |",
        f"| bare forward loop, ctx {CTX}, {tp['n_tokens']} tokens | "
        f"{tp['bare_tokens_per_s']:.0f} tok/s | |",
        f"| perplexity harness, same windows | {tp['harness_tokens_per_s']:.0f} tok/s "
        f"({tp['ratio']:.2f}x bare) | ≥ 0.9x |",
        f"| peak RSS of this run | {peak_rss_bytes() / 2**30:.2f} GiB | |",
        "",
        f"llama.cpp comparison (pydoc test split, ctx {CTX}, {CHUNKS} chunks, f32 GGUF from the cache):",
        "",
        "| | PPL | ± | scored tokens |",
        "|---|---|---|---|",
        f"| llama.cpp `llama-perplexity` | {theirs['ppl']:.4f} | {theirs['ppl_stderr']:.4f} | "
        f"{theirs['n_tokens']} |",
        f"| edgellm `--protocol llamacpp` | {ours['ppl']:.4f} | {ours['ppl_stderr']:.4f} | "
        f"{ours['n_tokens']} |",
        "",
        f"Identical token ids: {cmp['same_tokens']}; relative PPL difference {rel:.2e} "
        "(goal < 1e-3). Fixture: `tests/fixtures/llamacpp_perplexity.json`.",
    ]
    write_section(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
