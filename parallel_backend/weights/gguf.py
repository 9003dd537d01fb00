"""GGUF DiT files (city96's ComfyUI-GGUF layout: Wan, Cosmos, LTX-Video, HunyuanVideo, MiniMax H3): header checks
and per-rank row reads that keep the quantized bytes quantized. The loader reads a .gguf through `GGUFSliceReader`
(reads.open_slices picks it by extension); the layers that stay quantized are weights/gguf_linear.py's.

Layout: the tensors carry the safetensors DiT's own keys (`blocks.0.self_attn.q.weight`), the architecture is the
`general.architecture` string, and each tensor's dims are stored in ggml order (innermost first), so the PyTorch
shape is the stored one reversed -- unless a `comfy.gguf.orig_shape.<key>` INT32 array gives it (5-D conv weights
that ggml's 4 dims cannot hold are stored reshaped). The data is C-ordered in the PyTorch shape; a quantized type
packs each run of `block` elements along the last dim into `type_size` bytes, so a dim-0 row range is one
contiguous byte range of the file whenever a row holds whole blocks (ggml requires it of every stored row).

Only gguf's memory-mapped `GGUFReader` touches the file: `read_gguf_header` reads the metadata and tensor table,
`read_rows` copies out just the bytes of the rows asked for, and `dequantize` is gguf's own
`gguf.quants.dequantize` (so results equal it exactly), cast to the asked dtype.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from .checkpoint import CheckpointError, ReopeningReader

# general.architecture of the DiT files the pack runs: city96 ComfyUI-GGUF's names for Wan, Cosmos, LTX-Video / LTX-2
# and HunyuanVideo, and "minimax_h3" as the MiniMax H3 files name theirs; the family is told by the keys (models/)
ARCHITECTURES = ("wan", "cosmos", "ltxv", "hyvid", "minimax_h3")
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
GGUF_MAGIC = b"GGUF"

# quant type name -> (elements per block, bytes per block); blocks run along the last (PyTorch) dim. The types
# city96's Wan / Cosmos files come in, all of which gguf's numpy code dequantizes.
QUANT_BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
QUANTIZED_TYPES = tuple(name for name, (block, _) in QUANT_BLOCKS.items() if block > 1)  # (F32 / F16 / BF16: plain)


class GGUFHeader(dict):
    """key -> (PyTorch shape, quant type name), as `reads.read_header` gives (shape, dtype); `.architecture`
    is the file's `general.architecture` (one of ARCHITECTURES)."""

    def __init__(self, tensors: dict, architecture: str):
        super().__init__(tensors)
        self.architecture = architecture


def _gguf():
    try:
        import gguf
    except ImportError as e:  # requirements.txt lists it; say what is missing rather than fail on a name
        raise CheckpointError("reading .gguf files needs the `gguf` package (pip install 'gguf>=0.10')") from e
    return gguf


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def open_reader(path: str):
    """gguf's memory-mapped reader for `path`, refusing what is not a whole, little-endian GGUF file."""
    gguf = _gguf()
    if not os.path.isfile(path):
        raise CheckpointError(f"model file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path, "r")
    except ValueError as e:
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if unknown:  # the tensor table names a type id this gguf has never heard of
            raise CheckpointError(f"{path}: unknown GGML quant type {unknown.group(1)} (gguf "
                                  f"{_version()} does not know it); supported: {', '.join(QUANT_BLOCKS)}") from e
        raise CheckpointError(f"{path}: damaged or truncated GGUF ({size} bytes): {e}") from e
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: damaged or truncated GGUF ({size} bytes): {type(e).__name__}: {e}") from e
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: GGUF written in the other byte order than this machine's; not supported")
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(f"{path}: truncated: the tensor table promises {end} bytes but the file has {size}; "
                              f"download or copy it again")
    return reader


def _string_field(reader, key):
    field = reader.get_field(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[-1]]).decode("utf-8", errors="replace")


