#!/usr/bin/env bash
# Install everything the tests need (into .venv, created if missing) and run the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  # pip's torch 2.14.1 is the CUDA build: the environment takes ~6.5 GB. Say so before pip fails
  # with a bare "No space left on device" (what sank one CI run).
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((7 * 1024 * 1024)) ]; then
    echo "warning: $((${free_kb:-0} / 1024)) MiB free on this disk; the test environment (.venv) needs about 6.5 GB" >&2
  fi
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[serve,onnx,test]'
# The browser test drives Debian's Chromium (Playwright's own browser download does not work offline).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser test ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/celluscan-chromium.log 2>&1 \
    || echo "note: could not install chromium (see /tmp/celluscan-chromium.log); the browser test will skip"
fi
exec .venv/bin/python -m pytest -q "$@"
