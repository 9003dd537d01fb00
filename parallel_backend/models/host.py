"""The host's own model classes inside a rank: ComfyUI imported there (never in the engine's other modules), and the
diffusion model built on the meta device exactly as ComfyUI's detection builds it for a file.

Import order matters on GPUs: ComfyUI's model_management probes the current device when it is imported, so a rank
imports it only after `torch.cuda.set_device` (runtime/rendezvous.py does that first); without it every rank would
open a CUDA context on GPU 0. Argument parsing is off (the rank's argv is not ComfyUI's) and `--cpu` follows the
group's device.
"""
from __future__ import annotations

import json

import torch

from ..weights.fp8 import AUX_SUFFIXES, FP8_DTYPES, PER_TENSOR_FORMATS, WEIGHT_STORAGE
from ..weights.reads import meta_tensors, read_metadata


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


def supported_model_if_any(name: str) -> str | None:
    """`name` if this host's comfy.supported_models has the class, else None (a family newer than the host)."""
    import comfy.supported_models
    return name if hasattr(comfy.supported_models, name) else None


def newer_class_refusal(class_name: str | None, label: str, supported: str, module: str, model_class: str) -> str:
    """What to say about a file of a family the host lacks (class_name None) or detects as another class."""
    seen = (f"this ComfyUI has no {supported} model class (supported_models.{supported}, {module})"
            if class_name is None else f"ComfyUI detects this {label} file as {class_name}")
    return (f"{seen}; the parallel loader runs ComfyUI's own {model_class} (ComfyUI 0.33 and newer): "
            f"update ComfyUI to a release with {label}")


def variant_entry(variants: dict, not_yet: dict, class_name: str, family_label: str) -> dict:
    """A family's VARIANTS entry for a host class; raises with the class name and the reason for one the pack cannot
    run (the family's NOT_YET), naming the classes it can."""
    if class_name in variants:
        return variants[class_name]
    why = not_yet.get(class_name, "the pack has no parallel plan for this class")
    raise ValueError(f"ComfyUI detects this file as {class_name}, which the parallel loader cannot run yet: {why}. "
                     f"Sample it with the native Load Diffusion Model (UNETLoader); supported {family_label} classes: "
                     f"{', '.join(variants)}")


def build_newer_family(family, header: dict, compute_dtype: torch.dtype, path: str, storage: str | None):
    """The host's class for a family newer than some hosts (MiniMax H3, Kandinsky 5): refused by class name where the
    host lacks it, else built on meta from the family's unet config."""
    if family.host_class_name() is None:
        family.variant_of(None)
    return build_host_model(header, compute_dtype, path, family.comfy_model_config(header)[1], storage=storage)


def meta_state_dict(header: dict) -> tuple[dict, str]:
    """(key -> meta tensor, prefix) with ComfyUI's diffusion-model prefix stripped, as comfy.sd strips it."""
    import comfy.model_detection

    sd = meta_tensors(header)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    stripped = {k[len(prefix):]: v for k, v in sd.items() if prefix and k.startswith(prefix)}
    return (stripped, prefix) if stripped else (sd, "")


def _declared(config, name: str):
    """`config.<name>` where ComfyUI's model config declares it, else None (an undeclared attribute logs a warning
    there: 0.33 has `quant_config` and no `scaled_fp8`, 0.3.75 `scaled_fp8` and `layer_quant_config`)."""
    declared = name in vars(config) or any(name in vars(c) for c in type(config).__mro__)
    return getattr(config, name) if declared else None


def _quant_tensors(path: str, header: dict, prefix: str) -> dict:
    """The file's small tensors that ComfyUI's quantization code reads by value (`comfy_quant` json bytes, scales),
    under the model's names: a meta tensor has no value (convert_old_quants reads `scale_input`, the layers parse
    `comfy_quant`)."""
    keys = [k for k in header if k.endswith(AUX_SUFFIXES) and (not prefix or k.startswith(prefix))]
    if not keys or not path.endswith((".safetensors", ".sft")):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in keys}