def _torch_shape(reader, t, path) -> tuple:
    field = reader.get_field(ORIG_SHAPE_KEY + t.name)
    if field is None:
        return tuple(int(d) for d in reversed(t.shape.tolist()))
    shape = tuple(int(field.parts[i][0]) for i in field.data)
    if math.prod(shape) != int(t.n_elements):
        raise CheckpointError(f"{path}: {ORIG_SHAPE_KEY}{t.name} = {shape} does not hold the tensor's "
                              f"{int(t.n_elements)} elements")
    return shape


def _check(reader, path):
    arch = _string_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not a DiT this pack runs "
                              f"(general.architecture must be one of {', '.join(ARCHITECTURES)})")
    for t in reader.tensors:
        if t.tensor_type.name not in QUANT_BLOCKS:
            raise CheckpointError(f"{path}: tensor {t.name} is {t.tensor_type.name}, a quant type not supported "
                                  f"(supported: {', '.join(QUANT_BLOCKS)})")
    return arch


def read_gguf_header(path: str) -> GGUFHeader:
    """key -> (PyTorch shape, quant type name) of a DiT GGUF, with `.architecture`; metadata only."""
    reader = open_reader(path)
    arch = _check(reader, path)
    return GGUFHeader({t.name: (_torch_shape(reader, t, path), t.tensor_type.name) for t in reader.tensors}, arch)


def read_rows(path_or_reader, key: str, rows: slice | None = None):
    """(raw, quant type name, shape) of rows `rows` (dim 0 of the PyTorch shape; None: all) of tensor `key`.

    `raw` is a 1-D uint8 numpy array copied out of the map: just those rows' bytes, still quantized (F16 / BF16 /
    F32 as their bit patterns); `shape` is the slice's PyTorch shape. Nothing else of the tensor is read. Pass an
    open reader (`open_reader`) to read many tensors without re-parsing the header each time.
    """
    if isinstance(path_or_reader, (str, os.PathLike)):
        path = os.fspath(path_or_reader)
        reader = open_reader(path)
        _check(reader, path)
    else:
        reader, path = path_or_reader, getattr(path_or_reader.data, "filename", "<gguf>")
    t = next((t for t in reader.tensors if t.name == key), None)
    if t is None:
        raise CheckpointError(f"{path}: no tensor {key!r}")
    qtype = t.tensor_type.name
    if qtype not in QUANT_BLOCKS:
        raise CheckpointError(f"{path}: tensor {key} is {qtype}, a quant type not supported")
    shape = _torch_shape(reader, t, path)
    start, stop, step = (rows if rows is not None else slice(None)).indices(shape[0])
    if step != 1:
        raise CheckpointError(f"{path}: {key}: only contiguous row ranges are read (step {step})")
    stop = max(start, stop)
    block, type_size = QUANT_BLOCKS[qtype]
    per_row = math.prod(shape[1:])
    if (start * per_row) % block or (stop * per_row) % block:
        raise CheckpointError(f"{path}: {key}: rows {start}:{stop} of {shape} do not fall on {qtype} blocks of "
                              f"{block} elements")
    lo, hi = start * per_row // block * type_size, stop * per_row // block * type_size
    raw = np.array(reader.data[t.data_offset + lo: t.data_offset + hi], dtype=np.uint8, copy=True)
    return raw, qtype, (stop - start, *shape[1:])


