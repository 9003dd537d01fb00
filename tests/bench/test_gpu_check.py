"""bench/gpu_check.py's CPU path (gloo, tiny preset): the script a GPU session runs first must not rot between the
rare sessions that have a GPU. Checks it finishes, asserts its parity bound, and prints its table."""
import os
import subprocess
import sys

import pytest

import comfy_host

pytestmark = pytest.mark.multirank


def test_gpu_check_runs_on_cpu():
    repo = comfy_host.REPO
    env = {**os.environ, "COMFYUI_PATH": comfy_host.comfyui_path()}
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--preset", "tiny", "--latent",
                        "2,8,8", "--kernels", "sdpa,flash", "--no-compile"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "parity, one forward" in r.stdout and "pack    sdpa" in r.stdout
    assert "flash: not installed (pip install flash-attn" in r.stdout
    assert "GGUF Q8_0 pack vs native on its dequantized weights" in r.stdout and "Q6_K  yes" in r.stdout
    print(r.stdout[-1500:])
