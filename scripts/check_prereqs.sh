#!/usr/bin/env bash
# What `make course` / `make test` / `make setup` need from the system, checked in a second,
# before any long step.  Stops (exit 1) with one message naming every missing part and how to
# get it; for `test`, parts whose tests only skip locally are reported in one line, not fatal.
#
#   bash scripts/check_prereqs.sh setup|course|test [ARGS of `edgellm course run`]
#
# Python 3.11 always; a C/C++ compiler and cmake only while the virtual environment is not set
# up yet (the first `make` compiles llama-cpp-python); npm for `course` unless --no-web-assets
# is among ARGS (or the web assets are already installed); for `test`: npm, Chromium and the
# npm packages of tests/browser are optional (their tests skip; CI installs them).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
target=${1:-setup}
shift || true
case "$target" in setup|course|test) ;; *)
  echo "check_prereqs: unknown target '$target'; use setup, course or test" >&2; exit 2 ;;
esac

missing=()   # "what: how to get it"
have() { command -v "$1" >/dev/null 2>&1; }
is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }
SYSDEPS="sudo bash scripts/ci_system_deps.sh"

# Python 3.11: the one the environment was built with, $PYTHON, or python3.11 / python3 on PATH
py_ok=""
if [ -x "$VENV/bin/python" ] && is_py311 "$VENV/bin/python"; then py_ok=1
elif [ -n "${PYTHON:-}" ]; then is_py311 "$PYTHON" && py_ok=1
else for c in python3.11 python3; do have "$c" && is_py311 "$c" && { py_ok=1; break; }; done
fi
[ -n "$py_ok" ] || missing+=("Python 3.11: install python3.11 (Debian/Ubuntu: apt-get install \
python3.11 python3.11-venv; or pyenv install 3.11), or point to one: make PYTHON=/path/to/python3.11")

# compiler + cmake: only while llama-cpp-python is not installed in the environment yet
if ! compgen -G "$VENV/lib/python3*/site-packages/llama_cpp_python-*.dist-info" >/dev/null; then
  cc_ok=""; cxx_ok=""
  for c in cc gcc clang; do have "$c" && { cc_ok=1; break; }; done
  for c in c++ g++ clang++; do have "$c" && { cxx_ok=1; break; }; done
  [ -n "$cc_ok" ] && [ -n "$cxx_ok" ] || missing+=("a C/C++ compiler (the first setup compiles \
llama-cpp-python): Debian/Ubuntu: apt-get install build-essential; macOS: xcode-select --install")
  have cmake || missing+=("cmake (the first setup compiles llama-cpp-python): Debian/Ubuntu: \
apt-get install cmake; macOS: brew install cmake")
fi

# the offline web assets of the rendered course (MathJax, Jupyter widgets): npm installs them
web_assets_installed() {
  local nm=${EDGELLM_NODE_MODULES:-${EDGELLM_CACHE:-$HOME/.cache/edgellm}/web/node_modules}
  [ -d "$nm/mathjax" ] && [ -d "$nm/@jupyter-widgets/html-manager/dist" ] \
    && [ -f "$nm/requirejs/require.js" ]
}
if [ "$target" = course ]; then
  no_web=""
  for a in "$@"; do [ "$a" = --no-web-assets ] || [ "$a" = --no-render ] && no_web=1; done
  if [ -z "$no_web" ] && ! have npm && ! web_assets_installed; then
    missing+=("npm (installs MathJax and the Jupyter widgets manager of the rendered course once): \
Debian/Ubuntu: apt-get install nodejs npm, or $SYSDEPS; macOS: brew install node; or render \
without them: make course COURSE_ARGS=--no-web-assets")
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  {
    echo "make $target: missing what it needs (nothing was started):"
    for m in "${missing[@]}"; do echo "  - $m"; done
    echo "  (README.md, 'What you need', lists every part)"
  } >&2
  exit 1
fi

if [ "$target" = test ]; then
  skip=()
  have npm && have node || skip+=("npm/Node.js")
  have chromium || [ -x /usr/bin/chromium ] || [ -n "${CHROMIUM:-}" ] || skip+=("Chromium")
  [ -d tests/browser/node_modules/playwright-core ] || skip+=("tests/browser/node_modules")
  if [ ${#skip[@]} -gt 0 ]; then
    list=$(IFS=,; echo "${skip[*]}"); list=${list//,/, }
    if [ "${CI:-}" = true ]; then
      echo "make test: missing $list; with CI=true their tests fail: run $SYSDEPS" >&2
    else
      echo "make test: no $list here: the browser and web-asset tests will be skipped" \
           "(install them with $SYSDEPS)"
    fi
  fi
fi
exit 0
