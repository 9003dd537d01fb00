"""Checkpoint reading: headers without weights, and per-rank sharded reads with get_slice.

No rank ever materialises the full state dict: each parameter is read, as its own slice, straight
into the (already sharded) module. Pickle checkpoints are refused, never unpickled.

Memory: safetensors (>= 0.6) hands out slices as views into a memory map of the file, and every
page a view touches counts in the rank's resident set while the file stays mapped. So each slice is
copied into memory the parameter owns (casting on the way), and the file is re-opened (its map
dropped) after every `REOPEN_BYTES` of touched pages; parameters are read largest-touch first, so the
peak is about the shard plus one tensor's pages.

The model is the host's own class (ComfyUI's, built on meta in the rank), so its parameter names are the
checkpoint's keys under the file's prefix, and each parameter is read into the dtype ComfyUI built it with: an
fp8 layer keeps its fp8 shard (its per-tensor scale is a parameter of its own), a scaled-fp8 file's linear biases
are rounded to fp8, everything else is cast to the compute precision.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch

from ..parallel.plan import shard_chunks_of, shard_dim_of
from ..parallel.sharded_weights import is_sharded, local_tensor
from .checkpoint import REOPEN_BYTES, CheckpointError, ReopeningReader
from .fp8 import AUX_SUFFIXES, FP8_DTYPES, FP8_ST_DTYPES, MARKER_KEYS
from .gguf import QUANTIZED_TYPES, GGUFSliceReader, quantized_bytes, read_gguf_header

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STORAGE_SEP = "/"  # a precision may name how the weights are held too: "bf16/fp8_e4m3fn" (UNETLoader's weight_dtype)


def compute_dtype(precision: str) -> torch.dtype:
    """The compute precision of a precision name ("bf16", or "bf16/fp8_e4m3fn")."""
    return DTYPE_NAMES[precision.partition(STORAGE_SEP)[0]]


def weight_storage(precision: str) -> str | None:
    """How the weights are held, when the precision names it (a key of fp8.WEIGHT_STORAGE), else None."""
    return precision.partition(STORAGE_SEP)[2] or None


ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
             "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def meta_tensors(header: dict) -> dict:
    """key -> a meta tensor of the header's shape and dtype (float32 for a type torch has no dtype for: a GGUF quant
    type): a state dict without weights, for code that reads only names, shapes and dtypes (ComfyUI's detection)."""
    return {k: torch.empty(shape, dtype=ST_DTYPES.get(dt, torch.float32), device="meta")
            for k, (shape, dt) in header.items()}


def model_keys(header: dict) -> list:
    """The checkpoint's parameter keys: without fp8 scales and the `scaled_fp8` marker."""
    return [k for k in header if not k.endswith(AUX_SUFFIXES) and k.rpartition(".")[2] not in MARKER_KEYS]


def checkpoint_precision(header: dict) -> str:
    """"fp8_scaled", "fp8", or the dtype most of the weights have (for messages and info)."""
    dts = [header[k][1] for k in model_keys(header)]
    if any(k.endswith(".comfy_quant") for k in header) and not any(d in FP8_ST_DTYPES for d in dts):
        return "quantized"  # ComfyUI's mixed-precision layout in another storage (nvfp4's packed bytes, int8, ...)
    if any(d in FP8_ST_DTYPES for d in dts):
        scaled = any(k.rpartition(".")[2] in MARKER_KEYS for k in header) or any(
            k.endswith(AUX_SUFFIXES) for k in header)
        return "fp8_scaled" if scaled else "fp8"
    quantized = [d for d in dts if d in QUANTIZED_TYPES]  # a GGUF: the type its big weights were quantized to
    if quantized:
        return max(set(quantized), key=quantized.count)
    return max(set(dts), key=dts.count) if dts else "empty"


def read_metadata(path: str) -> dict:
    """The safetensors file's `__metadata__` (str -> str; {} without one, and for a .gguf): ComfyUI reads its
    `_quantization_metadata` (the mixed-precision layers) from here."""
    if not path.endswith((".safetensors", ".sft")):
        return {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__")
    return dict(meta) if meta else {}


def read_header(path: str) -> dict:
    """key -> (shape, dtype name) from a safetensors header (or, for a .gguf, (shape, quant type) with the file's
    `.architecture`); reads only the header bytes."""
    if not os.path.isfile(path):
        raise CheckpointError(f"model file not found: {path}")
    if path.endswith(".gguf"):
        return read_gguf_header(path)
    if not path.endswith(".safetensors") and not path.endswith(".sft"):
        raise CheckpointError(f"{path}: only .safetensors and .gguf files are loaded (pickle checkpoints such as "
                              f".ckpt/.pt/.pth can run code when opened and are refused); convert it to safetensors "
                              f"first")
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


def slice_for(shape, dim, rank, parts):
    """This rank's slice along `dim`: equal parts (TP), or FSDP's ceil-sized chunks where they do not divide (sharded
    weights: the last ranks hold fewer rows, or none)."""
    index = [slice(None)] * len(shape)
    n = -(-shape[dim] // parts)
    index[dim] = slice(min(rank * n, shape[dim]), min((rank + 1) * n, shape[dim]))
    return tuple(index)


def _slices_for(shape, dim, rank, parts, chunks=1) -> list:
    """This rank's index tuples along `dim`: one slice, or with `chunks` its part of each of `chunks` equal blocks of
    `dim` (a fused projection whose outputs are [k of every head | v of every head]: each rank takes its heads of
    each block)."""
    if chunks == 1:
        return [slice_for(shape, dim, rank, parts)]
    block, out = shape[dim] // chunks, []
    for k in range(chunks):
        index = [slice(None)] * len(shape)
        index[dim] = slice(k * block + rank * block // parts, k * block + (rank + 1) * block // parts)
        out.append(tuple(index))
    return out


def shard_of(t: torch.Tensor, dim: int | None, rank: int, parts: int, chunks: int = 1) -> torch.Tensor:
    """This rank's shard of a whole tensor (see _slices_for); `dim` None: the tensor itself."""
    if dim is None:
        return t
    pieces = [t[index] for index in _slices_for(tuple(t.shape), dim, rank, parts, chunks)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def file_bytes(shape, st_dtype) -> int:
    """Bytes a tensor of `shape` takes in the file (`st_dtype`: a safetensors dtype name or a GGUF quant type)."""
    if st_dtype in QUANTIZED_TYPES:
        return quantized_bytes(shape, st_dtype)
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}.get(st_dtype, 1)
    n = 1
    for d in shape:
        n *= d
    return n * size


def held_bytes(shape, st_dtype, precision: str) -> int:
    """Bytes a rank holds for a tensor of the file as loaded at `precision`: fp8 stays 1 byte, a GGUF quant type its
    quantized size, the rest the compute precision's size."""
    if st_dtype in QUANTIZED_TYPES:
        return quantized_bytes(shape, st_dtype)
    one_byte = str(st_dtype).startswith("F8") or st_dtype in ("U8", "I8")  # fp8, packed / int8 quantized weights
    one_byte = one_byte or (weight_storage(precision) is not None and len(shape) >= 2)  # held in fp8 on request
    return math.prod(shape) * (1 if one_byte else compute_dtype(precision).itemsize)


def open_slices(path: str, budget: int = REOPEN_BYTES):
    """The per-rank slice reader for a checkpoint: safetensors, or GGUF (weights/gguf.py) by extension."""
    if path.endswith(".gguf"):
        return GGUFSliceReader(path, budget)
    return SliceReader(path, budget)


class SliceReader(ReopeningReader):
    """`get_slice` reads from one safetensors file (see ReopeningReader)."""

    def _open_file(self):
        from safetensors import safe_open

        f = safe_open(self.path, framework="pt", device="cpu")
        f.__enter__()
        return f

    def _drop_file(self, f) -> None:
        f.__exit__(None, None, None)

    def read(self, key: str, index=None, touch: int = 0) -> torch.Tensor:
        """A view of `key` (or of `key[index]`) valid until the caller drops it: copy it out."""
        f = self._handle(touch)
        sl = f.get_slice(key)
        if not sl.get_shape():  # 0-dim (a per-tensor scale)
            t = f.get_tensor(key)
        else:
            t = sl[index] if index is not None else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t


def _owned(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous tensor the caller owns (never a view into the file's memory map), cast on the copy."""
    out = torch.empty(t.shape, dtype=dtype, device=device)
    out.copy_(t)
    return out


class _ParamPlan:
    __slots__ = ("name", "key", "shape", "st_dtype", "index", "touch", "owner", "pname", "rank0_only", "chunks", "dim")


def held_parts(t: torch.Tensor) -> list:
    """The tensors that hold a parameter's values: itself, or a tensor subclass's inner tensors (ComfyUI's
    QuantizedTensor, whose logical dtype is the compute precision: its quantized data first, then its scales)."""
    if not hasattr(type(t), "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [getattr(t, n) for n in names]


def held_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a parameter is stored in (a QuantizedTensor's: its quantized data's, e.g. fp8)."""
    return held_parts(t)[0].dtype


def param_stats(model: torch.nn.Module) -> dict:
    """Bytes this rank holds (a sharded parameter counts its local rows only; a quantized one its data and scales)."""
    parts = [held_parts(local_tensor(p)) for p in model.parameters()]
    held = sum(t.numel() * t.element_size() for ts in parts for t in ts)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    fp8 = sum(ts[0].numel() * ts[0].element_size() for ts in parts if ts[0].dtype in FP8_DTYPES)
    return {"param_bytes": held, "buffer_bytes": buffers, "fp8_weight_bytes": fp8}


# ---- the host's own model: parameter names are the checkpoint's keys ------------------------------------------------
HOST_DEFAULT_ONES = ("scale_weight", "scale_input")  # ComfyUI's scaled-fp8 layers default these to 1 when absent


def host_key_map(model: torch.nn.Module, prefix: str) -> dict:
    """parameter name -> checkpoint key for a host-built model: the same name under the file's prefix."""
    return {n: prefix + n for n, _ in model.named_parameters()}


def _reader_for(reader, target: torch.Tensor):
    """How to read into `target`: a uint8 parameter (a GGUF layer kept quantized) takes the slice's quantized
    bytes, anything else its values."""
    if target.dtype == torch.uint8 and hasattr(reader, "read_quantized"):
        return reader.read_quantized
    return reader.read


def _fill_local(reader, p, local: torch.Tensor, path: str) -> None:
    """Copy this rank's rows of a sharded (FSDP) parameter into the storage FSDP allocated for them, casting."""
    if p.st_dtype is None:
        local.fill_(1)
        return
    if local.numel() == 0:  # fewer rows than ranks: this rank holds none of them
        return
    t = _reader_for(reader, local)(p.key, p.index[0], p.touch)
    if tuple(t.shape) != tuple(local.shape):
        raise CheckpointError(f"{path}: {p.key} has shape {tuple(t.shape)} (this rank's rows), expected "
                              f"{tuple(local.shape)}; the file does not match the model it was detected as")
    local.copy_(t)
    del t


def load_host_sharded(model: torch.nn.Module, path: str, prefix: str, device: torch.device,
                      header: dict | None = None, names=None, dtypes: dict | None = None,
                      key_map: dict | None = None) -> dict:
    """Materialise a host-built (meta) model on `device`, each parameter read as this rank's slice straight into the
    dtype ComfyUI built it with (the host's own load semantics: an fp8 layer stays fp8, a scaled-fp8 layer's bias
    is rounded to fp8, a compute-dtype layer is cast). `names`: only these parameters (a re-read after a LoRA);
    `dtypes`: the dtype each parameter was built with (a merge may have changed it since). `key_map`: parameter
    name -> checkpoint key where the file names it otherwise than prefix + name (a family whose released layout the
    host renames at load: HunyuanVideo).
    Returns stats: bytes read, parameter / buffer bytes held, fp8 linear weights and the file's precision."""
    header = header if header is not None else read_header(path)
    _refuse_block_scales(path, header)
    params = dict(model.named_parameters())
    wanted = list(params) if names is None else [n for n in names if n in params]
    key_of = (lambda n: key_map.get(n, prefix + n)) if key_map else (lambda n: prefix + n)
    missing = [n for n in wanted if key_of(n) not in header and n.rpartition(".")[2] not in HOST_DEFAULT_ONES]
    if missing:
        raise CheckpointError(f"{path}: no weights for {len(missing)} parameters of the model ComfyUI detected "
                              f"(e.g. {missing[:3]}); the file does not match that model")
    plans = sorted((_param_plan(model, name, params[name], header, key_of(name)) for name in wanted),
                   key=lambda p: -p.touch)
    with open_slices(path) as reader:
        for p in plans:
            target = params[p.name]
            if is_sharded(target):  # a block's sharded weight: FSDP owns the parameter; its local rows are filled
                _fill_local(reader, p, local_tensor(target), path)
                continue
            value = _param_value(reader, p, target, (dtypes or {}).get(p.name, target.dtype), device, path)
            p.owner._parameters[p.pname] = torch.nn.Parameter(value, requires_grad=False)
        if names is None:
            _load_buffers(model, reader, header, prefix, device)
        read = reader.bytes_read
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if names is None and left:
        raise CheckpointError(f"{path}: {len(left)} tensors were not materialised (e.g. {left[:3]})")
    return {"bytes_read": read, **param_stats(model),
            "fp8_layers": sum(1 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
                              and held_dtype(p) in FP8_DTYPES),
            "checkpoint_precision": checkpoint_precision(header)}


def _refuse_block_scales(path: str, header: dict) -> None:
    for k, (shape, _) in header.items():  # (the mixed-precision layout's block scales: models/host.py checks them)
        if k.endswith(".scale_weight") and math.prod(shape) != 1:
            raise CheckpointError(f"{path}: {k} has shape {tuple(shape)}; only per-tensor fp8 scales (one number per "
                                  f"weight) are supported")


def _param_plan(model, name: str, param, header: dict, key: str) -> _ParamPlan:
    """Where parameter `name` is in the file, which slice of it this rank reads, and how many bytes that touches."""
    from ..parallel.tensor_parallel import BIAS_ON_RANK0

    p = _ParamPlan()
    p.name, p.key = name, key
    module_name, _, p.pname = name.rpartition(".")
    p.owner = model.get_submodule(module_name) if module_name else model
    shape, p.st_dtype = header.get(p.key, (tuple(param.shape), None))
    p.shape = shape
    dim, rank, parts = shard_dim_of(model, name)
    p.dim, p.chunks = dim, shard_chunks_of(model, name) if isinstance(dim, int) else 1
    p.index = _slices_for(shape, dim, rank, parts, p.chunks) if isinstance(dim, int) else None
    full = file_bytes(shape, p.st_dtype or "F32")
    p.touch = full // parts if dim == 0 else full
    p.rank0_only = dim == BIAS_ON_RANK0 and rank != 0
    return p


def _param_value(reader, p: _ParamPlan, target, dtype, device, path: str) -> torch.Tensor:
    """This rank's value of a parameter: its slice of the file in `dtype`, or ComfyUI's default for a scale the file
    does not carry, or zeros where only rank 0 adds the bias."""
    if p.st_dtype is None:  # a scale the file does not carry: ComfyUI's default
        return torch.ones(target.shape, dtype=dtype, device=device)
    if p.rank0_only:
        return torch.zeros(target.shape, dtype=dtype, device=device)
    read = _reader_for(reader, target)
    if p.index is None or len(p.index) == 1:
        t = read(p.key, p.index and p.index[0], p.touch)
    else:  # a chunked shard: this rank's part of each block, joined
        t = torch.cat([read(p.key, i, p.touch // p.chunks) for i in p.index], p.dim)
    held = held_parts(target)[0]  # (a quantized layer's stored data, after a LoRA merge)
    if tuple(t.shape) != tuple(held.shape):
        raise CheckpointError(f"{path}: {p.key} has shape {tuple(t.shape)} (this rank's slice), expected "
                              f"{tuple(held.shape)}; the file does not match the model it was detected as")
    return _owned(t, dtype, device)


def _load_buffers(model, reader, header: dict, prefix: str, device) -> None:
    """Persistent buffers the file carries, loaded as ComfyUI's load_state_dict loads them, also where the class
    computed them at build (Animate's blur kernels): whole on every rank."""
    for name, buf in list(model.named_buffers()):
        module_name, _, bname = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        if prefix + name in header and bname not in owner._non_persistent_buffers_set:
            owner._buffers[bname] = _owned(reader.read(prefix + name), buf.dtype, device)