def host_state_dict(header: dict, path: str) -> tuple[dict, dict, str]:
    """(state dict, metadata, prefix) as ComfyUI's diffusion-model load hands them to its detection: the header's
    meta tensors (the quantization's small tensors read for real), the prefix stripped, and on a host with the
    mixed-precision system (comfy.utils.convert_old_quants: 0.33.0, and unchanged in Comfy-Org/ComfyUI 09708eae)
    converted by it: a scaled-fp8 file's layers become per-layer `comfy_quant` + `weight_scale` (a `scale_input` of
    1 dropped), the file's `_quantization_metadata` per-layer `comfy_quant` keys."""
    import comfy.utils

    sd, prefix = meta_state_dict(header)
    sd.update(_quant_tensors(path, header, prefix))
    metadata = read_metadata(path)
    if hasattr(comfy.utils, "convert_old_quants"):
        sd, metadata = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
    elif any(k.endswith(".comfy_quant") for k in sd):
        # ComfyUI 0.3.75 reads these layers as plain fp8 weights and ignores their scales (its output is NaN)
        raise ValueError(f"{path}: the file's layers carry `comfy_quant` quantization keys, which this ComfyUI "
                         f"does not read (it predates its mixed-precision loader, comfy.utils.convert_old_quants): "
                         f"update ComfyUI, or use a file without them (fp8_scaled, bf16)")
    return sd, metadata, prefix


def _detect(sd: dict, metadata: dict, path: str):
    """ComfyUI's model config for the state dict (with the file's metadata where its detection takes it)."""
    import inspect

    import comfy.model_detection

    detect = comfy.model_detection.model_config_from_unet
    extra = {"metadata": dict(metadata)} if metadata and "metadata" in inspect.signature(detect).parameters else {}
    model_config = detect(sd, "", **extra)  # (0.3.75: pops the scaled_fp8 marker from sd)
    if model_config is None:
        raise ValueError(f"{path}: ComfyUI does not recognise this file as a diffusion model it knows")
    return model_config


def build_host_model(header: dict, compute_dtype: torch.dtype, path: str = "<file>", unet_config: dict | None = None,
                     storage: str | None = None):
    """ComfyUI's diffusion model for this file, on meta, with ComfyUI's own operations for its dtypes:
    - a plain fp8 file keeps its weights fp8 (unet dtype fp8, cast per layer to `compute_dtype`), as ComfyUI does on
      a GPU with fp8 compute or with the UNETLoader's fp8 weight dtype;
    - a scaled-fp8 file (`scaled_fp8` marker) gets ComfyUI 0.3.75's scaled-fp8 layers (linears in fp8 with their
      scale); a file ComfyUI reads with its mixed-precision ops (any quantized file on a host with
      convert_old_quants, a `_quantization_metadata` file on 0.3.75) gets those, in `compute_dtype`, and
      `model.host_quant` (HostQuantLayers) loads its layers as they load themselves;
    - any other file is held in `compute_dtype`.
    `unet_config` updates the config ComfyUI's detection gives (a family that reads what the detection guesses from
    the file, e.g. Cosmos' depth); the supported_models class and the fp8 markers stay the detection's.
    `storage` (a key of fp8.WEIGHT_STORAGE): the weights held in that dtype and cast per layer, as UNETLoader's
    weight_dtype makes ComfyUI hold them (`_fast`: its fp8 matmul where the device has one).
    Returns (model, model_config, prefix): the checkpoint key of parameter `n` is `prefix + n`."""
    sd, metadata, prefix = host_state_dict(header, path)
    model_config = _detect(sd, metadata, path)
    if unet_config is not None:
        model_config.unet_config.update(unet_config)
    mixed = _declared(model_config, "quant_config") or _declared(model_config, "layer_quant_config")
    weight_dtypes = {t.dtype for t in sd.values() if t.ndim >= 2}
    fp8 = next((d for d in FP8_DTYPES if d in weight_dtypes), None)
    if storage is not None:
        if mixed or _declared(model_config, "scaled_fp8") is not None:
            raise ValueError(f"{path}: the file is already quantized; set Parallel Model Loader's weight_dtype to "
                             f"default")
        unet_dtype, fast = WEIGHT_STORAGE[storage]
        manual_cast = compute_dtype
        if fast:
            model_config.optimizations["fp8"] = True
    elif fp8 is not None and _declared(model_config, "scaled_fp8") is None and not mixed:
        unet_dtype, manual_cast = fp8, compute_dtype
    else:  # (mixed precision: ComfyUI casts to its manual-cast dtype; the pack's is the compute precision)
        unet_dtype, manual_cast = compute_dtype, (compute_dtype if mixed else None)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    base = model_config.get_model(sd, "", device=torch.device("meta"))
    model = base.diffusion_model
    model.requires_grad_(False)
    # the layers by the host's module names: its load renames the file's keys first (HunyuanVideo's released names)
    model.host_quant = HostQuantLayers(model, model_config.process_unet_state_dict(dict(sd)), path,
                                       _declared(model_config, "layer_quant_config")) if mixed else None
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


