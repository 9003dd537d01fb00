#!/usr/bin/env bash
# Set up (cached) and run the demo: a generated tiny Wan 2.1 checkpoint sampled by the pack on
# 2 CPU ranks through a real headless ComfyUI, queued over its HTTP API. Prints where the output is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$here/scripts/setup.sh" | tail -n 2)"
export COMFYUI_PATH
exec "$PDIT_PY" "$here/scripts/demo.py" "$@"
