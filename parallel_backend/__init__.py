"""Parallel DiT backend: pure torch + diffusers + safetensors. Never imports ComfyUI."""