def build_with_pos_embed(header: dict, compute_dtype: torch.dtype, path: str, unet_config: dict,
                         storage: str | None = None):
    """`build_host_model` for ComfyUI's Cosmos classes (MiniTrainDIT, GeneralDIT): their rope's frequency ranges are
    computed buffers, not in the state dict ComfyUI loads, so the host's own `build_pos_embed` makes them for real
    after the meta build; the learnable extra embedding (parameters, read from the file) stays as built."""
    model, model_config, prefix = build_host_model(header, compute_dtype, path, unet_config=unet_config,
                                                   storage=storage)
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


def _string_to_seed(key: str) -> int:
    """ComfyUI's seed for a parameter's stochastic rounding (comfy.utils since ~0.4; comfy.model_patcher before, where
    0.33 still has a shim that logs a warning on every call)."""
    import comfy.utils

    seed = getattr(comfy.utils, "string_to_seed", None)
    if seed is None:
        from comfy.model_patcher import string_to_seed as seed
    return seed(key)


def host_store_weight(module, pname: str, weight: torch.Tensor, name: str) -> torch.Tensor:
    """What ComfyUI's ModelPatcher stores for a patched parameter held in fp8 (patch_weight_to_device): the layer's
    own `set_weight` (scaled fp8: divide by its scale, then stochastic rounding) for a weight, else stochastic
    rounding to the parameter's dtype, seeded by the parameter's key in the BaseModel (`diffusion_model.<name>`).
    `weight`: the whole patched layer (fp32); the rounding's random stream spans it, so ranks slice afterwards.
    (A layer of ComfyUI's mixed-precision ops goes through HostQuantLayers.merge_whole instead.)"""
    import comfy.float

    seed = _string_to_seed(f"diffusion_model.{name}")
    if pname == "weight" and hasattr(module, "set_weight"):
        return module.set_weight(weight, return_weight=True, seed=seed)
    return comfy.float.stochastic_rounding(weight, getattr(module, pname).dtype, seed=seed)


# ---- ComfyUI's mixed-precision layers (comfy.ops.mixed_precision_ops) --------------------------------------------
def _loads_own_weight(module) -> bool:
    """A layer of ComfyUI's mixed-precision ops: built without a weight, which its `_load_from_state_dict` makes
    (a QuantizedTensor, or the compute precision for a layer the file does not quantize)."""
    return hasattr(module, "factory_kwargs") and hasattr(module, "set_weight") and "weight" not in module._parameters


def _layer_format(extras: dict, name: str, layer_quant_config) -> str | None:
    """The quantization format of layer `name` (None: not quantized): its `comfy_quant` json (0.33+), or the
    file's metadata as ComfyUI 0.3.75 read it (`layer_quant_config`)."""
    if "comfy_quant" in extras:
        return json.loads(extras["comfy_quant"].numpy().tobytes()).get("format")
    return ((layer_quant_config or {}).get(name) or {}).get("format")


