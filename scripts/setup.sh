#!/usr/bin/env bash
# Create .venv (Python 3.11), install torch first, then the pinned lock, then edgellm itself,
# and cache the offline default model. Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

py=${PYTHON:-}
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      py=$c; break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "setup: Python 3.11 is needed and none was found; install python3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2
  exit 1
fi

want=$(cat requirements.lock pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.edgellm-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import edgellm' 2>/dev/null; then
  exit 0
fi

echo "setup: creating $VENV and installing the pinned packages (first time: ~15 min: llama-cpp-python and llama.cpp's tools compile)"
[ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch first, so the resolver keeps this build instead of pulling another (e.g. CUDA) one
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q -r requirements.lock
"${pip[@]}" install -q --no-deps -e .
"$VENV/bin/edgellm" fetch --json >/dev/null
# llama.cpp's tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-server) from the
# llama-cpp-python sdist's source, built once into the cache (~5 min on 2 cores)
"$VENV/bin/python" -m edgellm.deploy.llamacpp_quant
echo "$want" > "$stamp"
echo "setup: done"
