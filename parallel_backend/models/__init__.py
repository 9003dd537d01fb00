"""Model families: one module each, holding detection, build (the host's own class), parallel plan and the
diffusers names its PEFT LoRAs may use."""
from __future__ import annotations

from . import cosmos, cosmos1, wan

FAMILIES = {wan.FAMILY: wan, cosmos.FAMILY: cosmos, cosmos1.FAMILY: cosmos1}


class UnsupportedModelError(ValueError):
    pass


def detect_family(shapes: dict, path: str = "<file>"):
    """The family module whose keys and shapes this checkpoint has."""
    for fam in FAMILIES.values():
        if fam.detect(shapes):
            return fam
    sample = ", ".join(sorted(shapes)[:4])
    raise UnsupportedModelError(
        f"{path} is not a diffusion transformer this pack supports (supported: {', '.join(FAMILIES)}); "
        f"its first keys are: {sample}. Pick a Wan, Cosmos Predict2 or Cosmos 1.0 DiT file from models/diffusion_models "
        f"(text encoders, VAEs and LoRAs go in their own loaders)")