class HostQuantLayers:
    """The Linears of a model built with ComfyUI's mixed-precision ops. Each quantized one receives exactly what
    ComfyUI's load gives it, through its own `_load_from_state_dict`: this rank's slice of the stored weight (the
    pack's loader reads it into a placeholder parameter made here) with the layer's other tensors (its
    `comfy_quant`, per-tensor scales) whole. A layer the file does not quantize is held in the compute precision as
    the host holds it (its placeholder is all it needs). Under sharded weights the stored data stays FSDP's
    parameter, and the layer is loaded from the gathered data each time it runs."""

    def __init__(self, model, sd: dict, path: str, layer_quant_config=None):
        self.path, self.formats, self.extras, self.full_shape = path, {}, {}, {}
        self.merged = {}  # layer -> its tensors after a LoRA merge (the recalculated scale), until restored
        self.gathered = {}  # layer -> FSDP's gathered weight while the layer runs (sharded weights)
        self.whole = {}  # other layers the file quantizes (0.33's quantized Embedding): loaded whole, by themselves
        for name, module in model.named_modules():
            if not _loads_own_weight(module):
                self._note_whole(module, name, sd)
                continue
            w = sd.get(name + ".weight")
            if w is None:
                raise ValueError(f"{path}: no weight for {name}, a layer of the model ComfyUI detected")
            stem = name + "."
            extras = {k[len(stem):]: v for k, v in sd.items()
                      if k.startswith(stem) and "." not in k[len(stem):] and k[len(stem):] not in ("weight", "bias")}
            fmt = _layer_format(extras, name, layer_quant_config)
            dtype = w.dtype if fmt is not None else module.factory_kwargs["dtype"]
            module.weight = torch.nn.Parameter(torch.empty(w.shape, dtype=dtype, device="meta"), requires_grad=False)
            if fmt is not None:
                self.formats[name], self.full_shape[name] = fmt, (module.out_features, module.in_features)
                self.extras[name] = self._with_values(extras, name)

    def _note_whole(self, module, name: str, sd: dict) -> None:
        """A layer that holds a weight from its build but that the file quantizes (a `comfy_quant` entry; ComfyUI
        0.33's mixed-precision Embedding): the loader reads its stored data as stored, and the layer then loads
        itself from it whole (no plan splits such a layer)."""
        conf, w = sd.get(name + ".comfy_quant"), sd.get(name + ".weight")
        if conf is None or w is None or "weight" not in module._parameters:
            return
        stem = name + "."
        extras = {k[len(stem):]: v for k, v in sd.items()
                  if k.startswith(stem) and "." not in k[len(stem):] and k[len(stem):] not in ("weight", "bias")}
        module.weight = torch.nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
        self.whole[name] = self._with_values(extras, name)

    def _load_whole(self, model, device) -> None:
        for name, extras in self.whole.items():
            module = model.get_submodule(name)
            sd = {f"{name}.weight": module._parameters["weight"].detach(),
                  **{f"{name}.{k}": (v if k == "comfy_quant" else v.to(device)) for k, v in extras.items()}}
            missing, unexpected, errors = [], [], []
            module._load_from_state_dict(sd, name + ".", {}, False, missing, unexpected, errors)
            if errors:
                raise ValueError(f"{self.path}: ComfyUI could not load {name}: {'; '.join(map(str, errors))}")

    def _with_values(self, extras: dict, name: str) -> dict:
        """A quantized layer's tensors beside its weight, every one read from the file (host_state_dict)."""
        meta = sorted(k for k, v in extras.items() if v.is_meta)
        if meta:
            raise ValueError(f"{self.path}: {name} is quantized with tensors the pack does not read ({meta}); "
                             f"sample this file with ComfyUI's own loader")
        return extras

    def _present(self, model):
        """(name, layer) of each quantized layer this rank runs (a pipeline stage has none of another's blocks)."""
        for name in self.formats:
            try:
                yield name, model.get_submodule(name)
            except AttributeError:
                continue

    def holds(self, param: str) -> bool:
        """Whether parameter `param` is the weight of a quantized layer."""
        return param.endswith(".weight") and param[:-len(".weight")] in self.formats

    def sliceable(self, name: str) -> bool:
        """A per-tensor format whose scales are one number each: a slice of the weight keeps them."""
        return self.formats[name] in PER_TENSOR_FORMATS and all(
            v.numel() == 1 for k, v in self.extras[name].items() if k != "comfy_quant")

    def refuse_split_blocks(self, model) -> None:
        """Before loading: a layer whose scales are per block (mxfp8, nvfp4, ...) cannot be split over
        tensor-parallel ranks or sharded weights (its scales would need slicing with the weight)."""
        from ..parallel.plan import shard_dim_of
        from ..parallel.sharded_weights import is_sharded

        for name, module in self._present(model):
            w = module._parameters["weight"]
            if (is_sharded(w) or shard_dim_of(model, name + ".weight")[0] is not None) and not self.sliceable(name):
                raise ValueError(f"{self.path}: {name} is quantized as {self.formats[name]}, {self._why_whole(name)}"
                                 f": the pack cannot split it over tensor-parallel ranks or sharded weights; load this "
                                 f"file with tp 1 and weights 'replicated' (ulysses, ring, cfg and pp split no "
                                 f"weights)")

    def _why_whole(self, name: str) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.extras[name].items() if k != "comfy_quant" and v.numel() > 1}
        if shapes:
            return f"whose scales are per block ({shapes})"
        return ("whose layer quantizes each token's input over all its channels as it computes (int8 / ConvRot "
                "formats; a slice of the channels would change the rounding) or which the pack slices no further")

    def _tensors(self, name: str, device, merged: bool = True) -> dict:
        """The layer's tensors beside its weight (the file's, or those of a LoRA merge), on `device` (its json bytes
        stay on the CPU, where it parses them)."""
        extras = self.merged.get(name, self.extras[name]) if merged else self.extras[name]
        return {k: (v if k == "comfy_quant" else v.to(device)) for k, v in extras.items()}

    def _host_load(self, module, name: str, weight: torch.Tensor, extras: dict) -> None:
        """The layer's own `_load_from_state_dict` with this weight (a slice, or the gathered whole) and its tensors,
        exactly as ComfyUI's load_state_dict calls it (prefix = the layer's path in the diffusion model)."""
        module.factory_kwargs["device"] = weight.device  # (built on meta: its load moves what it reads to this)
        sd = {f"{name}.weight": weight.detach(), **{f"{name}.{k}": v for k, v in extras.items()}}
        missing, unexpected, errors = [], [], []
        module._load_from_state_dict(sd, name + ".", {}, False, missing, unexpected, errors)
        if errors:
            raise ValueError(f"{self.path}: ComfyUI could not load {name}: {'; '.join(map(str, errors))}")

    def install(self, model, device, names=None) -> None:
        """After the loader filled the placeholders (all, or the parameters `names` it re-read after a LoRA): each
        quantized layer loads itself from its slice, with the file's tensors again."""
        from ..parallel.sharded_weights import is_sharded

        if names is None:
            self._load_whole(model, device)
        for name, module in self._present(model):
            if names is not None and name + ".weight" not in names:
                continue
            self.merged.pop(name, None)
            weight = module._parameters["weight"]
            if is_sharded(weight):
                self._load_when_gathered(module, name)
            else:
                self._host_load(module, name, weight, self._tensors(name, device))

    def _load_when_gathered(self, module, name: str) -> None:
        """Sharded weights: FSDP gathers the layer's stored data into its weight before its block runs; the layer
        then loads itself from it for the call, and gets FSDP's parameter back after (FSDP reshards that)."""
        if getattr(module, "_pdit_quant_hooks", None):
            return

        def load(mod, _args):
            self.gathered[name] = gathered = mod._parameters["weight"]
            # (FSDP's load_state_dict pre-hook would reshard the block: this is the layer reading its gathered data)
            hooks = mod._load_state_dict_pre_hooks
            mod._load_state_dict_pre_hooks = type(hooks)()
            try:
                self._host_load(mod, name, gathered, self._tensors(name, gathered.device))
            finally:
                mod._load_state_dict_pre_hooks = hooks

        def restore(mod, _args, out):
            mod._parameters["weight"] = self.gathered.pop(name)
            return out

        module._pdit_quant_hooks = (module.register_forward_pre_hook(load), module.register_forward_hook(restore))

    def merge_whole(self, model, param: str, raw: torch.Tensor, patch) -> set:
        """A LoRA on a quantized layer, as ComfyUI's ModelPatcher.patch_weight_to_device does it, on the whole layer:
        the stored weight cast to the LoRA compute dtype and converted (dequantized) by the layer, patched (`patch`:
        whole base -> whole patched, ComfyUI's calculate_weight), stored back by the layer's `set_weight` (requantized
        with a recalculated scale, stochastic rounding seeded by the key); this rank then keeps its slice of the new
        stored data, with the new scale. `raw`: the file's whole stored weight. Returns the parameters it changed."""
        import comfy.model_management as mm

        from ..parallel.sharded_weights import local_tensor

        name = param[:-len(".weight")]
        module = model.get_submodule(name)
        device = local_tensor(module._parameters["weight"]).device
        out_features, in_features = self.full_shape[name]
        whole = type(module)(in_features, out_features, bias=False, device=device)  # the layer as ComfyUI holds it
        self._host_load(whole, name, raw.to(device), self._tensors(name, device, merged=False))
        dtype = mm.lora_compute_dtype(device) if hasattr(mm, "lora_compute_dtype") else torch.float32  # (0.3.75: fp32)
        temp = whole.convert_weight(mm.cast_to_device(whole.weight, device, dtype, copy=True), inplace=True)
        whole.set_weight(patch(temp).to(temp.dtype), seed=_string_to_seed(f"diffusion_model.{param}"))
        self._keep_slice(model, module, name, _stored_tensors(whole))
        return {param}

    def _keep_slice(self, model, module, name: str, stored: dict) -> None:
        """This rank's slice of a layer's new stored data (`stored`: the whole layer's tensors as it stores them)."""
        from ..parallel.plan import shard_chunks_of, shard_dim_of
        from ..parallel.sharded_weights import is_sharded, local_tensor
        from ..weights.reads import shard_of

        data = stored.pop("weight")
        self.merged[name] = {**self.extras[name], **stored}
        dim, rank, parts = shard_dim_of(model, name + ".weight")
        part = shard_of(data, dim, rank, parts, shard_chunks_of(model, name + ".weight"))
        weight = module._parameters["weight"]
        if is_sharded(weight):  # FSDP's rows; the gathered whole loads itself with the new scale when it runs
            local_tensor(weight).copy_(part)
        else:
            self._host_load(module, name, part.contiguous(), self._tensors(name, part.device))


def _stored_tensors(layer) -> dict:
    """A mixed-precision layer's weight as it stores it, with its scales: its own serialization where it has one
    (0.33+: `state_dict` gives the stored data, `weight_scale`, ..., `comfy_quant`), else (0.3.75, whose only layout
    is per-tensor fp8) its QuantizedTensor's data and scale from the layout's `get_plain_tensors`."""
    sd = layer.state_dict()
    if "comfy_quant" in sd:
        return {k: v for k, v in sd.items() if k != "bias"}
    import comfy.quant_ops

    data, scale = comfy.quant_ops.LAYOUTS[layer.weight.layout_type].get_plain_tensors(layer.weight)
    return {"weight": data, "weight_scale": scale}
