"""An OpenAI-compatible completion server on this machine, and a client for any such endpoint.

:class:`LlamaServer` starts one of two engines on a GGUF, bound to 127.0.0.1 on a free port,
waits until ``/v1/models`` answers, and always stops it on exit:

* ``llama-server``: llama.cpp's own server, built from the llama-cpp-python sdist
  (:func:`edgellm.deploy.llamacpp.build_tools`), with ``parallel`` slots (``-np``) and continuous
  batching: several requests decode in one batch;
* ``llama-cpp-python``: llama-cpp-python's server (``python -m llama_cpp.server``, the
  ``server`` extra), which answers one request at a time.

The server runs in its own process group and, on Linux, is told to stop when the process that
started it dies (``PR_SET_PDEATHSIG``): a notebook kernel that restarts leaves no server behind.
::

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
        raise ServerError(f"URL {url!r} must start with http:// or https:// "
                          "(e.g. http://127.0.0.1:8080/v1)")
    target = _base(url) + "/v1/models"
    try:
        return _get_json(target, timeout=timeout, headers=_auth())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(f"no OpenAI-compatible endpoint answers at {url} ({target}: "
                          f"{reason}); start the server (e.g. edgellm serve "
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


ENGINES = ("llama-server", "llama-cpp-python")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LlamaServer:
    """An OpenAI-compatible server on ``gguf``, as a context manager.

    ``engine`` (:data:`ENGINES`), ``port`` (default: a free one; a port in use is an error that
    suggests a free one), ``n_threads``, ``ctx`` (context length, shared by the slots),
    ``parallel`` (llama-server's slots), ``lora`` (a GGUF LoRA applied on top);
    ``startup_timeout`` bounds the health check.  ``.url`` is ``http://127.0.0.1:PORT``.
    """

    def __init__(self, gguf, *, engine: str = "llama-cpp-python", port: int | None = None,
                 n_threads: int = 1, ctx: int = 2048, parallel: int = 1, lora=None,
                 startup_timeout: float = 120.0, extra_bufts: bool = False):
        self.gguf = Path(gguf)
        if engine not in ENGINES:
            raise ServerError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
        if not self.gguf.is_file():
            raise ServerError(f"no GGUF file at {self.gguf}; give the path of a .gguf model")
        self.lora = None if lora is None else Path(lora)
        if self.lora is not None and not self.lora.is_file():
            raise ServerError(f"no GGUF LoRA at {self.lora}; write one with edgellm export "
                              "--adapter DIR --format gguf")
        if port is not None and not port_free(port):
            raise ServerError(f"port {port} on 127.0.0.1 is in use; pick another (e.g. "
                              f"--port {free_port()}) or leave --port out for a free one")
        self.engine, self.port = engine, port or free_port()
        self.n_threads, self.ctx, self.startup_timeout = n_threads, ctx, startup_timeout
        self.parallel, self.extra_bufts = parallel, extra_bufts
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        """llama-server's command line, or ``python -m edgellm.deploy.server …``:
        llama_cpp.server's own command line, run through :func:`main` (which sets llama.cpp's
        model defaults first)."""
        if self.engine == "llama-server":
            from edgellm.deploy.llamacpp import build_tools

            cmd = [str(build_tools(("llama-server",)) / "llama-server"), "-m", str(self.gguf),
                   "--host", "127.0.0.1", "--port", str(self.port), "-t", str(self.n_threads),
                   "-tb", str(self.n_threads), "-c", str(self.ctx), "-np", str(self.parallel),
                   "-cb", "--no-webui"]
            if not self.extra_bufts:
                cmd.append("--no-repack")   # see main(): llama.cpp's extra buffer types
            return cmd + ([] if self.lora is None else ["--lora", str(self.lora)])
        cmd = [sys.executable, "-m", "edgellm.deploy.server",
               "--extra-bufts" if self.extra_bufts else "--no-extra-bufts",
               "--model", str(self.gguf),
               "--host", "127.0.0.1", "--port", str(self.port), "--n_threads",
               str(self.n_threads), "--n_ctx", str(self.ctx)]
        return cmd + ([] if self.lora is None else ["--lora_path", str(self.lora)])

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-1500:]

    def start(self) -> LlamaServer:
        if self.engine == "llama-cpp-python":
            try:
                import llama_cpp.server  # noqa: F401  (fastapi, uvicorn … of the server extra)
            except ImportError as e:
                raise ServerError(f"llama-cpp-python's server is not installed ({e}); install "
                                  "the extra: pip install 'llama-cpp-python[server]'") from None
        command = self.command()
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                     env={**os.environ, "OMP_NUM_THREADS": str(self.n_threads)})
        try:
            return self._wait_ready()
        except BaseException:                      # Ctrl-C or SIGTERM while starting, too
            self.stop()
            raise

    def _wait_ready(self) -> LlamaServer:
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
        """Terminate its process group, wait, kill if it does not stop: never leaves a server
        (or a child of it) behind."""
        import signal

        if self.proc is not None and self.proc.poll() is None:
            group = self.proc.pid                  # its own session: group id = its pid
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
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
