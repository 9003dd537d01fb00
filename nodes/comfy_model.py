"""A ComfyUI MODEL whose diffusion model lives on the worker group.

ComfyUI's own model detection builds the BaseModel (sampling schedule, latent format, conds) from
the checkpoint's header alone - `disable_unet_model_creation` keeps it from allocating weights -
and `diffusion_model` is a small proxy that sends each evaluation to the group. So every native
sampler, scheduler, preview and the progress bar work unchanged.
"""
import logging
import os
import weakref

import torch

from .backend import backend


class UnsupportedPatchError(RuntimeError):
    pass


# keyword conds ComfyUI's Wan BaseModel may pass, and whether the group supports them
_SUPPORTED_CONDS = {"clip_fea"}
# conds ComfyUI's own WanModel ignores: WAN22 (TI2V-5B) turns denoise_mask into per-frame timesteps
# in process_timestep before the call, and passes it on too; Cosmos Predict2 passes the frame rate `fps`, which
# ComfyUI's own MiniTrainDIT ignores (rope_enable_fps_modulation off)
_IGNORED_CONDS = {"denoise_mask", "fps"}


class _ShapeOnly:
    """Exposes `.weight.shape` (WAN21.concat_cond reads the patch embedding's input channels)
    without holding a parameter: a stride-0 view of a single element."""

    def __init__(self, shape, dtype):
        self.weight = torch.zeros((), dtype=dtype).expand(*shape)


class ParallelDiffusionModel(torch.nn.Module):
    """Stands in for ComfyUI's WanModel; forwards (x, timestep, context) to the worker group."""

    def __init__(self, config, path, precision, info, resident=False, loras=()):
        super().__init__()
        self.parallel_config, self.path, self.precision, self.info = config, path, precision, info
        self.resident = resident  # stay on the group while other models load (Wan 2.2 A14B's two experts)
        self.loras = tuple(loras)  # ((lora path, strength), ...) from Parallel LoRA, merged on the ranks
        self._base_ref = None  # weakref to the BaseModel holding this proxy (to see its current patcher)
        self.dtype = backend("weights.reads").DTYPE_NAMES[precision]
        shape = (info["num_heads"] * info["head_dim"], info["in_channels"], *info["patch_size"])
        self.patch_embedding = _ShapeOnly(shape, self.dtype)
        # a real (tiny) buffer so ComfyUI's device moves have something to move, and no meta tensors
        self.register_buffer("device_anchor", torch.zeros(1), persistent=False)

    def group(self):
        """The warm group; restarted and reloaded transparently if a rank died since the last call."""
        g = backend("runtime.group").get_group(self.parallel_config)
        load_logged(g, self.path, self.precision, loras=self.loras, resident=self.resident)
        return g

    def with_loras(self, loras) -> "ParallelDiffusionModel":
        """A proxy of the same model with this LoRA list (Parallel LoRA object-patches it onto a clone)."""
        other = ParallelDiffusionModel(self.parallel_config, self.path, self.precision, self.info, self.resident,
                                       loras)
        other._base_ref = self._base_ref
        return other

    def forward(self, x, timestep, context, control=None, transformer_options={}, **kwargs):
        base = self._base_ref() if self._base_ref is not None else None
        refuse_weight_patches(getattr(base, "current_patcher", None))
        refuse_patches(transformer_options, control)
        extras = {}
        for k, v in kwargs.items():
            if v is None or k in _IGNORED_CONDS:
                continue
            if k not in _SUPPORTED_CONDS:
                raise UnsupportedPatchError(
                    f"the parallel model got the conditioning input '{k}', which the worker group does not "
                    f"support yet; remove the node that adds it, or sample with the native model")
            extras[k] = v.detach().cpu()
        g = self.group()
        out = g.forward(x.detach().cpu(), timestep.detach().cpu(), context.detach().cpu(),
                        model_key=g.model_key_for(self.path, self.precision), **extras)
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        return out.to(x.device)


def load_logged(group, path, precision, **kwargs) -> dict:
    """group.load, saying in ComfyUI's log whether weights were read or the warm group was reused
    (tests and users read these lines)."""
    before = group.load_count
    info = group.load(path, precision, **kwargs)
    name = os.path.basename(path)
    if group.load_count != before:
        logging.info("parallel_dit: loaded weights of %s onto pids %s (load #%d of this group)", name, group.pids,
                     group.load_count)
    return info


_WEIGHT_PATCH_HELP = (
    "the parallel MODEL's weights live sharded on the worker ranks, where ComfyUI's weight patches cannot "
    "reach; for a LoRA use the 'Parallel LoRA' node (category parallel_dit) between Parallel Model Loader and "
    "the sampler (a LoRA for the text encoder only can stay on LoraLoader with strength_model 0)")


