"""Model families: one module each, holding detection, build (the host's own class), parallel plan and the
diffusers names its PEFT LoRAs may use; host.py builds ComfyUI's class inside a rank, cosmos_common.py holds what
the two Cosmos files share."""
from __future__ import annotations

from . import cosmos, cosmos1, hunyuan_video, kandinsky5, ltxv, minimax, wan

FAMILIES = {wan.FAMILY: wan, cosmos.FAMILY: cosmos, cosmos1.FAMILY: cosmos1, ltxv.FAMILY: ltxv,
            minimax.FAMILY: minimax, hunyuan_video.FAMILY: hunyuan_video,
            kandinsky5.FAMILY: kandinsky5}


class UnsupportedModelError(ValueError):
    pass


def detect_family(shapes: dict, path: str = "<file>"):
    """The family module whose keys and shapes this checkpoint has (a GGUF's `general.architecture` must agree)."""
    for fam in FAMILIES.values():
        if fam.detect(shapes):
            arch = getattr(shapes, "architecture", None)
            if arch is not None and arch not in getattr(fam, "GGUF_ARCHITECTURES", (fam.FAMILY,)):
                raise UnsupportedModelError(f"{path}: its tensors are a {fam.FAMILY} DiT but the GGUF says its "
                                            f"architecture is {arch!r}; the file is mislabelled or damaged")
            return fam
    sample = ", ".join(sorted(shapes)[:4])
    raise UnsupportedModelError(
        f"{path} is not a diffusion transformer this pack supports (supported: {', '.join(FAMILIES)}); "
        f"its first keys are: {sample}. Pick a Wan, Cosmos Predict2, Cosmos 1.0, LTX-Video, MiniMax H3, HunyuanVideo "
        f"or Kandinsky 5 DiT file from models/diffusion_models "
        f"(text encoders, VAEs and LoRAs go in their own loaders)")
