"""The host's own model classes inside a rank: ComfyUI imported there (never in the engine's other modules), and the
diffusion model built on the meta device exactly as ComfyUI's detection builds it for a file.

Import order matters on GPUs: ComfyUI's model_management probes the current device when it is imported, so a rank
imports it only after `torch.cuda.set_device` (runtime/rendezvous.py does that first); without it every rank would
open a CUDA context on GPU 0. Argument parsing is off (the rank's argv is not ComfyUI's) and `--cpu` follows the
group's device.
"""
from __future__ import annotations

import torch

from ..weights.fp8 import FP8_DTYPES
from ..weights.reads import _ST_DTYPES


def import_host(device_type: str):
    """ComfyUI's `comfy` package in this rank. Under ComfyUI the rank inherits its sys.path; elsewhere (scripts,
    tests) $COMFYUI_PATH names the ComfyUI folder, appended last so its own top-level packages shadow nothing."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("comfy") is None:
        path = os.environ.get("COMFYUI_PATH")
        if not path or not os.path.isdir(os.path.join(path, "comfy")):
            raise ImportError("this model family runs ComfyUI's own model class in each rank, and ComfyUI is not "
                              "importable here: run inside ComfyUI, or set COMFYUI_PATH to a ComfyUI folder")
        sys.path.append(path)
    import comfy.options
    comfy.options.args_parsing = False
    from comfy.cli_args import args
    if device_type == "cpu":
        args.cpu = True
    import comfy.model_detection  # noqa: F401
    import comfy.model_management  # noqa: F401
    return comfy


def meta_state_dict(header: dict) -> tuple[dict, str]:
    """(key -> meta tensor, prefix) with ComfyUI's diffusion-model prefix stripped, as comfy.sd strips it."""
    import comfy.model_detection

    sd = {k: torch.empty(shape, dtype=_ST_DTYPES.get(dt, torch.float32), device="meta")
          for k, (shape, dt) in header.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    stripped = {k[len(prefix):]: v for k, v in sd.items() if prefix and k.startswith(prefix)}
    return (stripped, prefix) if stripped else (sd, "")


def build_host_model(header: dict, compute_dtype: torch.dtype, path: str = "<file>", unet_config: dict | None = None):
    """ComfyUI's diffusion model for this file, on meta, with ComfyUI's own operations for its dtypes:
    - a plain fp8 file keeps its weights fp8 (unet dtype fp8, cast per layer to `compute_dtype`), as ComfyUI does on
      a GPU with fp8 compute or with the UNETLoader's fp8 weight dtype;
    - a scaled-fp8 file (`scaled_fp8` marker) gets ComfyUI's scaled-fp8 layers (linears in fp8 with their scale);
    - any other file is held in `compute_dtype`.
    `unet_config` updates the config ComfyUI's detection gives (a family that reads what the detection guesses from
    the file, e.g. Cosmos' depth); the supported_models class and the fp8 markers stay the detection's.
    Returns (model, model_config, prefix): the checkpoint key of parameter `n` is `prefix + n`."""
    import comfy.model_detection

    sd, prefix = meta_state_dict(header)
    model_config = comfy.model_detection.model_config_from_unet(sd, "")  # pops the scaled_fp8 marker from sd
    if model_config is None:
        raise ValueError(f"{path}: ComfyUI does not recognise this file as a diffusion model it knows")
    if unet_config is not None:
        model_config.unet_config.update(unet_config)
    weight_dtypes = {t.dtype for t in sd.values() if t.ndim >= 2}
    fp8 = next((d for d in FP8_DTYPES if d in weight_dtypes), None)
    if fp8 is not None and model_config.scaled_fp8 is None:
        unet_dtype, manual_cast = fp8, compute_dtype
    else:
        unet_dtype, manual_cast = compute_dtype, None
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    base = model_config.get_model(sd, "", device=torch.device("meta"))
    model = base.diffusion_model
    model.requires_grad_(False)
    return model, model_config, prefix


class _PatchFailures:
    """Collects what ComfyUI logs while it patches one key (its adapters log a failure and leave the weight as it
    was: here that becomes an error instead of a silently unmerged layer)."""

    def __init__(self, key: str):
        import logging

        self.key, self.messages = key, []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self._emit

    def _emit(self, record):
        message = record.getMessage()
        if self.key in message:
            self.messages.append(message)

    def __enter__(self):
        import logging

        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger().removeHandler(self.handler)


def build_with_pos_embed(header: dict, compute_dtype: torch.dtype, path: str, unet_config: dict):
    """`build_host_model` for ComfyUI's Cosmos classes (MiniTrainDIT, GeneralDIT): their rope's frequency ranges are
    computed buffers, not in the state dict ComfyUI loads, so the host's own `build_pos_embed` makes them for real
    after the meta build; the learnable extra embedding (parameters, read from the file) stays as built."""
    model, model_config, prefix = build_host_model(header, compute_dtype, path, unet_config=unet_config)
    extra = getattr(model, "extra_pos_embedder", None)
    model.build_pos_embed(device="cpu")
    if extra is not None:
        model.extra_pos_embedder = extra
    return model, model_config, prefix


def host_patch_weight(weight: torch.Tensor, key: str, patches) -> torch.Tensor:
    """`weight` (one whole layer, fp32) patched exactly as ComfyUI's ModelPatcher patches it: each LoRA module's
    tensors become ComfyUI's patch through `comfy.lora.load_lora` (LoRA, DoRA, LoHa, LoKr, OFT, ... as its
    weight_adapter classes read them), applied in order at its strength by `comfy.lora.calculate_weight`.
    `patches`: [({name: tensor} of one module, that module's name, strength), ...]. Raises ValueError where ComfyUI
    finds no patch in a module's tensors or reports that it could not apply one."""
    import comfy.lora

    comfy_patches = []
    for tensors, module, strength in patches:
        # ComfyUI maps a LoRA module to its weight's key; a bias (`.diff_b`) is patched at that key's `.bias`
        weight_key = key[:-len(".bias")] + ".weight" if key.endswith(".bias") else key
        loaded = comfy.lora.load_lora(tensors, {module: weight_key}, log_missing=False)
        if key not in loaded:
            raise ValueError(f"ComfyUI's LoRA loader finds no patch for {key} in {sorted(tensors)[:4]}")
        comfy_patches.append((float(strength), loaded[key], 1.0, None, None))
    with _PatchFailures(key) as failures:
        out = comfy.lora.calculate_weight(comfy_patches, weight, key)
    if failures.messages:
        raise ValueError("; ".join(failures.messages))
    return out


def host_store_weight(module, pname: str, weight: torch.Tensor, name: str) -> torch.Tensor:
    """What ComfyUI's ModelPatcher stores for a patched parameter held in fp8 (patch_weight_to_device): the layer's
    own `set_weight` (scaled fp8: divide by its scale, then stochastic rounding) for a weight, else stochastic
    rounding to the parameter's dtype, seeded by the parameter's key in the BaseModel (`diffusion_model.<name>`).
    `weight`: the whole patched layer (fp32); the rounding's random stream spans it, so ranks slice afterwards."""
    import comfy.float
    from comfy.model_patcher import string_to_seed

    seed = string_to_seed(f"diffusion_model.{name}")
    if pname == "weight" and hasattr(module, "set_weight"):
        return module.set_weight(weight, return_weight=True, seed=seed)
    return comfy.float.stochastic_rounding(weight, getattr(module, pname).dtype, seed=seed)

