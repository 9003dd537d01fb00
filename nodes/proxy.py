"""A ComfyUI MODEL whose diffusion model lives on the worker group.

ComfyUI's own model detection builds the BaseModel (sampling schedule, latent format, conds) from
the checkpoint's header alone - `disable_unet_model_creation` keeps it from allocating weights -
and `diffusion_model` is a small proxy that sends each evaluation to the group. So every native
sampler, scheduler, preview and the progress bar work unchanged.
"""
import inspect
import logging
import os

import torch

from . import engine
from .compile import compile_request
from .fit import call_activations, check_model_start
from .lora_check import lora_path
from .patches import (
    crossing_conds,
    crossing_options,
    refuse_patcher_extras,
    refuse_patches,
    refuse_weight_patches,
)


class _ShapeOnly:
    """Exposes `.weight.shape` (WAN21.concat_cond reads the patch embedding's input channels)
    without holding a parameter: a stride-0 view of a single element."""

    def __init__(self, shape, dtype):
        self.weight = torch.zeros((), dtype=dtype).expand(*shape)


class ParallelDiffusionModel(torch.nn.Module):
    """Stands in for ComfyUI's diffusion model (WanModel, MiniTrainDIT, ...); each evaluation runs on the group.

    `forward` is the host class's own forward called on this proxy: it runs ComfyUI's DIFFUSION_MODEL wrappers
    (EasyCache, LazyCache, any node using WrappersMP.DIFFUSION_MODEL) around `_forward` exactly as the native model
    does, so a step a cache skips never reaches the ranks. `_forward` takes the host `_forward`'s arguments and
    sends x, timestep, context and the conditioning tensors to the group; whatever the ranks cannot honour is
    refused with a message."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            host_class = self.__dict__.get("host_class")
            if host_class is None or name.startswith("__") or not hasattr(host_class, name):
                raise
        # still an AttributeError (hasattr() stays False for ComfyUI's feature checks), but one that says why
        raise AttributeError(f"a node called {host_class.__name__}.{name} on the parallel MODEL's diffusion model in "
                             f"the ComfyUI process, where the pack holds no weights (they are on the worker group): "
                             f"this node cannot run on the parallel MODEL; use ComfyUI's own loader for the graph that "
                             f"needs it")

    def __init__(self, config, path, precision, info, resident=False, loras=(), host_class=None, compile_spec=None):
        super().__init__()
        self.parallel_config, self.path, self.precision, self.info = config, path, precision, info
        self.resident = resident  # stay on the group while other models load (Wan 2.2 A14B's two experts)
        # ((lora path or a native loader's LoraTensors, strength), ...), merged on the ranks (lora_check.py)
        self.loras = tuple(loras)
        self.host_class = host_class  # ComfyUI's class for this file (as its detection builds it)
        self.compile_spec = compile_spec  # the loader's `compile` option: torch.compile kwargs for the ranks
        self._base_ref = None  # weakref to the BaseModel holding this proxy (to see its current patcher)
        self.dtype = engine.reads.compute_dtype(precision)
        shape = (info["num_heads"] * info["head_dim"], info["in_channels"], *info["patch_size"])
        self.patch_embedding = _ShapeOnly(shape, self.dtype)
        # what the host's BaseModel and forward read off their diffusion model besides the call (MiniMax H3: its
        # sigma shifts, patch size, text preprocessing), as the family gives them
        family = self.family()
        attributes = dict(getattr(family, "PROXY_ATTRIBUTES", {}))
        if hasattr(family, "proxy_attributes"):  # per host class (LTX-2's patchifiers)
            attributes.update(family.proxy_attributes(self.class_name()))
        for name, value in attributes.items():
            setattr(self, name, value)
        # the family's name for the patch embedding (HunyuanVideo 1.5's concat_cond reads img_in.proj.weight's shape)
        for path in getattr(self.family(), "PATCH_EMBEDDING_ALIASES", ()):
            _set_path(self, path, self.patch_embedding)
        # a real (tiny) buffer so ComfyUI's device moves have something to move, and no meta tensors
        self.register_buffer("device_anchor", torch.zeros(1), persistent=False)

    def warm_group(self):
        """The warm group for this model's config, started if there is none (checked before its ranks start; Cancel
        ends a start); nothing loaded."""
        import comfy.model_management
        return engine.group.get_group(
            self.parallel_config, comfy.model_management.throw_exception_if_processing_interrupted,
            check=lambda: check_model_start(self.parallel_config, self.path, self.precision))

    def group(self):
        """The warm group with this model loaded; restarted and reloaded transparently if a rank died since the last
        call."""
        g = self.warm_group()
        loras = tuple((lora_path(source, g), strength) for source, strength in self.loras)
        load_logged(g, self.path, self.precision, loras=loras, resident=self.resident)
        return g

    def class_name(self) -> str:
        return self.host_class.__name__ if self.host_class is not None else "diffusion model"

    def family(self):
        """The model's family module (its plan, what it takes and refuses)."""
        return engine.models.FAMILIES.get(self.info.get("family"))

    def conds(self) -> tuple:
        """The keyword inputs (ComfyUI conds) the ranks take for this model's class (the family says which)."""
        family = self.family()
        conds_of = getattr(family, "conds_of", None)
        return tuple(conds_of(self.class_name())) if conds_of is not None else ()

    def with_loras(self, loras) -> "ParallelDiffusionModel":
        """A proxy of the same model with this LoRA list (Parallel LoRA object-patches it onto a clone)."""
        other = ParallelDiffusionModel(self.parallel_config, self.path, self.precision, self.info, self.resident,
                                       loras, self.host_class, self.compile_spec)
        other._base_ref = self._base_ref
        return other

    @torch.compiler.disable  # TorchCompileModel compiles this object: run it as is (the ranks compile)
    def forward(self, *args, **kwargs):
        if self.host_class is None:
            return self._forward(*args, **kwargs)
        host_forward = getattr(self.family(), "host_forward", None)  # a host forward that needs help (LTX-2's super())
        if host_forward is not None:
            return host_forward(self.host_class, self, args, kwargs)
        return self.host_class.forward(self, *args, **kwargs)

    def _forward(self, *args, **kwargs):
        named = _bind(self.host_class, args, kwargs)
        names = list(named)
        x, timestep, context = (named.pop(n) for n in names[:3])  # (x, timestep(s), context) in every DiT
        streams = None
        if isinstance(x, (list, tuple)):  # a packed latent's streams (MiniMax H3: [video, audio]): cross as one tensor
            import comfy.utils
            x, streams = comfy.utils.pack_latents(x)
            named["latent_shapes"] = [tuple(s) for s in streams]
        named = getattr(self.family(), "crossing_inputs", lambda n: n)(named)
        transformer_options = named.pop("transformer_options", None) or {}
        base = self._base_ref() if self._base_ref is not None else None
        patcher = getattr(base, "current_patcher", None)
        refuse_weight_patches(patcher)
        # the ranks run ComfyUI's own model code, which applies the patches that cross (or ignores them as natively)
        refuse_patches(transformer_options, named.pop("control", None), self.family())
        refuse_patcher_extras(patcher)
        options = crossing_options(transformer_options)
        compile_spec = compile_request(patcher, self.compile_spec, self.parallel_config)
        extras, values = crossing_conds(named, self.conds(), self.class_name(), x.shape[0])
        g = self.group()
        import comfy.model_management
        # a call the ranks cannot hold is refused before it is sent (ComfyUI's own activation estimate, split over the
        # ranks); Cancel mid-call: the ranks stop at the next block they all reach, or the group is stopped
        out = g.forward(x.detach().cpu(), timestep.detach().cpu(), context.detach().cpu(),
                        model_key=g.model_key_for(self.path, self.precision), compile=compile_spec, options=options,
                        values=values, interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                        activations=call_activations(base, x.shape),
                        what=f"{x.shape[0]} rows of a {'x'.join(map(str, x.shape[2:]))} latent", **extras)
        comfy.model_management.throw_exception_if_processing_interrupted()
        if streams is not None:
            import comfy.utils
            return comfy.utils.unpack_latents(out.to(x.device), streams)
        return out.to(x.device)


