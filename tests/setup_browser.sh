#!/usr/bin/env bash
# Installs what the browser tests (tests/test_web_*.py) need on a fresh Debian machine, as root:
# Debian's chromium (/usr/bin/chromium), the Playwright Python driver (no bundled browsers:
# the tests launch /usr/bin/chromium) and ComfyUI 0.3.75's official frontend wheel.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail

FRONTEND="comfyui-frontend-package==1.32.9"   # the version ComfyUI 0.3.75's requirements pin
PIP=(python3 -m pip install --disable-pip-version-check --quiet)

if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if ! python3 -c "import playwright" 2>/dev/null; then
    "${PIP[@]}" "playwright==1.65.2"   # the version the browser tests have run on
fi

if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("comfyui-frontend-package"))' 2>/dev/null)" != "1.32.9" ]; then
    "${PIP[@]}" "$FRONTEND"
fi

/usr/bin/chromium --version
python3 -c "import playwright, comfyui_frontend_package as f; print('playwright ok; frontend at', f.__path__[0])"
