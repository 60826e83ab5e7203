"""``edgellm serve``: a GGUF behind an OpenAI-compatible server on 127.0.0.1 until Ctrl-C or
SIGTERM; ``edgellm loadtest``: concurrent streamed requests against such a server, bounded;
``edgellm speculative``: greedy speculative decoding timed against plain decoding.

::

    edgellm serve --model build/q4_0.gguf --engine llama-server --parallel 4 --port 8080
    edgellm loadtest --url http://127.0.0.1:8080/v1 --clients 4 --requests 4 --max-tokens 64 --json

``serve`` prints the base URL (``http://127.0.0.1:PORT/v1``) that ``loadtest --url`` and any
OpenAI client take; stopping it stops the server and all its children. ``loadtest`` keys:
``ttft_p50_s``, ``ttft_p95_s``, ``itl_p50_s``, ``itl_p95_s``, ``tokens_per_s``, ``errors``.
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import UsageError, add_device_arg, add_json_arg, check_in_file


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve a GGUF file on 127.0.0.1 (OpenAI-compatible API)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a GGUF file (edgellm export writes one)")
    add_device_arg(p, cpu_only="serve (llama.cpp's CPU build)")
    p.add_argument("--lora", help="an adapter applied on top: a folder of edgellm finetune --out "
                                  "(converted to a GGUF LoRA first) or a GGUF LoRA file")
    p.add_argument("--engine", default="llama-server", choices=["llama-server", "llama-cpp-python"],
                   help="llama-server: llama.cpp's own (parallel slots, continuous batching); "
                        "llama-cpp-python: its Python server (one request at a time)")
    p.add_argument("--port", type=int, help="TCP port on 127.0.0.1 (default: a free one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048, help="context length (shared by the slots)")
    p.add_argument("--parallel", type=int, default=1, help="llama-server's slots (-np)")
    p.add_argument("--duration", type=float,
                   help="stop after this many seconds (default: run until Ctrl-C or SIGTERM)")
    add_json_arg(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("loadtest", help="concurrent streamed completions against a server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server's base URL (…/v1)")
    target.add_argument("--model", help="a GGUF file: serve it on a free port for the test only "
                                        "(--engine, --parallel, --threads), then stop it")
    add_device_arg(p, cpu_only="loadtest (a llama.cpp server on this CPU)")
    p.add_argument("--engine", default="llama-server", choices=["llama-server", "llama-cpp-python"])
    p.add_argument("--parallel", type=int, default=1, help="with --model: llama-server's slots")
    p.add_argument("--threads", type=int, default=2, help="with --model: the server's threads")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per request")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds for the whole test (later requests count as errors)")
    p.add_argument("--data", default="pydoc", help="prompts: the test split's lines of this corpus")
    add_json_arg(p)
    p.set_defaults(func=run_loadtest)

    p = sub.add_parser("speculative", help="greedy speculative decoding against plain decoding",
                       description=SPECULATIVE_DOC,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m", help="the model that decides (default: %(default)s)")
    p.add_argument("--draft", default="prompt-lookup",
                   help="prompt-lookup (n-grams of the sequence itself), drop-layers (the target "
                        "with half its layers dropped, untrained) or a model sharing the "
                        "tokenizer: smollm2-135m-draft (distilled, lesson 07) or a folder")
    p.add_argument("--gamma", type=int, default=4, help="tokens drafted per target step")
    p.add_argument("--prompts", type=int, default=8, help="prompts from the corpus' test split")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runtime", default="torch", choices=["torch"],
                   help="where the loop runs (PyTorch, KV cache rolled back on rejection)")
    add_device_arg(p, cpu_only="speculative (batch-1 decoding timed on this CPU)")
    p.add_argument("--data", default="pydoc")
    add_json_arg(p)
    p.set_defaults(func=run_speculative)


SPECULATIVE_DOC = """Greedy speculative decoding: a proposer drafts --gamma tokens, the target
checks them in one pass and keeps the prefix it agrees with plus its own next token, so the output
is the target's plain greedy output.  Keys: acceptance_rate, tokens_per_step (and the formula's
tokens_per_step_expected = (1 - a^(g+1)) / (1 - a)), speedup (plain / speculative wall seconds,
prefill included), identical (the ids equal plain greedy's for every prompt).

    edgellm speculative --draft prompt-lookup --gamma 4 --json
    edgellm speculative --draft smollm2-135m-draft --gamma 3 --json
"""


def _positive(**flags) -> None:
    for name, v in flags.items():
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {v}: give a positive number")


def run_serve(args) -> dict:
    import signal
    import time
    from pathlib import Path

    from edgellm.deploy.export import check_gguf
    from edgellm.deploy.server import LlamaServer

    check_in_file(args.model, "GGUF file", suffix=".gguf")
    check_gguf(args.model)
    adapter_dir = args.lora is not None and Path(args.lora).is_dir()
    if adapter_dir:
        from edgellm.lora.apply import read_adapter_meta

        read_adapter_meta(args.lora)
    elif args.lora:
        check_in_file(args.lora, "GGUF LoRA", suffix=".gguf")
    _positive(threads=args.threads, ctx=args.ctx, parallel=args.parallel,
              duration=args.duration)
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: give a port between 1 and 65535")
    if args.parallel > 1 and args.engine != "llama-server":
        raise UsageError("--parallel needs --engine llama-server (llama-cpp-python's server "
                         "answers one request at a time)")

    def stop(signum, frame):
        raise KeyboardInterrupt

    import tempfile

    old = signal.signal(signal.SIGTERM, stop)
    t0 = time.perf_counter()
    reason = "duration"
    try:
        with tempfile.TemporaryDirectory(prefix="edgellm-serve-") as tmp:
            lora = args.lora
            if adapter_dir:                          # the default model's adapter, as GGUF
                from edgellm.deploy.apply import export

                lora = export(adapter=args.lora, out=Path(tmp) / "adapter.gguf")["out"]
            srv = LlamaServer(args.model, engine=args.engine, port=args.port,
                              n_threads=args.threads, ctx=args.ctx, parallel=args.parallel,
                              lora=lora)
            try:                                 # a signal while starting stops it too
                srv.start()
                import sys

                print(f"serving {args.model} ({args.engine}) at {srv.url}/v1 — Ctrl-C to "
                      "stop", file=sys.stderr if args.json else sys.stdout, flush=True)
                while args.duration is None or time.perf_counter() - t0 < args.duration:
                    if not srv.running:
                        reason = "the server exited"
                        break
                    time.sleep(0.2)
            except KeyboardInterrupt:
                reason = "signal"
            finally:
                srv.stop()
            url = srv.url
    finally:
        signal.signal(signal.SIGTERM, old)
    return {"model": args.model, "engine": args.engine, "url": f"{url}/v1",
            "parallel": args.parallel, "threads": args.threads, "stopped_by": reason,
            "seconds": time.perf_counter() - t0}


def run_loadtest(args) -> dict:
    from edgellm.data import load_text
    from edgellm.deploy.loadtest import loadtest
    from edgellm.deploy.server import check_endpoint
    from edgellm.records import record

    _positive(clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
              timeout=args.timeout, deadline=args.deadline, parallel=args.parallel,
              threads=args.threads)
    if args.clients > 64:
        raise UsageError(f"--clients {args.clients}: at most 64 (a load test on loopback, bounded)")
    prompts = [ln for ln in load_text(args.data, "test").splitlines() if len(ln.strip()) > 20]
    kw = dict(clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
              timeout_s=args.timeout, deadline_s=args.deadline)
    if args.url:
        check_endpoint(args.url)
        rec = loadtest(args.url, prompts[:64], **kw)
    else:
        from edgellm.deploy.export import check_gguf
        from edgellm.deploy.server import LlamaServer

        check_in_file(args.model, "GGUF file", suffix=".gguf")
        check_gguf(args.model)
        if args.parallel > 1 and args.engine != "llama-server":
            raise UsageError("--parallel needs --engine llama-server")
        ctx = max(2048, args.parallel * 1024)          # each slot gets ctx / parallel
        with LlamaServer(args.model, engine=args.engine, n_threads=args.threads, ctx=ctx,
                         parallel=args.parallel) as srv:
            rec = loadtest(srv.url + "/v1", prompts[:64], **kw)
        rec.update(model=args.model, engine=args.engine, parallel=args.parallel,
                   server_threads=args.threads, url=None)
    return record(rec, protocol="loadtest", data=args.data)


def run_speculative(args) -> dict:
    from edgellm.cli.common import check_model_name
    from edgellm.data import load_text
    from edgellm.deploy.apply import speculative
    from edgellm.models import DERIVED, derived_folder

    _positive(gamma=args.gamma, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
              new_tokens=args.new_tokens, threads=args.threads)
    if args.gamma > 16:
        raise UsageError(f"--gamma {args.gamma}: draft at most 16 tokens per step")
    check_model_name(args.target, "--target")
    if args.draft not in ("prompt-lookup", "drop-layers"):
        check_model_name(args.draft, "--draft")
        if args.draft in DERIVED:
            derived_folder(args.draft)            # says how to build it when it is missing
    load_text(args.data, "test")
    return speculative(args.target, draft=args.draft, gamma=args.gamma, n_prompts=args.prompts,
                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       threads=args.threads, data=args.data, runtime=args.runtime)
