"""The pack's two hooks into ComfyUI's own functions: "Unload models" stops the worker group, and the native LoRA
loaders on the pack's MODEL merge on the ranks. Any other MODEL, and every argument the pack does not know, goes to
ComfyUI's function unchanged."""
import functools
import inspect

from . import engine
from .gpu_sharing import release_reservation
from .lora_check import LoraTensors, with_parallel_lora
from .proxy import parallel_model_of


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
            engine.group.stop_all()
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
