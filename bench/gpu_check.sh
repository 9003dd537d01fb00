#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU (the device tool's, or yours): starts an NCCL world-size-1 group,
# checks bf16 parity against ComfyUI's native model at Wan 2.1 1.3B full depth (random weights) and times pack vs
# native per step with sdpa / flash / sage / compile, then the GGUF dequantization kernels on the GPU (bit-equal to
# gguf, eager and compiled) and a Q8_0 copy of the model (parity, s/step). Meant to end within 10 minutes on an H100
# (not yet run on one: `--gguf ''` skips the GGUF part if time is short).
#
#   bench/gpu_check.sh [gpu_check.py options]
#
# Needs python3 with CUDA torch, and ComfyUI: $COMFYUI_PATH, or .gpu/comfyui as bench/prepare_gpu_carry.sh makes it
# (with .gpu/wheels for the packages that machine lacks). With the device tool: run prepare_gpu_carry.sh here, then
# run this there with carry [".gpu"]. The log lands in $OUT (or /tmp) as gpu_check.log.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/pdit_site.XXXXXX")"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .gpu/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export COMFYUI_PATH="${COMFYUI_PATH:-$here/.gpu/comfyui}"
if [ -n "${PDIT_FORCE_AV_STUB:-}" ] || ! "${PDIT_PY:-python3}" -c 'import av' 2>/dev/null; then
  # PyAV (video files) is imported by ComfyUI's node API but unused here, and too big to carry to a GPU machine: a
  # stand-in package on PYTHONPATH (so spawned ranks see it too) whose every name is an inert class
  stub="$(mktemp -d "${TMPDIR:-/tmp}/pdit_av.XXXXXX")"
  mkdir -p "$stub/av/subtitles"
  cat >"$stub/av/__init__.py" <<'PY'
class _Inert(type):
    def __getattr__(cls, name):
        return _Inert(name, (), {})
def __getattr__(name):
    return _Inert(name, (), {})
PY
  for m in container subtitles/__init__ subtitles/stream; do echo 'from av import __getattr__' >"$stub/av/$m.py"; done
  export PYTHONPATH="$stub${PYTHONPATH:+:$PYTHONPATH}"
  echo "note: PyAV missing: a stand-in package is used (no video is read or written here)"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
if [ -z "${PDIT_VAE_ONLY:-}" ]; then
  timeout 570 "${PDIT_PY:-python3}" bench/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
fi
# VAE section (bench/vae.py): the Parallel VAE's decode on one NCCL rank vs ComfyUI's VAE Decode and VAE Decode
# (Tiled), the release's Wan 2.1 VAE width (random weights), 480p and 720p latents of 81 frames: time, peak memory,
# and each tiled result's distance from the untiled decode. PDIT_VAE_ONLY=1 runs only this section (about 4 min on an
# H100 by estimate; not yet run on one), PDIT_SKIP_VAE=1 leaves it out.
if [ -z "${PDIT_SKIP_VAE:-}" ]; then
  timeout "${PDIT_VAE_TIMEOUT:-300}" "${PDIT_PY:-python3}" bench/vae.py --device cuda --dim 96 --frames 21 --ranks 1 \
    2>&1 | tee "${OUT:-/tmp}/gpu_check_vae.log"
fi
