"""edgellm.deploy.loadtest against a fake streaming endpoint (exact token counts, errors counted,
bounded), the server's port check and process-group stop, and the two engines' command lines."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgellm.deploy.loadtest import loadtest, percentile, stream_chat, stream_completion
from edgellm.deploy.server import LlamaServer, ServerError, free_port, port_free
from edgellm.measure import check_speed_keys


class FakeStream(BaseHTTPRequestHandler):
    """/v1/models and a streamed /v1/completions of ``max_tokens`` one-word events, 5 ms apart;
    a prompt containing FAIL gets a 500."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        if "FAIL" in (req["messages"][-1]["content"] if chat else req["prompt"]):
            self.send_error(500, "boom")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(req["max_tokens"]):
            time.sleep(0.005)
            last = i == req["max_tokens"] - 1
            piece = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
            event = {"choices": [{**piece, "index": 0,
                                  "finish_reason": "length" if last else None}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeStream)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def test_percentile_interpolates():
    assert percentile([], 0.5) is None and percentile([3.0], 0.95) == 3.0
    assert percentile([1, 2, 3, 4], 0.5) == 2.5 and percentile(list(range(101)), 0.95) == 95


def test_one_stream_counts_tokens_and_times_them(fake_url):
    r = stream_completion(fake_url, "hello", max_tokens=7)
    assert r["tokens"] == 7 and r["text"] == "".join(f" w{i}" for i in range(7))
    assert len(r["itl_s"]) == 6 and all(x >= 0 for x in r["itl_s"])
    assert r["seconds"] >= 0.035                      # seven events 5 ms apart, at least
    assert 0 < r["ttft_s"] and r["ttft_s"] + sum(r["itl_s"]) <= r["seconds"]


def test_chat_streams_pieces_and_reports_errors(fake_url):
    pieces = list(stream_chat(fake_url, [{"role": "user", "content": "hi"}], max_tokens=4))
    assert pieces == [" w0", " w1", " w2", " w3"]
    with pytest.raises(ServerError, match="500"):
        list(stream_chat(fake_url, [{"role": "user", "content": "FAIL"}], max_tokens=4))


def test_loadtest_aggregates_clients_and_counts_errors(fake_url):
    rec = loadtest(fake_url, ["a prompt", "FAIL please", "another"], clients=3, requests=2,
                   max_tokens=5)
    assert rec["n_requests"] == 6
    fails = sum("FAIL" in p for p in [["a prompt", "FAIL please", "another"][k % 3]
                                      for k in range(6)])
    assert rec["errors"] == fails and rec["n_ok"] == 6 - fails
    assert rec["tokens"] == 5 * rec["n_ok"] and rec["tokens_per_s"] > 0
    assert rec["finish_reasons"] == {"length": rec["n_ok"]} and rec["cut_short"] == 0
    assert rec["ttft_p50_s"] <= rec["ttft_p95_s"] and rec["itl_p50_s"] > 0
    check_speed_keys(rec)
    assert rec["speed_protocol"]["tokens_per_s"]["clients"] == 3


def test_loadtest_on_a_dead_url_fails_fast():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    with pytest.raises(ServerError, match="no OpenAI-compatible endpoint"):
        loadtest(url, ["x"], clients=2, requests=2)
    assert time.perf_counter() - t0 < 5


def test_a_port_in_use_is_refused_with_a_free_one_suggested(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert not port_free(port)
        with pytest.raises(ServerError, match=f"port {port} .* in use.*--port"):
            LlamaServer(gguf, port=port)
    with pytest.raises(ServerError, match="unknown engine"):
        LlamaServer(gguf, engine="vllm")
    with pytest.raises(ServerError, match="no GGUF LoRA"):
        LlamaServer(gguf, lora=tmp_path / "none.gguf")


def test_the_engines_command_lines(tmp_path, monkeypatch):
    from edgellm.deploy import llamacpp

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    lora = tmp_path / "a.gguf"
    lora.write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "build_tools", lambda targets: tmp_path / "bin")
    cmd = LlamaServer(gguf, engine="llama-server", parallel=4, n_threads=2, lora=lora).command()
    assert cmd[0].endswith("llama-server") and cmd[cmd.index("-np") + 1] == "4"
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--lora") + 1] == str(lora) and "-cb" in cmd
    py = LlamaServer(gguf, engine="llama-cpp-python", lora=lora).command()
    assert py[:3] == [sys.executable, "-m", "edgellm.deploy.server"]
    assert py[py.index("--lora_path") + 1] == str(lora)


def test_stop_ends_the_whole_process_group(tmp_path, monkeypatch):
    """A server that starts a child of its own: stopping it leaves neither behind."""
    import os

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF")
    pidfile = tmp_path / "child.pid"
    port = free_port()
    script = (f"import subprocess, sys, http.server, json\n"
              f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
              f"class H(http.server.BaseHTTPRequestHandler):\n"
              f"    def do_GET(self):\n"
              f"        self.send_response(200); self.end_headers(); self.wfile.write(b'{{}}')\n"
              f"    def log_message(self, *a): pass\n"
              f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    srv = LlamaServer(fake, port=port, startup_timeout=30)
    monkeypatch.setattr(srv, "command", lambda: [sys.executable, "-c", script])
    with srv:
        assert srv.running
        child = int(pidfile.read_text())
    assert not srv.running
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server's child outlived it")


@pytest.mark.llamacpp
@pytest.mark.tools
def test_edgellm_serve_stops_on_sigterm_and_leaves_nothing(tmp_path):
    """``edgellm serve`` as a user runs it: ready when its URL answers, SIGTERM stops it with
    exit 0 and its record, and the port no longer answers (no orphan server)."""
    import os
    import signal
    import subprocess

    from edgellm.deploy.server import check_endpoint
    from edgellm.models import default_gguf

    port = free_port()
    from pathlib import Path

    edgellm = str(Path(sys.executable).parent / "edgellm")
    proc = subprocess.Popen([edgellm, "serve", "--model",
                             str(default_gguf()), "--port", str(port), "--threads", "1",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}/v1"
    import selectors

    seen = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while not any(url in line for line in seen):     # ready: it printed its URL
            assert proc.poll() is None, "".join(seen) + proc.stderr.read()
            assert time.monotonic() < deadline, "no URL printed in 120 s: " + "".join(seen)
            if sel.select(timeout=0.5):
                seen.append(proc.stderr.readline())
        check_endpoint(url, timeout=5.0)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    rec = json.loads(out)
    assert rec["stopped_by"] == "signal" and rec["url"] == url
    with pytest.raises(ServerError):
        check_endpoint(url, timeout=1.0)
