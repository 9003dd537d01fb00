"""The pack's MODEL: ComfyUI's BaseModel built by its own detection (no weights in this process), whose
diffusion_model is the proxy, in a ModelPatcher that refuses weight patches as they are added."""
import logging
import weakref

from .host_model import host_model_config
from .patches import WEIGHT_PATCH_HELP, UnsupportedPatchError
from .proxy import ParallelDiffusionModel


_patcher_class = None


def parallel_model_patcher_class():
    """ComfyUI's ModelPatcher, refusing weight patches at the moment a node adds them. (A native LoraLoader
    finds none of its keys on the proxy and would add nothing at all, so the refusal cannot wait for keys.)
    Subclassing survives `clone()`, which builds `self.__class__`."""
    global _patcher_class
    if _patcher_class is None:
        import comfy.model_patcher

        class ParallelModelPatcher(comfy.model_patcher.ModelPatcher):
            def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
                if strength_patch == 0.0 and strength_model == 1.0:
                    return []  # changes nothing (e.g. LoraLoader with strength_model 0 for a CLIP LoRA)
                raise UnsupportedPatchError(
                    f"a node tried to patch the weights of the parallel MODEL (a model merge, attention multiply or "
                    f"another weight patch; {len(patches)} keys); {WEIGHT_PATCH_HELP}")

        _patcher_class = ParallelModelPatcher
    return _patcher_class


def build_model_patcher(config, path, precision, header, info, resident=False, compile_spec=None):
    import comfy.model_management
    import comfy.model_patcher

    model_config, sd, host_class = host_model_config(info.get("family"), path, precision, header)
    model_config.unet_config["disable_unet_model_creation"] = True
    base = model_config.get_model(sd, "")
    base.diffusion_model = ParallelDiffusionModel(config, path, precision, info, resident, host_class=host_class,
                                                  compile_spec=compile_spec)
    base.diffusion_model._base_ref = weakref.ref(base)
    # the loader's own proxy (no LoRA): base.diffusion_model is a Parallel LoRA proxy while such a MODEL is loaded
    base._pdit = {"proxy": base.diffusion_model}
    flags = getattr(base.diffusion_model.family(), "CROSSING_FLAGS", ())
    if flags:
        base.extra_conds = _with_flags(base.extra_conds, flags)
    # activations live on the ranks, not in this process
    base.memory_required = lambda *a, **k: 0
    logging.info("parallel_dit: %s as %s on %s", path, type(model_config).__name__, config.describe())
    return parallel_model_patcher_class()(base, load_device=comfy.model_management.get_torch_device(),
                                          offload_device=comfy.model_management.unet_offload_device())


def _with_flags(extra_conds, names):
    """The BaseModel's extra_conds plus the named encoder flags as constant conds: the host reads them there to treat
    the text with its diffusion model's own modules (LTX-2's connectors), which live on the ranks."""
    import comfy.conds

    def extra_conds_with_flags(**kwargs):
        out = extra_conds(**kwargs)
        out.update({n: comfy.conds.CONDConstant(kwargs[n]) for n in names if kwargs.get(n)})
        return out

    return extra_conds_with_flags
