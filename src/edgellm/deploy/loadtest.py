"""A bounded load test of an OpenAI-compatible completion endpoint, as an app would use it.

``clients`` threads start together; each sends ``requests`` streamed ``/v1/completions``
requests one after another (``stream: true``, greedy, ``max_tokens`` each) and times every
server-sent event that carries text:

* time to first token (TTFT): from sending the request to the first text event;
* inter-token latency (ITL): between consecutive text events of one request;
* tokens/s: text events of all requests over the wall time of the whole test;
* ``finish_reasons`` (``length``: all ``max_tokens`` came; ``stop``: the model ended it) and
  ``cut_short``: requests that ended early without ``length`` (e.g. interrupted by the server).

A text event is one token for llama.cpp's servers (they stream token by token). Everything is
bounded: each request by ``timeout_s``, the whole test by ``deadline_s`` (requests not started
by then are counted as errors); a request that fails counts in ``errors`` with its reason.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

from edgellm.deploy.server import ServerError, _auth, _base, check_endpoint
from edgellm.measure import check_speed_keys, protocol


def percentile(xs: list[float], q: float) -> float | None:
    """The ``q``-quantile (0–1) by linear interpolation; None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stream_completion(url: str, prompt: str, *, max_tokens: int = 64,
                      timeout_s: float = 120.0) -> dict:
    """One streamed completion: ``{"ttft_s", "itl_s": [...], "tokens", "seconds", "text"}``."""
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0,
               "stream": True, "seed": 0}
    req = urllib.request.Request(_base(url) + "/v1/completions",
                                 data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json", **_auth()})
    t0 = time.perf_counter()
    stamps, parts, finish = [], [], None
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            choice = (event.get("choices") or [{}])[0]
            text = choice.get("text") or ""
            finish = choice.get("finish_reason") or finish
            if text:
                stamps.append(time.perf_counter() - t0)
                parts.append(text)
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"stream exceeded {timeout_s:.0f} s")
    if not stamps:
        raise ServerError("the stream ended without any text")
    return {"ttft_s": stamps[0], "itl_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "tokens": len(stamps), "seconds": time.perf_counter() - t0, "text": "".join(parts),
            "finish_reason": finish}


def stream_chat(url: str, messages: list[dict], *, max_tokens: int = 128,
                timeout_s: float = 120.0):
    """Stream a chat answer from ``/v1/chat/completions`` with ``httpx``: yields the text pieces
    as the server sends them (greedy), as an app would show them while they arrive."""
    import httpx

    payload = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
               "stream": True, "seed": 0}
    t0 = time.perf_counter()
    with httpx.stream("POST", _base(url) + "/v1/chat/completions", json=payload,
                      headers=_auth(), timeout=timeout_s) as resp:
        if resp.status_code != 200:
            raise ServerError(f"{url} answered {resp.status_code}: {resp.read()[:200]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            delta = ((json.loads(data).get("choices") or [{}])[0].get("delta") or {})
            if delta.get("content"):
                yield delta["content"]
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"stream exceeded {timeout_s:.0f} s")


def loadtest(url: str, prompts: list[str], *, clients: int = 1, requests: int = 4,
             max_tokens: int = 64, timeout_s: float = 120.0, deadline_s: float = 600.0) -> dict:
    """``clients`` concurrent clients × ``requests`` streamed requests each (prompts taken in
    turn); the keys of ``edgellm loadtest``."""
    if clients < 1 or requests < 1 or max_tokens < 1:
        raise ValueError("clients, requests and max_tokens must be positive")
    if not prompts:
        raise ValueError("give at least one prompt")
    check_endpoint(url)
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)
    t0 = time.perf_counter()                       # before any thread: the deadline's origin

    def client(i: int) -> None:
        start.wait()
        for j in range(requests):
            if time.perf_counter() - t0 > deadline_s:
                with lock:
                    errors.append(f"client {i}: not started before the {deadline_s:.0f} s "
                                  "deadline")
                continue
            prompt = prompts[(i * requests + j) % len(prompts)]
            try:
                r = stream_completion(url, prompt, max_tokens=max_tokens, timeout_s=timeout_s)
            except (urllib.error.URLError, OSError, ValueError, ServerError) as e:
                with lock:
                    errors.append(f"client {i}: {type(e).__name__}: {str(e)[:200]}")
                continue
            with lock:
                results.append({**r, "client": i})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + timeout_s)
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] for r in results]
    itl = [x for r in results for x in r["itl_s"]]
    tokens = sum(r["tokens"] for r in results)
    settings = dict(clients=clients, requests=requests, max_tokens=max_tokens)
    rec = {"url": url, "clients": clients, "requests": requests, "max_tokens": max_tokens,
            "n_requests": clients * requests, "n_ok": len(results), "errors": len(errors),
            "error_messages": errors[:8], "tokens": tokens, "wall_s": wall,
            "finish_reasons": {str(k): sum(r["finish_reason"] == k for r in results)
                               for k in sorted({r["finish_reason"] for r in results}, key=str)},
            "cut_short": sum(r["finish_reason"] != "length" and r["tokens"] < max_tokens
                             for r in results),
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "itl_p50_s": percentile(itl, 0.5), "itl_p95_s": percentile(itl, 0.95),
            "client_tokens_per_s": percentile([r["tokens"] / r["seconds"] for r in results], 0.5),
            "speed_protocol": {"tokens_per_s": protocol("loadtest", **settings),
                               "client_tokens_per_s": protocol("loadtest", per="request, median",
                                                               **settings)}}
    check_speed_keys(rec)
    return rec