def refuse_weight_patches(patcher):
    """A weight patch (native LoraLoader, model merging, ...) on our MODEL would be silently lost: refuse it."""
    for attr, what in (("patches", "weight patches"), ("hook_patches", "hook weight patches (e.g. Create Hook LoRA)")):
        patches = getattr(patcher, attr, None)
        if patches:
            sample = ", ".join(sorted(map(str, patches))[:3])
            raise UnsupportedPatchError(f"the parallel MODEL carries {len(patches)} {what} ({sample}); "
                                        f"{_WEIGHT_PATCH_HELP}")


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
                    f"a node tried to patch the weights of the parallel MODEL (LoraLoader, model merge or "
                    f"attention multiply; {len(patches)} keys matched); {_WEIGHT_PATCH_HELP}")

        _patcher_class = ParallelModelPatcher
    return _patcher_class


def refuse_patches(transformer_options, control):
    """Patches that change the inside of the model cannot reach remote shards: refuse them loudly."""
    if control is not None:
        raise UnsupportedPatchError("ControlNet on the parallel model is not supported: remove the ControlNet "
                                    "apply node, or use the native Load Diffusion Model for this graph")
    for key in ("patches", "patches_replace"):
        patches = {k: v for k, v in (transformer_options.get(key) or {}).items() if v}
        if patches:
            raise UnsupportedPatchError(
                f"model patches {sorted(patches)} (from a node that patches the model, e.g. attention or block "
                f"replacement) cannot be applied to the sharded parallel model: remove that node")


def build_model_patcher(config, path, precision, header, info, resident=False):
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    st = backend("weights.reads")._ST_DTYPES
    sd = {k: torch.empty(shape, dtype=st.get(dt, torch.float32), device="meta") for k, (shape, dt) in header.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    stripped = {k[len(prefix):]: v for k, v in sd.items() if prefix and k.startswith(prefix)}
    sd = stripped or sd  # as comfy.sd does: the default prefix may match no key
    # the family may name ComfyUI's model class itself (ComfyUI's detection fixes Cosmos Predict2's depth and
    # heads from its width, so it cannot size other widths); otherwise ComfyUI's own detection
    model_config = _family_model_config(info, header) or comfy.model_detection.model_config_from_unet(sd, "")
    if model_config is None:
        raise RuntimeError(f"ComfyUI does not recognise {path} as a diffusion model it knows")
    model_config.unet_config["disable_unet_model_creation"] = True
    dtype = backend("weights.reads").DTYPE_NAMES[precision]
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model(sd, "")
    base.diffusion_model = ParallelDiffusionModel(config, path, precision, info, resident)
    base.diffusion_model._base_ref = weakref.ref(base)
    # the loader's own proxy (no LoRA): base.diffusion_model is a Parallel LoRA proxy while such a MODEL is loaded
    base._pdit = {"proxy": base.diffusion_model}
    # activations live on the ranks, not in this process
    base.memory_required = lambda *a, **k: 0
    logging.info("parallel_dit: %s as %s on %s", path, type(model_config).__name__, config.describe())
    return parallel_model_patcher_class()(base, load_device=comfy.model_management.get_torch_device(),
                                          offload_device=comfy.model_management.unet_offload_device())


def _family_model_config(info, header):
    """ComfyUI's supported_models config for the file when its family provides one: `comfy_model_config(header)`
    gives (class name in comfy.supported_models, unet_config read from the header); else None."""
    family = backend("models").FAMILIES.get(info.get("family"))
    hint = getattr(family, "comfy_model_config", None)
    if hint is None:
        return None
    import comfy.supported_models

    name, unet_config = hint(header)
    return getattr(comfy.supported_models, name)(unet_config)


def parallel_model_of(model):
    """The proxy inside a MODEL from Parallel Model Loader, or None for any other MODEL (a Parallel LoRA
    MODEL carries its own proxy as an object patch, put in place when ComfyUI loads it)."""
    dm = getattr(model, "object_patches", {}).get("diffusion_model")
    if not isinstance(dm, ParallelDiffusionModel):
        base = getattr(model, "model", None)
        dm = getattr(base, "_pdit", {}).get("proxy")
        if dm is None:
            dm = getattr(base, "diffusion_model", None)
    return dm if isinstance(dm, ParallelDiffusionModel) else None


def install_unload_hook():
    """ComfyUI's "Unload models" / POST /free {"unload_models": true} calls
    comfy.model_management.unload_all_models(); the worker group's devices are invisible to ComfyUI's
    memory manager, so stop the group there too (it restarts on the next load)."""
    import comfy.model_management as mm
    if getattr(mm.unload_all_models, "_pdit_wrapped", False):
        return
    original = mm.unload_all_models

    def unload_all_models(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            backend("runtime.group").stop_all()

    unload_all_models._pdit_wrapped = True
    mm.unload_all_models = unload_all_models
