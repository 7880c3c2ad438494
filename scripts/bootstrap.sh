#!/usr/bin/env bash
# Installs what the gateway needs on a fresh Debian/Ubuntu machine, and nothing twice.
#   scripts/bootstrap.sh demo   Mosquitto + a virtualenv with the project
#   scripts/bootstrap.sh test   the same + the servers and browser the tests start
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:-demo}

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

# ---------------------------------------------------------------- system packages
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
if [ "$purpose" = test ]; then
  command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -f /usr/share/doc/opencv-doc/examples/data/vtest.avi ] || need+=(opencv-doc)
  # the PostgreSQL pool's tests start a real server from these binaries
  [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
  # Chinese glyphs for the dashboard screenshots the browser tests save
  [ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || need+=(fonts-wqy-microhei)
fi
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "missing system packages: ${need[*]} — install them with your package manager"
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing system packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# mosquitto lives in /usr/sbin, which is not on every user's PATH
export PATH="$PATH:/usr/sbin"

# ---------------------------------------------------------------- python environment
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "Python 3.11 or newer is needed (found $("$python" --version 2>&1)); set PYTHON=..."
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$python" -m venv .venv
fi
extras="aggregator,edge,simulators"
[ "$purpose" = test ] && extras="$extras,dev"
hash=$(sha256sum pyproject.toml | cut -c1-16)
stamp=".venv/.installed-$hash-${extras//,/-}"
# the test install holds everything the demo needs: `make demo` after `make test` installs nothing
everything=".venv/.installed-$hash-aggregator-edge-simulators-dev"
if [ ! -f "$stamp" ] && [ ! -f "$everything" ]; then
  say "installing the project into .venv ($extras)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
say "ready ($purpose)"
