#!/usr/bin/env bash
# Prepare .gpu/ (ignored by git) for bench/gpu_check.sh on a machine that reaches no package registry: a copy of
# the test host ComfyUI (without its tests and API nodes) and wheels for Python 3.12 of what such a machine's
# image lacks (its python3 has torch, transformers, safetensors, numpy). Stays under the device tool's 64 MiB.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$here/scripts/setup.sh" | tail -n 2)"
rm -rf "$here/.gpu" && mkdir -p "$here/.gpu/wheels"
cp -r "$COMFYUI_PATH" "$here/.gpu/comfyui"
rm -rf "$here/.gpu/comfyui/"{tests,tests-unit,comfy_api_nodes}
find "$here/.gpu/comfyui" -name __pycache__ -prune -exec rm -rf {} +
"$PDIT_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$here/.gpu/wheels" \
  einops torchsde trampoline kornia kornia_rs spandrel diffusers psutil gguf
du -sh "$here/.gpu"
