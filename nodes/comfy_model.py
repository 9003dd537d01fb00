"""A ComfyUI MODEL whose diffusion model lives on the worker group.

ComfyUI's own model detection builds the BaseModel (sampling schedule, latent format, conds) from
the checkpoint's header alone - `disable_unet_model_creation` keeps it from allocating weights -
and `diffusion_model` is a small proxy that sends each evaluation to the group. So every native
sampler, scheduler, preview and the progress bar work unchanged.
"""
import functools
import inspect
import logging
import os
import weakref

import torch

from .backend import backend
from .fit import call_activations
from .lora_check import LoraTensors, check_lora, lora_path


class UnsupportedPatchError(RuntimeError):
    pass


# conds ComfyUI's own WanModel ignores: WAN22 (TI2V-5B) turns denoise_mask into per-frame timesteps
# in process_timestep before the call, and passes it on too; Cosmos Predict2 passes the frame rate `fps`, which
# ComfyUI's own MiniTrainDIT ignores (rope_enable_fps_modulation off). A family that takes one of them (Cosmos 1's
# GeneralDIT scales its rope by `fps`) names it in its conds, and it crosses.
_IGNORED_CONDS = {"denoise_mask", "fps"}


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

    def __init__(self, config, path, precision, info, resident=False, loras=(), host_class=None, compile_spec=None):
        super().__init__()
        self.parallel_config, self.path, self.precision, self.info = config, path, precision, info
        self.resident = resident  # stay on the group while other models load (Wan 2.2 A14B's two experts)
        # ((lora path or a native loader's LoraTensors, strength), ...), merged on the ranks (lora_check.py)
        self.loras = tuple(loras)
        self.host_class = host_class  # ComfyUI's class for this file (as its detection builds it)
        self.compile_spec = compile_spec  # the loader's `compile` option: torch.compile kwargs for the ranks
        self._base_ref = None  # weakref to the BaseModel holding this proxy (to see its current patcher)
        self.dtype = backend("weights.reads").compute_dtype(precision)
        shape = (info["num_heads"] * info["head_dim"], info["in_channels"], *info["patch_size"])
        self.patch_embedding = _ShapeOnly(shape, self.dtype)
        # a real (tiny) buffer so ComfyUI's device moves have something to move, and no meta tensors
        self.register_buffer("device_anchor", torch.zeros(1), persistent=False)

    def warm_group(self):
        """The warm group for this model's config, started if there is none (checked before its ranks start; Cancel
        ends a start); nothing loaded."""
        import comfy.model_management
        from .fit import check_model_start
        return backend("runtime.group").get_group(
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
        return backend("models").FAMILIES.get(self.info.get("family"))

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
        return self.host_class.forward(self, *args, **kwargs)

    def _forward(self, *args, **kwargs):
        named = _bind(self.host_class, args, kwargs)
        names = list(named)
        x, timestep, context = (named.pop(n) for n in names[:3])  # (x, timestep(s), context) in every DiT
        transformer_options = named.pop("transformer_options", None) or {}
        base = self._base_ref() if self._base_ref is not None else None
        patcher = getattr(base, "current_patcher", None)
        refuse_weight_patches(patcher)
        # the ranks run ComfyUI's own model code, which applies the patches that cross (or ignores them as natively)
        refuse_patches(transformer_options, named.pop("control", None), self.family())
        refuse_patcher_extras(patcher)
        options = crossing_options(transformer_options)
        compile_spec = compile_request(patcher, self.compile_spec, self.parallel_config)
        extras, values = {}, {}
        conds = self.conds()
        for k, v in named.items():
            if v is None or (k in _IGNORED_CONDS and k not in conds):
                continue
            if k not in conds:
                raise UnsupportedPatchError(
                    f"the parallel model ({self.class_name()}) got the conditioning input '{k}', which its ranks do "
                    f"not take yet (they take: {', '.join(conds) or 'none'}); remove the node that adds it, or "
                    f"sample with the native model")
            if torch.is_tensor(v):  # batched like x (ComfyUI concatenates conds by row): through shared memory
                extras[k] = v.detach().cpu()
            elif _batched_list(v, x.shape[0]):  # a list of such tensors (Wan's context_latents): one per item
                extras.update({f"{k}{LIST_SEP}{i}": t.detach().cpu() for i, t in enumerate(v)})
            elif _plain(v):  # numbers, strings, lists of them (VACE's per-context strengths): with the call
                values[k] = v
            else:
                raise UnsupportedPatchError(f"the conditioning input '{k}' of {self.class_name()} is a "
                                            f"{type(v).__name__}, which cannot cross to the worker ranks")
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
        return out.to(x.device)


LIST_SEP = "#"  # as runtime/sharded_model.py reads them back


def _batched_list(v, rows: int) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(torch.is_tensor(t) and t.shape[0] == rows for t in v)


def _plain(v) -> bool:
    if isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (list, tuple)) and all(_plain(x) for x in v)


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


