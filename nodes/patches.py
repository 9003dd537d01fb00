"""What crosses to the ranks with a model call, and what is refused because the ranks cannot honour it.

The proxy (proxy.py) sends the call's conditioning tensors and plain values, and the transformer_options ComfyUI's
own model code reads on the ranks; a weight patch, a module injection, ControlNet or an attention override would
change nothing there, so each is refused with a message saying what to change.
"""
import torch

from . import engine


class UnsupportedPatchError(RuntimeError):
    pass


# conds ComfyUI's own WanModel ignores: WAN22 (TI2V-5B) turns denoise_mask into per-frame timesteps
# in process_timestep before the call, and passes it on too; Cosmos Predict2 passes the frame rate `fps`, which
# ComfyUI's own MiniTrainDIT ignores (rope_enable_fps_modulation off). A family that takes one of them (Cosmos 1's
# GeneralDIT scales its rope by `fps`) names it in its conds, and it crosses.
_IGNORED_CONDS = {"denoise_mask", "fps"}


def _batched_list(v, rows: int) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(torch.is_tensor(t) and t.shape[0] == rows for t in v)


def _plain(v, nested: bool = False) -> bool:
    """Numbers, strings, lists of them; inside a dict (a family's payload cond, MiniMax H3's) also tensors and
    dicts: sent with the call."""
    if isinstance(v, (bool, int, float, str)) or (nested and (v is None or torch.is_tensor(v))):
        return True
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x, True) for k, x in v.items())
    return isinstance(v, (list, tuple)) and all(_plain(x, nested) for x in v)


def _on_cpu(v):
    if torch.is_tensor(v):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _on_cpu(x) for k, x in v.items()}
    return type(v)(_on_cpu(x) for x in v) if isinstance(v, (list, tuple)) else v


def crossing_conds(named: dict, conds: tuple, class_name: str, rows: int) -> tuple:
    """(tensors through shared memory, plain values with the call) from the call's conditioning inputs `named`;
    `conds`: those the ranks take for this class. An input they do not take, or one that cannot cross, is refused."""
    sep = engine.sharded_model.LIST_SEP  # a list of tensors crosses as one tensor per item, as the ranks read it
    extras, values = {}, {}
    for k, v in named.items():
        if v is None or (k in _IGNORED_CONDS and k not in conds):
            continue
        if k not in conds:
            raise UnsupportedPatchError(
                f"the parallel model ({class_name}) got the conditioning input '{k}', which its ranks do "
                f"not take yet (they take: {', '.join(conds) or 'none'}); remove the node that adds it, or "
                f"sample with the native model")
        if torch.is_tensor(v):  # batched like x (ComfyUI concatenates conds by row): through shared memory
            extras[k] = v.detach().cpu()
        elif _batched_list(v, rows):  # a list of such tensors (Wan's context_latents): one per item
            extras.update({f"{k}{sep}{i}": t.detach().cpu() for i, t in enumerate(v)})
        elif _plain(v):  # numbers, strings, lists of them (VACE's per-context strengths): with the call
            values[k] = _on_cpu(v)
        else:
            raise UnsupportedPatchError(f"the conditioning input '{k}' of {class_name} is a "
                                        f"{type(v).__name__}, which cannot cross to the worker ranks")
    return extras, values


WEIGHT_PATCH_HELP = (
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
                                        f"{WEIGHT_PATCH_HELP}")


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
