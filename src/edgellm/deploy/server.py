"""An OpenAI-compatible completion server on this machine, and a client for any such endpoint.

:class:`LlamaServer` starts llama-cpp-python's server (``python -m llama_cpp.server``, the
``server`` extra) on a GGUF, bound to 127.0.0.1 on a free port, waits until ``/v1/models``
answers, and always stops it on exit::

    with LlamaServer(default_gguf()) as srv:
        text = complete(srv.url, "def fib(n):", max_tokens=32, temperature=0.0)

:func:`complete` speaks the ``/v1/completions`` protocol with the standard library only, so the
same code reaches a cloud API (a larger teacher for black-box distillation) or this server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgellm.errors import EdgeLLMError


class ServerError(EdgeLLMError, RuntimeError):
    """A server that does not start or an endpoint that does not answer; says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base(url: str) -> str:
    """``http://host:port`` from an endpoint URL given with or without ``/v1``."""
    url = url.rstrip("/")
    for tail in ("/v1/completions", "/v1/models", "/v1"):
        if url.endswith(tail):
            return url[: -len(tail)]
    return url


def _get_json(url: str, *, timeout: float, headers: dict | None = None,
              data: dict | None = None) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                          **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _auth() -> dict:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_endpoint(url: str, *, timeout: float = 3.0) -> dict:
    """``GET {url}/v1/models`` within ``timeout`` seconds: the served models, or a
    :class:`ServerError` naming the URL."""
    if not url.startswith(("http://", "https://")):
        raise ServerError(f"teacher URL {url!r} must start with http:// or https:// "
                          "(e.g. http://127.0.0.1:8080/v1)")
    target = _base(url) + "/v1/models"
    try:
        return _get_json(target, timeout=timeout, headers=_auth())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(f"no OpenAI-compatible endpoint answers at {url} ({target}: "
                          f"{reason}); start the server (e.g. python -m llama_cpp.server "
                          "--model FILE.gguf) or check the URL") from None


def complete(url: str, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = 0, model: str | None = None,
             timeout: float = 300.0) -> str:
    """The text an OpenAI-compatible ``/v1/completions`` endpoint continues ``prompt`` with."""
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
               "top_p": top_p}
    if seed is not None:
        payload["seed"] = seed
    if model is not None:
        payload["model"] = model
    target = _base(url) + "/v1/completions"
    try:
        out = _get_json(target, timeout=timeout, headers=_auth(), data=payload)
    except urllib.error.HTTPError as e:
        raise ServerError(f"{target} refused the request ({e.code}): "
                          f"{e.read().decode(errors='replace')[-300:]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServerError(f"{target} did not answer: {getattr(e, 'reason', e)}") from None
    try:
        return out["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        raise ServerError(f"{target} answered without choices[0].text: "
                          f"{json.dumps(out)[:300]}") from None


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server on ``gguf``, as a context manager.

    ``port`` (default: a free one), ``n_threads`` and ``ctx`` (context length) go to the
    server; ``startup_timeout`` bounds the health check.  ``.url`` is ``http://127.0.0.1:PORT``.
    """

    def __init__(self, gguf, *, port: int | None = None, n_threads: int = 1, ctx: int = 2048,
                 startup_timeout: float = 120.0, extra_bufts: bool = False):
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise ServerError(f"no GGUF file at {self.gguf}; give the path of a .gguf model")
        self.port = port or free_port()
        self.n_threads, self.ctx, self.startup_timeout = n_threads, ctx, startup_timeout
        self.extra_bufts = extra_bufts
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        """``python -m edgellm.deploy.server …``: llama_cpp.server's own command line, run
        through :func:`main` (which sets llama.cpp's model defaults first)."""
        return [sys.executable, "-m", "edgellm.deploy.server",
                "--extra-bufts" if self.extra_bufts else "--no-extra-bufts",
                "--model", str(self.gguf),
                "--host", "127.0.0.1", "--port", str(self.port), "--n_threads",
                str(self.n_threads), "--n_ctx", str(self.ctx)]

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-1500:]

    def start(self) -> LlamaServer:
        try:
            import llama_cpp.server  # noqa: F401  (fastapi, uvicorn … of the server extra)
        except ImportError as e:
            raise ServerError(f"llama-cpp-python's server is not installed ({e}); install "
                              "the extra: pip install 'llama-cpp-python[server]'") from None
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, "OMP_NUM_THREADS": str(self.n_threads)})
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self._tail()
                self.stop()
                raise ServerError(f"the llama.cpp server on {self.gguf} exited with code "
                                  f"{self.proc.returncode} while starting; its output:\n{tail}")
            try:
                check_endpoint(self.url, timeout=1.0)
                return self
            except ServerError:
                pass
            if time.monotonic() > deadline:
                tail = self._tail()
                self.stop()
                raise ServerError(f"the llama.cpp server on {self.gguf} did not answer at "
                                  f"{self.url}/v1/models within {self.startup_timeout:.0f} s; "
                                  f"its output:\n{tail}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate, wait, kill if it does not stop: never leaves a server behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run llama-cpp-python's server (its own flags), with llama.cpp's *extra CPU buffer types*
    (weights repacked for AMX / other CPU kernels) off unless ``--extra-bufts`` is given: on
    CPUs with AMX, decoding a Q4_1 model through them crashes this llama-cpp-python build, and
    a server that dies on its first request is worse than a slightly slower one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = "--extra-bufts" in argv
    argv = [a for a in argv if a not in ("--extra-bufts", "--no-extra-bufts")]
    import llama_cpp.llama_cpp as lib  # the ctypes bindings Llama() calls

    default_params = lib.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = extra
        return params

    lib.llama_model_default_params = model_params  # read by Llama() when it loads
    from llama_cpp.server.__main__ import main as serve

    sys.argv = ["llama_cpp.server", *argv]
    serve()


if __name__ == "__main__":
    main()
