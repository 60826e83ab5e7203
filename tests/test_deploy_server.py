"""edgellm.deploy.server: an endpoint that does not answer fails within seconds naming its URL;
llama.cpp's OpenAI-compatible server starts on the default GGUF on a free port, answers
/v1/models and /v1/completions, and is stopped afterwards (llamacpp marker); a server that
dies while starting reports its output."""

import os
import socket
import sys
import time

import pytest

from edgellm.deploy.server import LlamaServer, ServerError, check_endpoint, complete, free_port


def test_unreachable_url_fails_within_seconds_naming_it():
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.perf_counter()
    with pytest.raises(ServerError, match=f"127.0.0.1:{port}"):
        check_endpoint(url)
    with pytest.raises(ServerError, match=f"127.0.0.1:{port}"):
        complete(url, "hi", max_tokens=1)
    assert time.perf_counter() - t0 < 5


def test_silent_listener_times_out_within_seconds():
    """A port that accepts connections but never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(ServerError, match=url):
            check_endpoint(url, timeout=1.0)
        assert time.perf_counter() - t0 < 5


def test_bad_scheme_and_missing_gguf(tmp_path):
    with pytest.raises(ServerError, match="http://"):
        check_endpoint("127.0.0.1:8080")
    with pytest.raises(ServerError, match="no GGUF"):
        LlamaServer(tmp_path / "none.gguf")


def test_a_server_that_dies_while_starting_reports_its_output(tmp_path, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf")
    srv = LlamaServer(fake, startup_timeout=60)
    monkeypatch.setattr(srv, "command", lambda: [sys.executable, "-c",
                                                 "import sys; print('boom'); sys.exit(3)"])
    with pytest.raises(ServerError, match="(?s)exited with code 3.*boom"):
        srv.start()
    assert not srv.running


@pytest.mark.llamacpp
def test_server_on_the_default_gguf_answers_and_stops():
    from edgellm.models import default_gguf

    with LlamaServer(default_gguf(), n_threads=1, ctx=512) as srv:
        assert srv.running and srv.url.startswith("http://127.0.0.1:")
        models = check_endpoint(srv.url)
        assert models["data"] and models["data"][0]["id"]
        text = complete(srv.url + "/v1", "def add(a, b):", max_tokens=8, temperature=0.0)
        assert isinstance(text, str) and text.strip()
        again = complete(srv.url, "def add(a, b):", max_tokens=8, temperature=0.0)
        assert again == text  # greedy: the same text
        url = srv.url
    assert not srv.running and srv.proc.returncode is not None
    with pytest.raises(ServerError):
        check_endpoint(url, timeout=1.0)


@pytest.mark.llamacpp
@pytest.mark.tools
def test_llama_server_streams_to_concurrent_clients_and_stops():
    """llama.cpp's own server (built from the sdist) with 2 slots: a streamed greedy completion
    equal to the non-streamed one, a 2-client load test without errors, nothing left after."""
    from edgellm.deploy.loadtest import loadtest, stream_completion
    from edgellm.models import default_gguf

    with LlamaServer(default_gguf(), engine="llama-server", n_threads=2, ctx=1024,
                     parallel=2) as srv:
        text = complete(srv.url, "def add(a, b):", max_tokens=12, temperature=0.0)
        streamed = stream_completion(srv.url, "def add(a, b):", max_tokens=12)
        assert streamed["text"] == text and 1 < streamed["tokens"] <= 12
        rec = loadtest(srv.url + "/v1", ["def add(a, b):", "import os\n"], clients=2,
                       requests=2, max_tokens=16, deadline_s=120)
        assert rec["errors"] == 0 and rec["n_ok"] == 4 and rec["tokens_per_s"] > 0
        pid = srv.proc.pid
    assert not srv.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


@pytest.mark.integration
def test_white_box_loss_with_a_teacher_of_another_vocabulary_is_refused(tmp_path, capsys):
    """--teacher-gguf of another vocabulary with a white-box loss: one message, exit 2, before
    any model load (the check reads both GGUFs' token lists)."""
    import gguf

    from edgellm.cli import main

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(100)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["distill", "--loss", "fkl", "--teacher-gguf", str(path)]) == 2
    err = capsys.readouterr().err
    assert "100 tokens" in err and "seqkd" in err, err