_WEIGHT_PATCH_HELP = (
    "the parallel MODEL's weights live sharded on the worker ranks, where ComfyUI's weight patches cannot "
    "reach; LoRAs work through LoraLoader / LoraLoaderModelOnly or the 'Parallel LoRA' node (they merge on the "
    "ranks); remove the node that patches the weights otherwise (model merging, weight arithmetic)")


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
                    f"a node tried to patch the weights of the parallel MODEL (a model merge, attention multiply or "
                    f"another weight patch; {len(patches)} keys); {_WEIGHT_PATCH_HELP}")

        _patcher_class = ParallelModelPatcher
    return _patcher_class


# transformer_options that belong to this process (ComfyUI's wrappers and callbacks run here around the proxy, its
# device and memory bookkeeping mean nothing in a rank); everything else crosses with the call: model patches and
# block replacements, RoPE options, the per-call values patches read (sigmas, cond_or_uncond, ...) and what a node
# put there for its patches (InfiniteTalk's audio_embeds). Read in 0.3.75, 0.33.0 and Comfy-Org/ComfyUI 311c014
# (comfy/samplers.py: multigpu_thread_device).
LOCAL_OPTIONS = ("wrappers", "callbacks", "multigpu_thread_device", "prefetch_dynamic_vbars")

# transformer_options the ranks cannot honour: each would silently change nothing there, so each is refused
_REFUSED_OPTIONS = {
    "optimized_attention_override": "an attention override (a node replacing ComfyUI's attention function)",
}


def crossing_options(transformer_options: dict) -> dict:
    """The call's transformer_options the ranks get (the group sends them; each model patch object crosses once)."""
    return {k: v for k, v in transformer_options.items() if k not in LOCAL_OPTIONS and v is not None}


def refuse_patches(transformer_options, control, family=None):
    """What changes the inside of the model and cannot reach remote shards: refuse it loudly (and what the model's
    family names in REFUSED_OPTIONS)."""
    if control is not None:
        raise UnsupportedPatchError("ControlNet on the parallel model is not supported: remove the ControlNet "
                                    "apply node, or use the native Load Diffusion Model for this graph")
    for key, what in _REFUSED_OPTIONS.items():
        if transformer_options.get(key):
            raise UnsupportedPatchError(f"{what} is set on the parallel MODEL ('{key}'), which the worker ranks do "
                                        f"not apply: remove that node, or sample with the native model")
    for key, why in getattr(family, "REFUSED_OPTIONS", {}).items():
        if transformer_options.get(key) is not None:
            raise UnsupportedPatchError(f"'{key}' on the parallel MODEL: {why}")


def refuse_patcher_extras(patcher):
    """ModelPatcher features that act on the model's modules in this process, where the proxy holds none."""
    injections = {k: v for k, v in (getattr(patcher, "injections", None) or {}).items() if v}
    if injections:
        raise UnsupportedPatchError(
            f"the parallel MODEL carries module injections {sorted(injections)} (e.g. a bypass LoRA or a node that "
            f"injects into the model's layers); they cannot reach the sharded layers on the worker ranks: use "
            f"Parallel LoRA for LoRAs, or sample with the native model")
    wrappers = {k: v for k, v in (getattr(patcher, "weight_wrapper_patches", None) or {}).items() if v}
    if wrappers:
        raise UnsupportedPatchError(
            f"the parallel MODEL carries weight wrappers for {len(wrappers)} weights (e.g. {sorted(wrappers)[:2]}); "
            f"they cannot reach the sharded weights on the worker ranks: remove that node")


