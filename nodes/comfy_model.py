"""A ComfyUI MODEL whose diffusion model lives on the worker group.

ComfyUI's own model detection builds the BaseModel (sampling schedule, latent format, conds) from
the checkpoint's header alone - `disable_unet_model_creation` keeps it from allocating weights -
and `diffusion_model` is a small proxy that sends each evaluation to the group. So every native
sampler, scheduler, preview and the progress bar work unchanged.
"""
import logging

import torch

from .backend import backend


class UnsupportedPatchError(RuntimeError):
    pass


# keyword conds ComfyUI's Wan BaseModel may pass, and whether the group supports them
_SUPPORTED_CONDS = {"clip_fea"}


class _ShapeOnly:
    """Exposes `.weight.shape` (WAN21.concat_cond reads the patch embedding's input channels)
    without holding a parameter: a stride-0 view of a single element."""

    def __init__(self, shape, dtype):
        self.weight = torch.zeros((), dtype=dtype).expand(*shape)


class ParallelDiffusionModel(torch.nn.Module):
    """Stands in for ComfyUI's WanModel; forwards (x, timestep, context) to the worker group."""

    def __init__(self, config, path, precision, info):
        super().__init__()
        self.parallel_config, self.path, self.precision, self.info = config, path, precision, info
        self.dtype = backend("loading").DTYPE_NAMES[precision]
        shape = (info["num_heads"] * info["head_dim"], info["in_channels"], *info["patch_size"])
        self.patch_embedding = _ShapeOnly(shape, self.dtype)
        # a real (tiny) buffer so ComfyUI's device moves have something to move, and no meta tensors
        self.register_buffer("device_anchor", torch.zeros(1), persistent=False)

    def group(self):
        """The warm group; restarted and reloaded transparently if a rank died since the last call."""
        g = backend("group").get_group(self.parallel_config)
        g.load(self.path, self.precision)
        return g

    def forward(self, x, timestep, context, control=None, transformer_options={}, **kwargs):
        refuse_patches(transformer_options, control)
        extras = {}
        for k, v in kwargs.items():
            if v is None:
                continue
            if k not in _SUPPORTED_CONDS:
                raise UnsupportedPatchError(
                    f"the parallel model got the conditioning input '{k}', which the worker group does not "
                    f"support yet; remove the node that adds it, or sample with the native model")
            extras[k] = v.detach().cpu()
        out = self.group().forward(x.detach().cpu(), timestep.detach().cpu(), context.detach().cpu(), **extras)
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        return out.to(x.device)


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


def build_model_patcher(config, path, precision, header, info):
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    st = backend("loading")._ST_DTYPES
    sd = {k: torch.empty(shape, dtype=st.get(dt, torch.float32), device="meta") for k, (shape, dt) in header.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    stripped = {k[len(prefix):]: v for k, v in sd.items() if prefix and k.startswith(prefix)}
    sd = stripped or sd  # as comfy.sd does: the default prefix may match no key
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    if model_config is None:
        raise RuntimeError(f"ComfyUI does not recognise {path} as a diffusion model it knows")
    model_config.unet_config["disable_unet_model_creation"] = True
    dtype = backend("loading").DTYPE_NAMES[precision]
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model(sd, "")
    base.diffusion_model = ParallelDiffusionModel(config, path, precision, info)
    # activations live on the ranks, not in this process
    base.memory_required = lambda *a, **k: 0
    logging.info("parallel_dit: %s as %s on %s", path, type(model_config).__name__, config.describe())
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def parallel_model_of(model):
    """The proxy inside a MODEL from Parallel Model Loader, or None for any other MODEL."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
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
            backend("group").stop_all()

    unload_all_models._pdit_wrapped = True
    mm.unload_all_models = unload_all_models
