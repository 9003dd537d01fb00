"""Parallel DiT backend: torch + safetensors. Never imports ComfyUI, except models/ building the host's own model class
inside a rank (diffusers only for its key converters, which name PEFT LoRAs)."""