COMPILE_BACKENDS = ("inductor", "cudagraphs")


def compile_request(patcher, default, config):
    """The torch.compile kwargs the ranks should use for this call: those TorchCompileModel put on the MODEL
    (ComfyUI stores them in model_options), else the loader's `compile` option. The proxy itself is never
    compiled; the ranks compile their transformer blocks. Refuses what the ranks cannot run."""
    try:
        from comfy_api.torch_helpers.torch_compile import TORCH_COMPILE_KWARGS
    except ImportError:  # a host without ComfyUI's compile helpers has no TorchCompileModel
        TORCH_COMPILE_KWARGS = "torch_compile_kwargs"
    spec = (getattr(patcher, "model_options", None) or {}).get(TORCH_COMPILE_KWARGS) or default
    if not spec:
        return None
    spec = {k: v for k, v in dict(spec).items() if v is not None}
    backend_name = spec.get("backend", "inductor")
    if backend_name not in COMPILE_BACKENDS:
        raise UnsupportedPatchError(f"torch.compile backend '{backend_name}' is not supported on the worker ranks: "
                                    f"use one of {COMPILE_BACKENDS}")
    if backend_name == "cudagraphs" and config.device != "cuda":
        raise UnsupportedPatchError("torch.compile backend 'cudagraphs' needs CUDA ranks: use 'inductor' with "
                                    "device cpu, or set Parallel Config's device to cuda")
    return spec


def _detected_model_config(family_name, path, header, sd):
    """ComfyUI's supported_models config for the file, as its own loader picks it: the family may name the class
    itself (`_family_model_config`), and the file's metadata reaches the detection (0.33 picks Animate 2 and FlowRVS
    from it)."""
    import comfy.model_detection

    named = _family_model_config(family_name, header) if family_name else None
    if named is not None:
        return named
    return comfy.model_detection.model_config_from_unet(sd, "", metadata=_file_metadata(path))


def _file_metadata(path) -> dict | None:
    """A safetensors file's metadata, as comfy.sd hands it to the detection (the header bytes only: this process
    never opens tensor data)."""
    return backend("weights.reads").read_metadata(str(path)) or None


def host_model_config(family_name, path, precision, header):
    """(ComfyUI's supported_models config for the file, its meta state dict, the diffusion model class ComfyUI's
    detection builds for it), from the header (and the metadata) alone."""
    sd, _ = backend("models.host").meta_state_dict(header)
    model_config = _detected_model_config(family_name, path, header, sd)
    if model_config is None:
        raise RuntimeError(f"ComfyUI does not recognise {path} as a diffusion model it knows")
    dtype = backend("weights.reads").compute_dtype(precision)
    model_config.set_inference_dtype(dtype, None)
    # ComfyUI's own class for this file, as its detection builds it (on meta: no memory, ~30 ms for 14B): the proxy
    # calls its forward, which runs the host's DIFFUSION_MODEL wrappers
    host_class = type(model_config.get_model(sd, "", device=torch.device("meta")).diffusion_model)
    return model_config, sd, host_class


def detected_host_class(path, header) -> str | None:
    """'<supported_models class> (<diffusion model class>)' ComfyUI's own detection gives the file, or None."""
    sd, _ = backend("models.host").meta_state_dict(header)
    try:
        model_config = _detected_model_config(None, path, header, sd)
        if model_config is None:
            return None
        model = model_config.get_model(sd, "", device=torch.device("meta")).diffusion_model
    except Exception:  # a file ComfyUI half-recognises: nothing to name
        return None
    return f"{type(model_config).__name__} ({type(model).__name__})"


