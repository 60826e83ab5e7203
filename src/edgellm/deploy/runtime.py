"""One prompt, one greedy generation, timed the same way in each runtime.

Each runtime gets the same prompt token ids (the first ``prompt_tokens`` tokens of the pydoc test
split, tokenized once by the model's tokenizer), generates ``gen_tokens`` tokens greedily at
batch 1 with its KV cache, and is timed in three parts:

* ``load_s``: from nothing to a model ready to run (reading the file, building the runtime's
  structures);
* ``ttft_s``: the prompt fed at once, until the first generated token is known; prefill
  tokens/s = ``prompt_tokens / ttft_s`` (compute-bound);
* decode: each later token is one forward step over one token with the cache; decode tokens/s
  = ``(gen_tokens − 1) / seconds`` from the first to the last generated token (memory-bound).

Each figure is the median of ``repeats`` runs; the generated ids come back too, so runtimes can
be checked to generate the same tokens before their speeds are compared.
"""

from __future__ import annotations

import time

import torch


def prompt_ids(tokenizer, n: int, *, data: str = "pydoc", split: str = "test") -> list[int]:
    """The first ``n`` token ids of a corpus split (no special tokens)."""
    from edgellm.data import load_text

    text = load_text(data, split)
    ids = tokenizer(text[: 20 * n], add_special_tokens=False)["input_ids"][:n]
    if len(ids) < n:
        raise ValueError(f"{data}/{split} has fewer than {n} tokens")
    return ids


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def llama_bench(gguf, *, threads: int = 1, prompt_tokens: int = 128, gen_tokens: int = 128,
                repeats: int = 3) -> dict:
    """llama.cpp's own ``llama-bench`` on ``gguf`` (JSON output): prompt processing and token
    generation tokens/s, mean and standard deviation over ``repeats`` runs."""
    import json
    import subprocess

    from edgellm.deploy.llamacpp import LlamaCppError, build_tools, extra_buffer_types_safe

    cmd = [str(build_tools(("llama-bench",)) / "llama-bench"), "-m", str(gguf), "-t",
           str(threads), "-p", str(prompt_tokens), "-n", str(gen_tokens), "-r", str(repeats),
           "-o", "json"]
    if not extra_buffer_types_safe():
        cmd += ["--repack", "0"]  # see edgellm.deploy.llamacpp.open_llama
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        tests = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tests = None
    if proc.returncode != 0 or not tests:
        raise LlamaCppError(f"llama-bench failed (exit {proc.returncode}): "
                            f"{(proc.stdout + proc.stderr).strip()[-600:]}")
    pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
    tg = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
    return {"prefill_tokens_per_s": pp["avg_ts"], "prefill_stddev": pp["stddev_ts"],
            "decode_tokens_per_s": tg["avg_ts"], "decode_stddev": tg["stddev_ts"],
            "threads": threads, "build": tg.get("build_commit"), "cpu": tg.get("cpu_info")}


def bench_llamacpp(gguf, ids: list[int], *, gen_tokens: int = 128, threads: int = 1,
                   repeats: int = 3) -> dict:
    """llama.cpp (llama-cpp-python) on ``gguf``: load, prefill and decode timings."""
    from edgellm.deploy.llamacpp import extra_buffer_types_safe, open_llama

    t0 = time.perf_counter()
    llm = open_llama(gguf, n_ctx=len(ids) + gen_tokens + 8, n_batch=len(ids),
                     n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    runs = []
    try:
        for _ in range(repeats):
            llm.reset()
            out, stamps = [], []
            t0 = time.perf_counter()
            for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                    repeat_penalty=1.0, reset=True):
                stamps.append(time.perf_counter() - t0)
                out.append(int(tok))
                if len(out) == gen_tokens:
                    break
            runs.append((stamps[0], stamps[-1] - stamps[0], out))
    finally:
        llm.close()
    out = _summary(runs, load_s, len(ids), gen_tokens)
    out["llamacpp_extra_buffer_types"] = extra_buffer_types_safe()
    return out


def timed_generation(prefill, step, ids: list[int], *, gen_tokens: int, repeats: int,
                     load_s: float | None) -> dict:
    """The timings of :func:`_summary` for a runtime given as two functions: ``prefill(ids)``
    returns the first greedy token (from an empty cache), ``step(token)`` the next one (the
    runtime keeps its cache between calls; ``prefill`` starts it again).  ``repeats`` timed
    runs after one untimed warm-up."""
    runs = []
    for _ in range(repeats + 1):                       # the first run warms up, untimed
        t0 = time.perf_counter()
        out = [prefill(ids)]
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        while len(out) < gen_tokens:
            out.append(step(out[-1]))
        runs.append((first, time.perf_counter() - t1, out))
    return _summary(runs[1:], load_s, len(ids), gen_tokens)


@torch.inference_mode()
def bench_torch(model, ids: list[int], *, gen_tokens: int = 128, repeats: int = 3,
                load_s: float | None = None) -> dict:
    """A Hugging Face model in eager PyTorch: the same timings (``load_s`` is measured by the
    caller, who loaded the model)."""
    state = {}

    def prefill(prompt):
        o = model(input_ids=torch.tensor([prompt]), use_cache=True)
        state["cache"] = o.past_key_values
        return int(o.logits[0, -1].argmax())

    def step(token):
        o = model(input_ids=torch.tensor([[token]]), past_key_values=state["cache"],
                  use_cache=True)
        state["cache"] = o.past_key_values
        return int(o.logits[0, -1].argmax())

    return timed_generation(prefill, step, ids, gen_tokens=gen_tokens, repeats=repeats,
                            load_s=load_s)


def _summary(runs, load_s, n_prompt: int, gen_tokens: int) -> dict:
    from edgellm.measure import protocol

    ttft = _median([r[0] for r in runs])
    dec = _median([r[1] for r in runs])
    generated = runs[0][2]
    return {"load_s": load_s, "ttft_s": ttft, "prefill_tokens_per_s": n_prompt / ttft,
            "decode_tokens_per_s": (len(generated) - 1) / dec if dec > 0 else None,
            "prompt_tokens": n_prompt, "gen_tokens": gen_tokens, "generated_ids": generated,
            "speed_protocol": {
                "prefill_tokens_per_s": protocol("ttft-prefill", batch=1, prompt_tokens=n_prompt,
                                                 repeats=len(runs)),
                "decode_tokens_per_s": protocol("decode", batch=1, prompt_tokens=n_prompt,
                                                new_tokens=gen_tokens - 1, repeats=len(runs),
                                                warmup=0)}}
