#!/usr/bin/env bash
# System parts of the browser test and of the offline rendered course, installed idempotently:
#   * Debian's Chromium and fonts (apt), driven by playwright-core (Playwright's own browser
#     download is never used: it needs the internet);
#   * the npm packages of the browser test (tests/browser/package-lock.json: playwright-core),
#     installed in tests/browser/node_modules;
#   * the offline web assets of the rendered course (src/edgellm/course/web/package-lock.json:
#     MathJax 2.7, the Jupyter widgets HTML manager, require.js), installed in the cache folder
#     where the library looks for them: ${EDGELLM_CACHE:-~/.cache/edgellm}/web/node_modules.
# Run as root (or with sudo available). Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || need_apt+=(fonts-dejavu-core)
dpkg -s fonts-liberation >/dev/null 2>&1 || need_apt+=(fonts-liberation)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)

if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "ci_system_deps: need root (or sudo) to install: ${need_apt[*]}" >&2; exit 1
    fi
  fi
  echo "ci_system_deps: apt-get install ${need_apt[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# The npm parts belong to the user who runs the course: under `sudo bash ...` they are installed
# as $SUDO_USER (with that user's home), not as root.
as_user() {
  if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    sudo -u "$SUDO_USER" -H -- "$@"
  else
    "$@"
  fi
}

# `npm ci` of a package-lock.json into $2 (its package.json and lock copied there first when $2
# is another folder), only when the lock changed since the last install or $3 is missing.
npm_ci() {
  local lock_dir=$1 dest=$2 check=$3
  local stamp="$dest/node_modules/.edgellm-lock-sha256"
  local want
  want=$(sha256sum "$lock_dir/package-lock.json" | cut -c1-64)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -e "$dest/node_modules/$check" ]; then
    return 0
  fi
  echo "ci_system_deps: npm ci in $dest"
  as_user mkdir -p "$dest"
  if [ "$(cd "$lock_dir" && pwd)" != "$(as_user sh -c 'cd "$1" && pwd' sh "$dest")" ]; then
    as_user cp "$lock_dir/package.json" "$lock_dir/package-lock.json" "$dest/"
  fi
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing, but be explicit
  (cd "$dest" && as_user env PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
     npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" | as_user tee "$stamp" >/dev/null
}

# playwright-core for the browser test, in tests/browser/node_modules (where the test finds it)
npm_ci tests/browser tests/browser playwright-core/package.json

# the offline web assets of the rendered course, where the library looks for them
# (edgellm.course.render.node_modules(): $EDGELLM_NODE_MODULES, else <cache>/web/node_modules)
if [ -n "${EDGELLM_NODE_MODULES:-}" ]; then
  echo "ci_system_deps: EDGELLM_NODE_MODULES=$EDGELLM_NODE_MODULES is used as it is (not installed)"
else
  web_dest=$(as_user sh -c 'echo "${EDGELLM_CACHE:-$HOME/.cache/edgellm}/web"')
  npm_ci src/edgellm/course/web "$web_dest" mathjax/MathJax.js
fi

chromium --version 2>/dev/null | head -1 || true
echo "ci_system_deps: node $(node --version), playwright-core $(node -p "require('./tests/browser/node_modules/playwright-core/package.json').version")"
