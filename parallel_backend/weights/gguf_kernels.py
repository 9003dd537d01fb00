"""GGUF dequantization in torch ops, on the raw bytes' own device: `dequantize_torch` turns the still-quantized
bytes `gguf.read_rows` gives (moved to a GPU, say) into the tensor, at compute time, layer by layer.

It is elementwise integer and float32 work on a (blocks, type_size) byte matrix: no python loop over blocks, no
numpy, no `.item()`, no data-dependent shapes, so it runs under torch.compile (fullgraph) too. The result equals
`gguf.quants.dequantize` (gguf's numpy reference, float32) bit for bit before the cast to the asked dtype.

Layouts (per block of `block` elements along the last PyTorch dim, `type_size` bytes, all little-endian; `f16`
is an IEEE half scale, `q` the integer code of one element):

  F32 / F16 / BF16   one element per "block", its bit pattern
  Q8_0  (32, 34)     d:f16, 32 x int8                                          x = q * d
  Q4_0  (32, 18)     d:f16, 16 bytes: elements 0-15 in the low nibbles, 16-31 in the high ones   x = d * (q - 8)
  Q4_1  (32, 20)     d:f16, m:f16, nibbles as Q4_0                             x = d * q + m
  Q5_0  (32, 22)     d:f16, qh:u32 (bit i: bit 4 of element i), nibbles as Q4_0  x = d * (q - 16)
  Q5_1  (32, 24)     d:f16, m:f16, qh, nibbles                                 x = d * q + m
  Q2_K (256, 84)     16 bytes: sub-block (16 elements) scale in the low nibble, min in the high one; 64 bytes of
                     2-bit codes; d:f16 (offset 80), dmin:f16 (82)             x = (d * sc) * q - (dmin * m)
  Q3_K (256, 110)    hmask 32 bytes (bit j of byte l: the high bit of element 32j + l, set meaning "no -4");
                     64 bytes of 2-bit low codes; 12 bytes of sixteen 6-bit scales (low nibbles in bytes 0-7, the top
                     2 bits in bytes 8-11), stored +32; d:f16 (108)            x = (d * (sc - 32)) * q, q in -4..3
  Q4_K (256, 144)    d:f16, dmin:f16 (0, 2); 12 bytes of eight 6-bit scales and eight 6-bit mins (sub-blocks of
                     32); 128 bytes of nibbles (byte 32j + l: element 64j + l low, 64j + 32 + l high)
                                                                               x = (d * sc) * q - (dmin * m)
  Q5_K (256, 176)    as Q4_K, plus qh 32 bytes before the nibbles (bit j of byte l: bit 4 of element 32j + l)
  Q6_K (256, 210)    128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 x int8 scales (sub-blocks of 16),
                     d:f16 (208)                                               x = (d * sc) * (q - 32)

Why the float32 op order matters: float multiplication is commutative but not associative, and `a * b - c` is not
`fma(a, b, c)`. gguf's numpy code forms the per-sub-block scale first (`d * sc`, `dmin * m`, each rounded to
float32), then multiplies the integer code by it, then subtracts (or, for Q4_1 / Q5_1, adds) the rounded offset,
each a separate float32 op; the integer parts (codes, scales, the -8 / -16 / -32 offsets) are exact. Every type
here does the same ops in the same order on the same float32 values (f16 / bf16 -> f32 and small int -> f32 are
exact), so the results are the same bits. (A compiler that contracts `a * b - c` into an fma would break that:
eager torch never does; under torch.compile it is the backend's choice.)
"""
from __future__ import annotations

import math

import torch

from .checkpoint import CheckpointError
from .gguf import QUANT_BLOCKS, QUANTIZED_TYPES


# ---- bytes -> integers / floats -------------------------------------------------------------------------------
def _u16(b: torch.Tensor, off: int) -> torch.Tensor:
    """(n, 1) int32 0..65535: the little-endian u16 at byte `off` of every block row of `b` (n, type_size)."""
    return b[:, off:off + 1].to(torch.int32) | (b[:, off + 1:off + 2].to(torch.int32) << 8)


def _i16(b: torch.Tensor, off: int) -> torch.Tensor:
    """(n, 1) int16 holding the bit pattern of the 2 bytes at `off` (the u16 moved into int16's range first)."""
    u = _u16(b, off)
    return (u - ((u >> 15) << 16)).to(torch.int16)


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """(n, 1) float32: the f16 at byte `off` (a scale field, or an F16 element), widened exactly."""
    return _i16(b, off).view(torch.float16).to(torch.float32)


