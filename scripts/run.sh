#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv (torch pinned, see pyproject.toml) and then runs a command.
#
# usage: bash scripts/run.sh test [PYTEST_ARGS ...]   install the dev extras (+ Debian chromium when root), run the tests
#        bash scripts/run.sh demo [DEMO_ARGS ...]     install the space extras, launch the Space on the shipped
#                                                     checkpoint (scripts/demo.py; `demo --help` lists its options)
#        bash scripts/run.sh --help                   this text
#
# Environment: PYTHON (the Python that creates the venv; default python3), SKIN_DUALNET_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${SKIN_DUALNET_VENV:-$ROOT/.venv}"

setup_venv() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[setup] creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.skin-dualnet-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        echo "[setup] installing skin-dualnet[$extras] (torch==2.14.1, torchvision==0.29.1)"
        # No --quiet: the download/install progress shows (about 2-3 minutes from a nearby mirror).
        "$VENV/bin/python" -m pip install --disable-pip-version-check -e ".[$extras]"
        touch "$stamp"
    fi
}

install_chromium() {
    if [ -x /usr/bin/chromium ]; then return; fi
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Debian chromium for the browser test"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
    else
        echo "[setup] /usr/bin/chromium not found and cannot apt-get it: the browser test will be skipped"
    fi
}

command="${1:-}"
shift || true
case "$command" in
    -h|--help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        ;;
    test)
        setup_venv dev
        install_chromium
        export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
        exec "$VENV/bin/python" -m pytest -q -ra "$@"
        ;;
    demo)
        setup_venv space
        exec "$VENV/bin/python" scripts/demo.py "$@"
        ;;
    *)
        echo "usage: bash scripts/run.sh test [PYTEST_ARGS ...] | demo [DEMO_ARGS ...] | --help" >&2
        exit 2
        ;;
esac
