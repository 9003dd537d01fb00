"""GGUF layers in a rank: a host Linear whose weight the file holds quantized keeps it quantized (its rows' bytes,
1 byte per element for Q8_0, ~0.56 for Q4_K) and dequantizes it per call, on the rank's device, with
`gguf_kernels.dequantize_torch` -- the ComfyUI-GGUF way, applied after the plan's TP swap (a column-parallel
layer's rows are whole quant blocks; a row-parallel split that does not fall on a block boundary cannot stay
quantized: that layer is dequantized at load and named in the load stats). Under sharded weights the byte rows are
what FSDP shards and gathers. A plain LoRA on such a layer is applied as its low-rank factors at compute time
(x W^T + s (x D^T) U^T), so the weight stays quantized."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gguf import QUANT_BLOCKS, QUANTIZED_TYPES, column_slice_on_block_boundary
from .gguf_kernels import dequantize_torch

_CARRIED = ("shard_dims", "tp_group", "tp_rank", "tp_size", "shard_chunks", "input_dim")


class GGUFLinear(nn.Module):
    """y = x dequant(W)^T + b (+ the LoRA factors): `weight` is uint8 (out, in / block x type_size)."""

    def __init__(self, layer: nn.Linear, quant_type: str):
        super().__init__()
        block, type_size = QUANT_BLOCKS[quant_type]
        self.in_features, self.out_features, self.quant_type = layer.in_features, layer.out_features, quant_type
        self.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features // block * type_size,
                                               dtype=torch.uint8, device="meta"), requires_grad=False)
        self.bias = layer.bias
        for attr in _CARRIED:  # the TP layer's shard description and groups (its hooks move with replace_module)
            if attr in layer.__dict__:
                setattr(self, attr, layer.__dict__[attr])
        self.lora_factors: list = []  # (down (r, in), up (out, r), scale): plain tensors, not parameters

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_torch(self.weight, self.quant_type, (self.weight.shape[0], self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, w, b)
        for down, up, scale in self.lora_factors:
            y = y + scale * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}"


def keep_quantized(model: nn.Module, header: dict, prefix: str) -> dict:
    """Swap every Linear whose weight `header` (a GGUF header) holds quantized for a GGUFLinear, after the TP swap;
    a row-parallel layer split off a quant-block boundary stays a dense Linear (the loader dequantizes it).
    Returns {"gguf_quantized_layers": n, "gguf_dequantized_at_load": [names and why]}."""
    from ..parallel.plan import replace_module

    kept, dense = 0, []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        shape, qtype = header.get(prefix + name + ".weight", (None, None))
        if qtype not in QUANTIZED_TYPES:
            continue
        dims = module.__dict__.get("shard_dims") or {}
        tp = module.__dict__.get("tp_size", 1)
        if dims.get("weight") == 1 and not column_slice_on_block_boundary(shape, qtype, tp):
            dense.append(f"{name} ({qtype}: {shape[1]} inputs / tp {tp} is not whole {QUANT_BLOCKS[qtype][0]}-blocks)")
            continue
        replace_module(model, name, GGUFLinear(module, qtype))
        kept += 1
    return {"gguf_quantized_layers": kept, "gguf_dequantized_at_load": dense}


def clear_lora_factors(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, GGUFLinear):
            m.lora_factors = []


def quantized_bytes_held(model: nn.Module) -> int:
    """Bytes of still-quantized weights this rank holds (a sharded block's local rows only)."""
    from ..parallel.sharded_weights import local_tensor

    return sum(local_tensor(m.weight).numel() for m in model.modules() if isinstance(m, GGUFLinear))
