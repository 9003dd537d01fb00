"""Test-only ComfyUI nodes (never registered by the pack): stand-ins for the umt5 text encoder,
which cannot be downloaded where the tests run."""
import torch


class PditTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": True,
                             "tooltip": "seed of the fake embedding"}),
            "tokens": ("INT", {"default": 12, "min": 1, "max": 512, "tooltip": "fake prompt length"}),
            "width": ("INT", {"default": 4096, "min": 1, "max": 8192, "tooltip": "embedding width (umt5: 4096)"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, width):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"PditTestConditioning": PditTestConditioning}