def _set_path(root, path: str, value) -> None:
    """root.a.b.c = value, the missing parents made as plain namespaces (no modules: nothing for device moves)."""
    import types
    *parents, last = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            object.__setattr__(root, name, types.SimpleNamespace())
        root = getattr(root, name)
    setattr(root, last, value)


def _bind(host_class, args, kwargs) -> dict:
    """The host `_forward`'s arguments by name (its **kwargs flattened in), in signature order."""
    if host_class is None:  # a proxy built without a host class: ComfyUI's BaseModel call convention
        names = ("x", "timestep", "context")
        named = dict(zip(names, args))
        named.update(kwargs)
        return named
    sig = inspect.signature(host_class._forward)
    bound = sig.bind(None, *args, **kwargs)
    named = {}
    for name, value in list(bound.arguments.items())[1:]:
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif value is not param.default:  # a host forward passes its own defaults on (Cosmos 1: data_type=VIDEO)
            named[name] = value
    return named


MODEL_FOLDERS = ("diffusion_models", "unet", "unet_gguf", "loras")


def models_folder_names(paths) -> dict:
    """path -> its name relative to a ComfyUI models folder ("diffusion_models/wan.safetensors", "loras/x.safetensors"):
    how another node finds its own copy under its --model-dir. Paths under no models folder are left out."""
    import folder_paths
    out = {}
    for path in paths:
        for resolve in (os.path.abspath, os.path.realpath):  # as listed (a link in the folder), then its target
            p = resolve(path)
            for key in MODEL_FOLDERS:
                if key not in folder_paths.folder_names_and_paths:
                    continue
                for folder in folder_paths.get_folder_paths(key):
                    base = resolve(folder)
                    if p.startswith(base + os.sep):
                        out[path] = f"{os.path.basename(base)}/{os.path.relpath(p, base)}"
                        break
                if path in out:
                    break
            if path in out:
                break
    return out


def load_logged(group, path, precision, **kwargs) -> dict:
    """group.load, saying in ComfyUI's log whether weights were read or the warm group was reused
    (tests and users read these lines)."""
    import comfy.model_management
    before = group.load_count
    if group.config.nodes > 1:  # the other nodes look the files up by these names under their --model-dir
        kwargs["names"] = models_folder_names([path] + [lo[0] for lo in kwargs.get("loras") or ()])
    info = group.load(path, precision, interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                      **kwargs)
    name = os.path.basename(path)
    if group.load_count != before:
        logging.info("parallel_dit: loaded weights of %s onto pids %s (load #%d of this group)", name, group.pids,
                     group.load_count)
    return info


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
