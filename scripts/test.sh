#!/usr/bin/env bash
# Set up (cached) and run every test: unit, multi-rank parity on CPU/gloo, and end-to-end through a
# real headless ComfyUI. Extra arguments go to pytest (e.g. -m "not e2e", -k parity).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$here/scripts/setup.sh" | tail -n 2)"
export COMFYUI_PATH
cd "$here"
exec "$PDIT_PY" -m pytest "$@"