def refuse_unsupported_class(family_name, path, header):
    """Before any rank starts: the model class ComfyUI detects for the file must be one the family runs; the
    refusal names the class and the reason."""
    family = backend("models").FAMILIES.get(family_name)
    check = getattr(family, "variant_of", None)
    if check is None:
        return
    _, _, host_class = host_model_config(family_name, path, "fp32", header)
    try:
        check(host_class.__name__)
    except ValueError as e:
        raise ValueError(f"{os.path.basename(path)}: {e}") from None


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
    # activations live on the ranks, not in this process
    base.memory_required = lambda *a, **k: 0
    logging.info("parallel_dit: %s as %s on %s", path, type(model_config).__name__, config.describe())
    return parallel_model_patcher_class()(base, load_device=comfy.model_management.get_torch_device(),
                                          offload_device=comfy.model_management.unet_offload_device())


def _family_model_config(family_name, header):
    """ComfyUI's supported_models config for the file when its family provides one: `comfy_model_config(header)`
    gives (class name in comfy.supported_models, unet_config read from the header); else None."""
    family = backend("models").FAMILIES.get(family_name)
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
            from .gpu_sharing import release_reservation
            release_reservation()

    unload_all_models._pdit_wrapped = True
    mm.unload_all_models = unload_all_models


def install_lora_hook():
    """Native LoRA loaders (LoraLoader, LoraLoaderModelOnly, and any node that calls
    comfy.sd.load_lora_for_models) on the pack's MODEL: the model part is merged into every rank's shard, exactly as
    Parallel LoRA does it (the LoRA's tensors, as the node loaded them, stay with the MODEL and are written into the
    worker group's folder for the ranks to read their slices from: lora_check.py); a CLIP part is applied natively.
    Any other MODEL, and every argument this pack does not know (0.21+ passes `lora_metadata`), goes to ComfyUI's own
    function unchanged.

    Why a wrapper and not an extension point: ComfyUI maps a LoRA's keys to the model's from the model's
    state_dict(), which the proxy cannot fill without also telling ComfyUI's memory manager, hooks and merges that
    it holds the whole model in this process."""
    import comfy.sd
    if getattr(comfy.sd.load_lora_for_models, "_pdit_wrapped", False):
        return
    original = comfy.sd.load_lora_for_models
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_lora_for_models(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # not a call this pack understands: ComfyUI's own function says what is wrong
            return original(*args, **kwargs)
        model = bound.arguments.get("model")
        proxy = parallel_model_of(model) if model is not None else None
        if proxy is None:
            return original(*args, **kwargs)
        return parallel_lora_for_models(original, bound, proxy)

    load_lora_for_models._pdit_wrapped = True
    comfy.sd.load_lora_for_models = load_lora_for_models


def parallel_lora_for_models(original, bound, proxy):
    """load_lora_for_models on the pack's MODEL (`bound`: the call's arguments by name): ComfyUI's own function for
    the CLIP part (model None, every other argument as given), the ranks for the model part; the model keeps what
    the native path attaches to it (`lora_metadata`)."""
    args = dict(bound.arguments)
    model, strength_model = args["model"], args["strength_model"]
    new_clip = None
    if args.get("clip") is not None:
        new_clip = original(**{**args, "model": None, "strength_model": 0.0})[1]
    if strength_model == 0:
        return model, new_clip
    patched, _ = with_parallel_lora(model, proxy, LoraTensors(args["lora"]), strength_model)
    metadata = args.get("lora_metadata")
    if metadata and hasattr(patched, "set_attachments"):
        patched.set_attachments("lora_metadata", metadata)
    return patched, new_clip


def with_parallel_lora(model, proxy, source, strength) -> tuple:
    """(a clone of the pack's MODEL with the LoRA `source` added at `strength`, merged on the ranks; the LoRA's report:
    how many of its tensors apply). `source`: a models/loras path, or a native loader's LoraTensors. A LoRA of the
    wrong shape is refused here, before any rank reads it."""
    report = check_lora(proxy, source, strength)
    lora_proxy = proxy.with_loras(tuple(proxy.loras) + ((source, float(strength)),))
    patched = model.clone()
    patched.add_object_patch("diffusion_model", lora_proxy)
    group = proxy.warm_group()
    if proxy.resident or not group.holds_other_models(proxy.path, proxy.precision):
        lora_proxy.group()  # merge now, so a LoRA that does not fit fails here, naming its file
    # else: the group holds another model a sampler of this graph may still use (Parallel Model Loader's
    # "swap"); this model and its LoRAs are loaded when its own sampler first calls it
    return patched, report
