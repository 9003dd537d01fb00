"""fp8 / quantized checkpoints: the dtypes, key names and header rules by which ComfyUI reads such files.

- plain fp8 files ("..._fp8_e4m3fn.safetensors"): float8 weights, no scales;
- ComfyUI's "fp8_scaled" files: a per-tensor `<layer>.scale_weight` (and `.scale_input`) beside each fp8
  `<layer>.weight` and a `scaled_fp8` marker key. ComfyUI 0.3.75 builds every Linear of such a model in the marker's
  fp8 dtype (comfy.ops.scaled_fp8_ops), so the linears' biases are held in fp8 too; a host with the mixed-precision
  system (comfy.utils.convert_old_quants, e.g. 0.33) converts the file to the layout below first;
- the mixed-precision layout: per quantized layer `<layer>.comfy_quant` (json bytes: {"format": ...}) or the file's
  `_quantization_metadata` (safetensors metadata), with `<layer>.weight_scale` (per tensor for the fp8 formats, per
  block for mxfp8 / nvfp4), `.weight_scale_2`, `.input_scale`, ... beside the quantized `<layer>.weight`.

The layers themselves are ComfyUI's (comfy.ops, built in each rank by models/host.py): they hold fp8 / quantized
weights and upcast per call as natively. weights/reads.py uses these rules to tell fp8 files and their scales apart,
weights/lora.py to merge into fp8 layers, testing/synthetic.py to write such files.
"""
from __future__ import annotations

import torch

FP8_ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FP8_DTYPES = tuple(FP8_ST_DTYPES.values())
# per-tensor weight scales: ComfyUI's scaled_fp8 layout, and its newer mixed-precision layout
WEIGHT_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
# tensors beside the weights that are not model parameters (the first two: per-tensor fp8 scales of the old layout)
AUX_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2",
                ".pre_quant_scale")
MARKER_KEYS = ("scaled_fp8",)
# mixed-precision formats whose scales are one number per tensor: a slice of the weight keeps the layer's scale, so
# tensor-parallel ranks and sharded weights can split such a layer (every other format's scales are per block)
PER_TENSOR_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def weight_scale_key(header: dict, weight_key: str) -> str | None:
    """The per-tensor scale stored beside `<layer>.weight`, if the file has one."""
    if not weight_key.endswith("weight"):
        return None
    stem = weight_key[:-len("weight")]
    for suffix in WEIGHT_SCALE_SUFFIXES:
        if stem + suffix in header:
            return stem + suffix
    return None


def scaled_fp8_dtype(header: dict) -> torch.dtype | None:
    """The fp8 dtype of ComfyUI's `scaled_fp8` marker (None: not a scaled-fp8 file). ComfyUI then builds every
    Linear of the model in this dtype (comfy.ops.scaled_fp8_ops with override_dtype), so each linear weight *and
    bias* it loads is held in fp8, with the file's per-tensor `scale_weight` (1 where the file has none)."""
    for k, (_, dt) in header.items():
        if k.rpartition(".")[2] in MARKER_KEYS:
            # ComfyUI: a float32 marker means e4m3fn (model_detection.model_config_from_unet)
            return FP8_ST_DTYPES.get(dt, torch.float8_e4m3fn)
    return None


# UNETLoader's `weight_dtype` choices (and Parallel Model Loader's): ComfyUI holds the weights in this dtype and casts
# them per layer to the compute precision; `_fast` also turns on its fp8 matmul where the device has one
WEIGHT_STORAGE = {"fp8_e4m3fn": (torch.float8_e4m3fn, False), "fp8_e4m3fn_fast": (torch.float8_e4m3fn, True),
                  "fp8_e5m2": (torch.float8_e5m2, False)}