def _bits(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """(x >> s) & mask for each s in `shifts`, stacked on a new second-to-last dim: x (..., k) -> (..., len, k)."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).reshape(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


# ---- one function per type: (n, type_size) uint8 -> (n, block) float32 ------------------------------------------
def _f32(b):
    lo, hi = _u16(b, 0), _u16(b, 2)
    return ((hi - ((hi >> 15) << 16)) * 65536 + lo).view(torch.float32)  # in int32 range: no overflow


def _f16_elems(b):
    return _f16(b, 0)


def _bf16(b):
    return _i16(b, 0).view(torch.bfloat16).to(torch.float32)


def _nibbles32(qs):
    """16 bytes -> 32 codes: the low nibbles are elements 0-15, the high ones 16-31."""
    return _bits(qs, (0, 4), 0x0F).reshape(qs.shape[0], 32)


def _high_bits32(b, off):
    """The u32 at `off` as 32 bits (bit i -> element i)."""
    return _bits(b[:, off:off + 4], tuple(range(8)), 1).transpose(-1, -2).reshape(b.shape[0], 32)


def _q8_0(b):
    d = _f16(b, 0)
    x = _f(b[:, 2:].view(torch.int8))
    return x * d


def _q4_0(b):
    d = _f16(b, 0)
    q = _nibbles32(b[:, 2:]).to(torch.int32) - 8
    return d * _f(q)


def _q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _f(_nibbles32(b[:, 4:]))
    return (d * q) + m


def _q5_0(b):
    d = _f16(b, 0)
    q = (_nibbles32(b[:, 6:]).to(torch.int32) | (_high_bits32(b, 2).to(torch.int32) << 4)) - 16
    return d * _f(q)


def _q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles32(b[:, 8:]).to(torch.int32) | (_high_bits32(b, 4).to(torch.int32) << 4)
    return (d * _f(q)) + m


def _crumbs256(qs):
    """64 bytes -> 256 two-bit codes: byte 32h + l holds elements 128h + 32k + l at bits 2k (k = 0..3)."""
    return _bits(qs.reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(qs.shape[0], 256)


def _q2_k(b):
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * _f(scales & 0x0F)).reshape(n, 16, 1)
    ml = (dmin * _f(scales >> 4)).reshape(n, 16, 1)
    q = _f(_crumbs256(b[:, 16:80])).reshape(n, 16, 16)
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _bits(sc[:, :8], (0, 4), 0x0F).reshape(n, 16)
    high = _bits(sc[:, 8:12], (0, 2, 4, 6), 0x03).reshape(n, 16)
    scales = (low | (high << 4)).to(torch.int32) - 32
    dl = (d * _f(scales)).reshape(n, 16, 1)
    ql = _crumbs256(qs).to(torch.int32)
    qh = _bits(hmask, tuple(range(8)), 1).reshape(n, 256).to(torch.int32) ^ 1  # a set bit means no -4
    q = _f(ql - (qh << 2)).reshape(n, 16, 16)
    return (dl * q).reshape(n, 256)


def _scale_min_k4(s):
    """Q4_K / Q5_K's 12 scale bytes -> (8 scales, 8 mins), 6 bits each: bytes 0-3 hold scales 0-3 in their low
    6 bits, bytes 4-7 mins 0-3; bytes 8-11 the low 4 bits of scale / min 4-7 (low / high nibble), whose top 2 bits
    are the top 2 bits of bytes 0-3 / 4-7."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _nibbles256(qs):
    """128 bytes -> 256 codes: byte 32j + l holds element 64j + l (low nibble) and 64j + 32 + l (high)."""
    return _bits(qs.reshape(-1, 4, 32), (0, 4), 0x0F).reshape(qs.shape[0], 8, 32)


def _k4_scales(b):
    """Q4_K / Q5_K's head: each 32-element sub-block's (scale, min), from the super-block's f16 d / dmin and the
    6-bit codes, shaped (n, 8, 1) to broadcast over the sub-block."""
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * _f(sc)).reshape(n, 8, 1), (dmin * _f(mn)).reshape(n, 8, 1)


def _q4_k(b):
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    q = _f(_nibbles256(b[:, 16:144]))
    return (dl * q - ml).reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    ql = _nibbles256(b[:, 48:176])
    qh = _bits(b[:, 16:48], tuple(range(8)), 1)  # (n, 8, 32): bit j of byte l -> element 32j + l
    q = _f(ql | (qh << 4))
    return (dl * q - ml).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * _f(scales.view(torch.int8))).reshape(n, 16, 1)
    low = _bits(ql.reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 256)  # byte 64h + p: elements 128h + p, +64
    high = _bits(qh.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 256)  # byte 32h + p: 128h + 32k + p
    q = _f((low | (high << 4)).to(torch.int32) - 32).reshape(n, 16, 16)
    return (dl * q).reshape(n, 256)


_KERNELS = {
    "F32": _f32, "F16": _f16_elems, "BF16": _bf16,
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
assert set(_KERNELS) == set(QUANT_BLOCKS)


def dequantize_torch(raw: torch.Tensor, quant_type: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `shape` tensor that `raw` (uint8, any shape, e.g. `gguf.read_rows`'s bytes moved to a GPU) holds in
    `quant_type`, computed on raw's device with torch ops: gguf.quants.dequantize's float32 values exactly, cast
    to `dtype`. Blocks run along the last dim of `shape`, so raw holds numel / block * type_size bytes."""
    if quant_type not in _KERNELS:
        raise CheckpointError(f"quant type {quant_type} not supported (supported: {', '.join(QUANT_BLOCKS)})")
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize_torch takes the raw bytes as uint8, not {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    block, type_size = QUANT_BLOCKS[quant_type]
    numel = math.prod(shape)
    if (shape and shape[-1] % block) or numel % block:
        raise CheckpointError(f"shape {shape} is not whole {quant_type} blocks of {block} along its last dim")
    if raw.numel() != numel // block * type_size:
        raise CheckpointError(f"{quant_type} {shape} takes {numel // block * type_size} bytes, got {raw.numel()}")
    out = _KERNELS[quant_type](raw.reshape(-1, type_size))
    return out.reshape(shape).to(dtype)