def dequantize(raw, quant_type: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor `raw` (bytes from `read_rows`) holds, as `dtype` in `shape`: gguf.quants.dequantize's float32
    values (exactly), cast."""
    gguf = _gguf()
    if quant_type not in QUANT_BLOCKS:
        raise CheckpointError(f"quant type {quant_type} not supported (supported: {', '.join(QUANT_BLOCKS)})")
    data = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if data.size == 0:  # an empty row range (gguf's code cannot reshape nothing)
        return torch.empty(tuple(shape), dtype=dtype)
    out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[quant_type])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(tuple(shape)).to(dtype)


def column_slice_on_block_boundary(shape, quant_type: str, parts: int) -> bool:
    """Whether splitting dim 1 of a `shape` tensor into `parts` equal pieces cuts it on `quant_type` block
    boundaries, so each piece of every row is whole blocks that can stay quantized (otherwise the row-parallel
    loader must dequantize that layer at load). Blocks run along the last dim, so for more than 2 dims a dim-1
    piece is whole blocks when the dims after it are; a dim that does not divide by `parts` is never split."""
    if quant_type not in QUANT_BLOCKS:
        raise CheckpointError(f"quant type {quant_type} not supported (supported: {', '.join(QUANT_BLOCKS)})")
    if len(shape) < 2 or parts < 1 or shape[1] % parts:
        return False
    block = QUANT_BLOCKS[quant_type][0]
    return (shape[1] // parts * math.prod(shape[2:])) % block == 0


def _drop_pages(reader, tensor) -> None:
    """Tell the kernel the pages of `tensor` just copied out are not needed (MADV_DONTNEED on its byte range of the
    read-only map), so they leave this process's resident set at once instead of piling up until the map is
    dropped: a rank's load peak is its shard plus one tensor, not plus the reopen budget."""
    import mmap

    m = getattr(reader.data, "_mmap", None)
    if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(tensor.data_offset + int(tensor.n_bytes), len(m))
    try:
        m.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        pass  # advice only


class GGUFSliceReader(ReopeningReader):
    """`reads.SliceReader`'s interface over a GGUF file, for the loader: `read(key, index)` gives the slice's values
    (dequantized exactly, as gguf does; F16 / BF16 keep their dtype), `read_quantized(key, index)` the slice's
    still-quantized bytes (rows, row bytes). Only the rows asked for are copied out of the map, each tensor's pages
    are dropped once copied, and the map itself every `budget` bytes (ReopeningReader)."""

    def _open_file(self):
        reader = open_reader(self.path)
        _check(reader, self.path)
        self._tensors = {t.name: t for t in reader.tensors}
        return reader

    def _rows(self, key: str, index, touch: int):
        reader = self._handle(touch)
        if key not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        rows = index[0] if index else None
        raw, qtype, shape = read_rows(reader, key, rows)
        self.bytes_read += raw.nbytes
        _drop_pages(reader, self._tensors[key])
        return raw, qtype, shape

    def read(self, key: str, index=None, touch: int = 0) -> torch.Tensor:
        """The values of `key[index]` (index: a tuple of slices, dim 0 read as rows, the rest cut after)."""
        raw, qtype, shape = self._rows(key, index, touch)
        if qtype in ("F16", "BF16", "F32"):
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[qtype]
            t = torch.from_numpy(raw).view(dtype).reshape(shape)
        else:
            t = dequantize(raw, qtype, shape)
        return t[(slice(None), *index[1:])] if index and len(index) > 1 else t

    def read_quantized(self, key: str, index=None, touch: int = 0) -> torch.Tensor:
        """The still-quantized bytes of a 2-D `key[index]` as uint8 (rows, row bytes): dim 0 read as rows, a dim-1
        slice cut on quant-block boundaries (the caller checked `column_slice_on_block_boundary`)."""
        raw, qtype, shape = self._rows(key, index, touch)
        block, type_size = QUANT_BLOCKS[qtype]
        t = torch.from_numpy(raw).reshape(shape[0], -1)
        if index and len(index) > 1 and index[1] != slice(None):
            start, stop, _ = index[1].indices(shape[1])
            if start % block or stop % block:
                raise CheckpointError(f"{self.path}: {key}: columns {start}:{stop} do not fall on {qtype} blocks")
            t = t[:, start // block * type_size: stop // block * type_size]
        return t


def quantized_bytes(shape, quant_type: str) -> int:
    """Bytes a tensor of `shape` takes in `quant_type`."""
    block, type_size = QUANT_BLOCKS[quant_type]
    return math.prod(shape) // block * type_size
