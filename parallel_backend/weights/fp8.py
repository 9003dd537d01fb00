"""fp8 checkpoints: layers that keep their (sharded) weight in float8 and upcast per call, and the rules by which
ComfyUI reads fp8 files.

- plain fp8 files ("..._fp8_e4m3fn.safetensors"): float8 weights, no scales;
- ComfyUI's "fp8_scaled" files: a per-tensor `<layer>.scale_weight` beside each fp8 `<layer>.weight` and a
  `scaled_fp8` marker key. ComfyUI builds every Linear of such a model in the marker's fp8 dtype
  (comfy.ops.scaled_fp8_ops), so the linears' biases are held in fp8 too.

A Linear whose checkpoint weight is float8 becomes an Fp8Linear before the plan's hooks are registered
(swap_fp8_linears); weights/reads.py fills it. Other fp8 tensors are dequantized on load.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.collectives import all_reduce
from ..parallel.plan import replace_module
from ..parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

FP8_ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FP8_DTYPES = tuple(FP8_ST_DTYPES.values())
# per-tensor weight scales: ComfyUI's scaled_fp8 layout, and its newer mixed-precision layout
WEIGHT_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
# tensors beside the weights that are not model parameters
AUX_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")
MARKER_KEYS = ("scaled_fp8",)


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



def swap_fp8_linears(model, key_map, header, dtype, keep_fp32) -> int:
    """Replace linears whose checkpoint weight is fp8 by Fp8Linear (on meta, before loading). Runs before the
    plan's sequence hooks are registered; `replace_module` would carry them over if it ran after."""
    n = 0
    for name, module in list(model.named_modules()):
        if not name or not is_linear(module) or isinstance(module, Fp8Linear):
            continue
        wname = f"{name}.weight"
        key = key_map.get(wname)
        if key is None or key not in header or header[key][1] not in FP8_ST_DTYPES or keep_fp32(wname):
            continue  # modules diffusers keeps in fp32 are dequantized on load instead
        replace_module(model, name, Fp8Linear(module, dtype))
        n += 1
    return n




class Fp8Linear(nn.Module):
    """A Linear (plain, column- or row-parallel) whose weight stays float8 in memory.

    The loader puts this in place of a linear whose checkpoint weight is float8 (e4m3fn / e5m2): the
    weight (its TP shard) is kept as fp8 and upcast per call to `compute_dtype`, with ComfyUI's
    "scaled fp8" per-tensor scale applied the way ComfyUI's scaled_fp8 ops do it
    (`weight.to(dtype) * scale_weight.to(dtype)`). A per-tensor scale is shared by every TP shard.
    `scale_weight` is None for plain fp8 files. The parameter names (`weight`, `bias`) and shard
    dims are the wrapped layer's, so the checkpoint key map and sharded reads are unchanged.
    """

    def __init__(self, src: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        self.row_parallel = isinstance(src, RowParallelLinear)
        self.tp_group = getattr(src, "tp_group", None)
        self.tp_rank, self.tp_size = getattr(src, "tp_rank", 0), getattr(src, "tp_size", 1)
        self.shard_dims = dict(getattr(src, "shard_dims", {}) or {})
        self.compute_dtype = compute_dtype
        self.weight = src.weight
        self.bias = src.bias
        self.register_buffer("scale_weight", None)

    def dequantized_weight(self) -> torch.Tensor:
        w = self.weight.to(self.compute_dtype)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(self.compute_dtype)
        return w

    def forward(self, x):
        w = self.dequantized_weight()
        if not self.row_parallel:
            return F.linear(x, w, self.bias)
        y = F.linear(x, w)
        if self.tp_size > 1:
            y = all_reduce(y, self.tp_group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, weight={self.weight.dtype}, "
                f"compute={self.compute_dtype}, scaled={self.scale_weight is not None}, row={self.row_parallel}")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear, Fp8Linear))
