#!/usr/bin/env bash
# System parts of the browser test and of the offline rendered course, installed idempotently:
#   * Debian's Chromium and fonts (apt), driven by playwright-core (Playwright's own browser
#     download is never used: it needs the internet);
#   * the npm packages pinned in tests/browser/package-lock.json: playwright-core, MathJax 2.7,
#     the Jupyter widgets HTML manager and require.js (copied into the rendered course).
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

# npm packages: reinstall only when the lock file changed since the last install
web=tests/browser
stamp="$web/node_modules/.edgellm-lock-sha256"
want=$(sha256sum "$web/package-lock.json" | cut -c1-64)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -d "$web/node_modules/playwright-core" ]; then
  echo "ci_system_deps: npm ci in $web"
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing, but be explicit
  (cd "$web" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
fi

chromium --version 2>/dev/null | head -1 || true
echo "ci_system_deps: node $(node --version), playwright-core $(node -p "require('./$web/node_modules/playwright-core/package.json').version")"
