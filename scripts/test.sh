#!/usr/bin/env bash
# Set up (cached) and run the tests on every ComfyUI host this machine has: unit, multi-rank parity on CPU/gloo, and
# end-to-end through a real headless ComfyUI. Extra arguments go to pytest (e.g. -m "not e2e", -k parity).
#
#   ./scripts/test.sh              every test on ComfyUI 0.33.0 (../shared/hosts/comfyui-0.33.0, when present), then
#                                  every test that touches ComfyUI on 0.3.75 (the fresh-machine default from PyPI);
#                                  without the 0.33.0 tree, every test on 0.3.75
#   COMFYUI_PATH=DIR ./scripts/test.sh   every test on that ComfyUI only (yours, or one of the above)
#   ./scripts/test.sh --quick      only the tests that start no rank process and no server (each host as above)
#
# Each host gets a virtual environment of its own (scripts/setup.sh). The host trees are never written to.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
second_host="${PDIT_SECOND_HOST:-$here/../shared/hosts/comfyui-0.33.0}"

run_on() {  # run_on HOST_PATH_OR_EMPTY pytest-args...: one host's run, in a subshell of its own
  local host="$1"; shift
  (
    if [ -n "$host" ]; then export COMFYUI_PATH="$host"; else unset COMFYUI_PATH; fi
    eval "$("$here/scripts/setup.sh" | tail -n 2)"
    export COMFYUI_PATH
    echo "=== ComfyUI host: $COMFYUI_PATH ($("$PDIT_PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import comfyui_version; print(comfyui_version.__version__)' "$COMFYUI_PATH" 2>/dev/null || echo '?'))"
    cd "$here"
    "$PDIT_PY" -m pytest "$@"
  )
}

if [ -n "${COMFYUI_PATH:-}" ]; then
  run_on "$COMFYUI_PATH" "$@"
elif [ -d "$second_host" ]; then
  status=0
  run_on "$(cd "$second_host" && pwd)" "$@" || status=$?
  # the engine's own tests (no ComfyUI in them) ran above; here what touches ComfyUI
  run_on "" --comfyui-only "$@" || status=$?
  exit $status
else
  echo "note: no second ComfyUI host at $second_host: testing on ComfyUI 0.3.75 only" >&2
  run_on "" "$@"
fi
