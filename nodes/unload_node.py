from . import engine
from .backend import CATEGORY


class ParallelUnload:
    """Stops the worker group(s) and frees their devices now (they restart on the next load)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "passthrough": ("*", {"tooltip": "Connect anything that must finish before the group is stopped "
                                             "(e.g. the sampled LATENT)."}),
        }}

    RETURN_TYPES = ("*",)
    RETURN_NAMES = ("passthrough",)
    OUTPUT_TOOLTIPS = ("The input, unchanged, once the group is stopped.",)
    FUNCTION = "unload"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Frees the GPUs held by the parallel worker group."

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None, **kw):
        return True

    def unload(self, passthrough=None):
        engine.group.stop_all()
        from .gpu_sharing import release_reservation
        release_reservation()
        return (passthrough,)
