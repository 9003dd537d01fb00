"""GPUs shared by the ranks and ComfyUI: what ComfyUI holds on a rank's GPU (text encoders, VAE, other models) is
freed through ComfyUI's own model management before the group loads and before each sampling run, and ComfyUI's
memory manager is told what the ranks keep on its own GPU, so it does not load a text encoder there mid-run.

ComfyUI 0.3.75: `comfy.model_management.free_memory(bytes, device)` unloads ComfyUI's models from one device until
that many bytes are free; `EXTRA_RESERVED_VRAM` is what ComfyUI keeps free on its device for "other applications"
(every load decision subtracts it). Newer hosts (0.38+) may run ComfyUI's device under dynamic VRAM
(`comfy.cli_args.enables_dynamic_vram()`, read, not run here): the reservation is still made where the attribute
exists, and a rank sharing ComfyUI's GPU under dynamic VRAM is logged with the advice to keep ranks off it
(`devices` on Parallel Config). Nothing here runs on CPU ranks (their memory is the host's, which ComfyUI does not
manage)."""
from __future__ import annotations

import logging

_reserved: dict = {"bytes": 0}  # what this pack added to ComfyUI's reserve (restored when the group stops)


def _mm():
    import comfy.model_management as mm
    return mm


def comfy_gpu_index() -> int | None:
    """The GPU ComfyUI itself computes on (its text encoders and VAE go there), or None off CUDA."""
    dev = _mm().get_torch_device()
    return dev.index if getattr(dev, "type", None) == "cuda" else None


def free_comfy_models_on_rank_gpus(config, rank_bytes: list, reserve: int = 0) -> list:
    """Ask ComfyUI to unload its models from each GPU a rank uses until that rank's bytes (+ `reserve`) are free
    there. Returns [(device, bytes)] of the calls made (none on CPU ranks)."""
    if config.device != "cuda":
        return []
    import torch

    calls, per_device = [], {}
    for rank, index in enumerate(config.device_indices()):
        per_device[index] = per_device.get(index, 0) + rank_bytes[rank] + reserve
    for index, nbytes in sorted(per_device.items()):
        device = torch.device("cuda", index)
        _mm().free_memory(nbytes, device)
        calls.append((device, nbytes))
    return calls


def reserve_on_comfy_gpu(config, rank_bytes: list) -> int:
    """While the ranks hold a model, add what those on ComfyUI's own GPU hold to ComfyUI's reserve (so its memory
    manager keeps that much free there), replacing this pack's earlier reservation. Returns the bytes reserved."""
    mm = _mm()
    if config.device != "cuda" or not hasattr(mm, "EXTRA_RESERVED_VRAM"):
        return 0
    comfy_index = comfy_gpu_index()
    shared = [r for r, index in enumerate(config.device_indices()) if index == comfy_index]
    nbytes = sum(rank_bytes[r] for r in shared)
    mm.EXTRA_RESERVED_VRAM += nbytes - _reserved["bytes"]
    _reserved["bytes"] = nbytes
    if shared:
        dynamic = _dynamic_vram()
        logging.warning("parallel_dit: rank(s) %s run on ComfyUI's own GPU %s; %.1f GiB reserved there%s. Set devices "
                        "on Parallel Config to keep the ranks off it.", shared, comfy_index, nbytes / 2**30,
                        " (ComfyUI runs dynamic VRAM: its own models may still be placed there)" if dynamic else "")
    return nbytes


def release_reservation() -> None:
    """Give back what `reserve_on_comfy_gpu` added (the group stopped)."""
    if _reserved["bytes"]:
        mm = _mm()
        if hasattr(mm, "EXTRA_RESERVED_VRAM"):
            mm.EXTRA_RESERVED_VRAM -= _reserved["bytes"]
        _reserved["bytes"] = 0


def _dynamic_vram() -> bool:
    try:
        from comfy.cli_args import enables_dynamic_vram  # ComfyUI 0.38+
    except ImportError:
        return False
    try:
        return bool(enables_dynamic_vram())
    except Exception:
        return False


def install_pre_run(patcher, config, rank_bytes: list, reserve: int) -> None:
    """Before each sampling run on this MODEL (ComfyUI's ON_PRE_RUN callback, native KSampler or Parallel Sampler),
    free ComfyUI's models from the ranks' GPUs again: a text encoder loaded there since would crowd the ranks."""
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:  # a host without patcher callbacks: the load-time call stands alone
        return
    patcher.add_callback(CallbacksMP.ON_PRE_RUN,
                         lambda _patcher: free_comfy_models_on_rank_gpus(config, rank_bytes, reserve))
