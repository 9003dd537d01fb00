"""Checkpoint reading: headers without weights, and per-rank sharded reads with get_slice.

No rank ever materialises the full state dict: each parameter is read, as its own slice, straight
into the (already sharded) module. Pickle checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from .parallelize import shard_dim_of

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    pass


def read_header(path: str) -> dict:
    """key -> (shape, dtype name) from a safetensors header; reads only the header bytes."""
    if not os.path.isfile(path):
        raise CheckpointError(f"model file not found: {path}")
    if not path.endswith(".safetensors") and not path.endswith(".sft"):
        raise CheckpointError(f"{path}: only .safetensors files are loaded (pickle checkpoints such as .ckpt/.pt/.pth "
                              f"can run code when opened and are refused); convert it to safetensors first")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is empty or truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size or n > 100 * 1024 * 1024:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length {n}); is it truncated?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is damaged")
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: header promises {8 + n + end} bytes but the file has {size}; "
                              f"download or copy it again")
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


def _slice_for(shape, dim, rank, parts):
    index = [slice(None)] * len(shape)
    n = shape[dim] // parts
    index[dim] = slice(rank * n, (rank + 1) * n)
    return tuple(index)


def load_sharded(model: torch.nn.Module, path: str, key_map: dict, dtype: torch.dtype, device: torch.device,
                 keep_fp32=lambda name: False) -> dict:
    """Materialise `model` (meta) on `device`, reading each parameter's shard from `path`.

    Returns stats: bytes read, parameter bytes held.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    missing = [n for n in params if n not in key_map]
    if missing:
        raise CheckpointError(f"{path}: no weights for {len(missing)} parameters (e.g. {missing[:3]}); "
                              f"the file does not match the detected model layout")
    read = 0
    with safe_open(path, framework="pt", device="cpu") as f:
        for name, p in params.items():
            sl = f.get_slice(key_map[name])
            shape = tuple(sl.get_shape())
            dim, rank, parts = shard_dim_of(model, name)
            t = sl[_slice_for(shape, dim, rank, parts)] if dim is not None else sl[:]
            if t.shape != p.shape:
                raise CheckpointError(f"{path}: {key_map[name]} has shape {tuple(t.shape)}, expected {tuple(p.shape)} "
                                      f"for {name}")
            read += t.numel() * t.element_size()
            target = torch.float32 if keep_fp32(name) else dtype
            module_name, _, pname = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            # one real, contiguous copy: safetensors hands back views into the mmapped file (and row
            # shards are strided views of the full tensor), which would keep the file's pages resident
            weight = torch.empty(t.shape, dtype=target, device=device).copy_(t)
            module._parameters[pname] = torch.nn.Parameter(weight, requires_grad=False)
            del t
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensors were not materialised (e.g. {left[:3]})")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"bytes_read": read, "param_bytes": held}
