"""Tiny GGUF DiT files in city96's ComfyUI-GGUF layout, written from a safetensors DiT (`synthetic.write_tiny_wan`,
say), and their dequantized weights as a safetensors reference, for the GGUF loader's tests.

`quantize_values` packs float32 values into a GGUF type's blocks: gguf.quants.quantize for the types gguf (0.19) can
quantize (F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1), and simple quantizers of our own for the K-quants,
which gguf only dequantizes. Those pick each sub-block's scale (and min) straight from its range -- no search for the
best scales as llama.cpp's quantizer does -- quantize the sub-block scales to the type's 4 / 6 / 8 bits under an f16
super-scale, then round every element to the nearest code under the scale the file really holds. Valid blocks (gguf
dequantizes them) and a fair approximation, about as close as the legacy type of the same bits: relative RMS error
(||dequantize(quantize(x)) - x|| / ||x||) measured on 512 x 1024 standard-normal values (the tiny Wan's linear
weights, normal / sqrt(fan_in), give the same to two digits; Student-t(3) values 1.2-1.6x these):

    F16 0.0002   BF16 0.0017   Q8_0 0.0054   Q6_K 0.019   Q5_1 0.038   Q5_0 0.043   Q5_K 0.038
    Q4_1 0.078   Q4_0 0.086    Q4_K 0.078    Q3_K 0.155   Q2_K 0.328

(`ERROR_BOUNDS` holds the bounds the tests assert, about 1.25x these.)

`write_gguf_dit` follows city96's tools for which tensor gets which type (his convert.py writes an F16 / BF16 file,
his patched llama-quantize quantizes it; the rule here is those two in one step):
  * keys lose a `model.diffusion_model.` / `model.` prefix (keys without it are dropped), or a `net.` prefix that
    every key has; Cosmos keys holding `_extra_state` / `accum_` are dropped;
  * a tensor is quantized to `quant_type` when its key ends in `weight`, it is 2-D, its key does not name one of the
    architecture's kept-whole parts (Wan: modulation, patch / text / time embeddings, time projection, img_emb, head;
    Cosmos: the p / t / x / pos embedders, t_embedding_norm, final_layer) and `keep(key, shape)` is not true; if its
    last dim is not whole blocks it falls back to F16 (as llama-quantize does for K-quants);
  * everything else is kept as floats: F32 when the source is F32 / BF16 and the tensor is 1-D, has at most 1024
    elements, or is one of the architecture's high-precision keys (Wan `.modulation`, Cosmos `pos_embedder`);
    otherwise F16 (BF16 from a BF16 source; `quant_type` itself when that is F32 / F16 / BF16);
  * tensors of more than 4 dims (Wan's 5-D patch embeddings), which ggml cannot hold, are F32, stored reshaped to
    (dim 0, the rest) with the INT32 array `comfy.gguf.orig_shape.<key>` giving the PyTorch shape. (city96's
    fix_5d_tensors.py appends them as 5-D F32 instead; the reader here understands both.)
Tensor dims are written in ggml order (the PyTorch shape reversed) and the data C-ordered, so `gguf.read_gguf_header`
gives back the PyTorch shapes. The file is written tensor by tensor (the tensor table first, from shapes alone).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..weights.gguf import ORIG_SHAPE_KEY, QUANT_BLOCKS

# gguf.quants.quantize packs these; the K-quants are ours
GGUF_QUANTIZES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# relative RMS error bounds of dequantize(quantize(x)) the tests assert (measured values in the module docstring)
ERROR_BOUNDS = {"F32": 0.0, "F16": 0.001, "BF16": 0.003, "Q8_0": 0.008, "Q6_K": 0.025, "Q5_1": 0.05, "Q5_0": 0.055,
                "Q5_K": 0.05, "Q4_1": 0.1, "Q4_0": 0.11, "Q4_K": 0.1, "Q3_K": 0.2, "Q2_K": 0.4}

# city96's rules per architecture: the parts kept whole (never quantized), the keys kept in F32, the keys dropped
KEEP_WHOLE = {
    "wan": ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.", "img_emb.",
            "head."),
    "cosmos": ("p_embedder.", "t_embedder.", "t_embedding_norm.", "x_embedder.", "pos_embedder.", "final_layer."),
}
HIGH_PRECISION = {"wan": (".modulation",), "cosmos": ("pos_embedder",)}
IGNORED = {"cosmos": ("_extra_state", "accum_")}
SMALL_TENSOR = 1024  # elements; at most this many: F32
MAX_GGML_DIMS = 4


# ---- K-quant blocks ------------------------------------------------------------------------------------------------
def _f16_round(v: np.ndarray) -> np.ndarray:
    """v as the f16 the file will hold, back in float32 (what the dequantizer will multiply by)."""
    return np.minimum(v, 65504.0).astype(np.float16).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _scale_codes(s: np.ndarray, code_max: int, signed: bool = False):
    """Sub-block scales s (n, subs) as an f16 super-scale d (n, 1) and integer codes with d * code ~ s, codes in
    0..code_max (or -code_max-1..code_max when signed)."""
    d = _f16_round(np.abs(s).max(axis=1, keepdims=True) / code_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d > 0, np.rint(s / d), 0)
    return d, np.clip(codes, -code_max - 1 if signed else 0, code_max).astype(np.int32)


def _affine(x: np.ndarray, sub: int, q_max: int, code_max: int):
    """x (n, 256) as x ~ (d * sc) * q - (dmin * m) per sub-block of `sub`, q in 0..q_max: the sub-block's range
    [min(min, 0), max] spread over the codes (the min is an offset >= 0 in these formats)."""
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    lo = np.minimum(xs.min(axis=-1), 0)
    hi = xs.max(axis=-1)
    d, sc = _scale_codes((hi - lo) / q_max, code_max)
    dmin, m = _scale_codes(-lo, code_max)
    scale = (d * sc.astype(np.float32))[..., None]  # the dequantizer's own float32 values
    offset = (dmin * m.astype(np.float32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale > 0, np.rint((xs + offset) / scale), 0)
    return d, dmin, sc, m, np.clip(q, 0, q_max).astype(np.int32).reshape(n, 256)


def _symmetric(x: np.ndarray, sub: int, q_neg: int, code_max: int):
    """x (n, 256) as x ~ (d * sc) * q per sub-block of `sub`, q in -q_neg..q_neg-1, sc signed: the value of largest
    magnitude lands on -q_neg exactly (the scale takes its sign), as llama.cpp's reference does."""
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    i = np.abs(xs).argmax(axis=-1)[..., None]
    d, sc = _scale_codes(np.take_along_axis(xs, i, axis=-1)[..., 0] / -q_neg, code_max, signed=True)
    scale = (d * sc.astype(np.float32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale != 0, np.rint(xs / scale), 0)
    return d, sc, np.clip(q, -q_neg, q_neg - 1).astype(np.int32).reshape(n, 256)


def _pack(v: np.ndarray, bits: int) -> np.ndarray:
    """v (..., k, L) of `bits`-bit fields -> (..., L) bytes: field j at bits * j."""
    out = np.zeros(v.shape[:-2] + v.shape[-1:], np.int32)
    for j in range(v.shape[-2]):
        out |= (v[..., j, :] & ((1 << bits) - 1)) << (bits * j)
    return out.astype(np.uint8)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """256 two-bit codes -> 64 bytes: byte 32h + l holds elements 128h + 32k + l at bits 2k."""
    return _pack(q.reshape(-1, 2, 4, 32), 2).reshape(-1, 64)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """256 four-bit codes -> 128 bytes: byte 32j + l holds element 64j + l (low nibble) and 64j + 32 + l (high)."""
    return _pack(q.reshape(-1, 4, 2, 32), 4).reshape(-1, 128)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> Q4_K / Q5_K's 12 bytes (scales / mins 0-3 whole in bytes 0-3 / 4-7; 4-7 as a low
    nibble pair in bytes 8-11 and their top 2 bits in the top 2 bits of bytes 0-3 / 4-7)."""
    out = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                          (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=1)
    return out.astype(np.uint8)


def _q2_k(x):
    d, dmin, sc, m, q = _affine(x, 16, 3, 15)
    return np.concatenate([(sc | (m << 4)).astype(np.uint8), _crumbs(q), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q3_k(x):
    d, sc, q = _symmetric(x, 16, 4, 31)
    u = sc + 32  # stored unsigned
    low = _pack(u.reshape(-1, 2, 8), 4)  # byte b: scale b (low nibble), scale 8 + b (high)
    high = _pack((u >> 4).reshape(-1, 4, 4), 2)  # byte 8 + b: top 2 bits of scale 4k + b at bits 2k
    hmask = _pack((q >= 0).astype(np.int32).reshape(-1, 8, 32), 1)  # set: the code is q, clear: q - 4
    return np.concatenate([hmask, _crumbs(q & 3), low, high, _f16_bytes(d)], axis=1)


def _q4_k(x):
    d, dmin, sc, m, q = _affine(x, 32, 15, 63)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _scales_k4(sc, m), _nibbles(q)], axis=1)


def _q5_k(x):
    d, dmin, sc, m, q = _affine(x, 32, 31, 63)
    qh = _pack((q >> 4).reshape(-1, 8, 32), 1)  # bit j of byte l: bit 4 of element 32j + l
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _scales_k4(sc, m), qh, _nibbles(q & 0x0F)], axis=1)


def _q6_k(x):
    d, sc, q = _symmetric(x, 16, 32, 127)
    u = q + 32
    ql = _pack((u & 0x0F).reshape(-1, 2, 2, 64), 4).reshape(-1, 128)  # byte 64h + p: elements 128h + p, + 64
    qh = _pack((u >> 4).reshape(-1, 2, 4, 32), 2).reshape(-1, 64)  # byte 32h + p: 128h + 32k + p at bits 2k
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


_K_QUANTIZERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_values(values: np.ndarray, quant_type: str) -> np.ndarray:
    """float values (last dim whole blocks of `quant_type`) -> the file's bytes, uint8 of shape
    (*shape[:-1], shape[-1] // block * type_size) (F32 / F16 / BF16: the values' bit patterns)."""
    import gguf

    if quant_type not in QUANT_BLOCKS:
        raise ValueError(f"quant type {quant_type} not supported (supported: {', '.join(QUANT_BLOCKS)})")
    x = np.ascontiguousarray(values, dtype=np.float32)
    block, type_size = QUANT_BLOCKS[quant_type]
    if x.ndim == 0 or x.shape[-1] % block:
        raise ValueError(f"{quant_type}: the last dim of {x.shape} is not whole blocks of {block}")
    byte_shape = (*x.shape[:-1], x.shape[-1] // block * type_size)
    if quant_type in GGUF_QUANTIZES:
        raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[quant_type])
        return np.ascontiguousarray(raw).view(np.uint8).reshape(byte_shape)
    raw = _K_QUANTIZERS[quant_type](x.reshape(-1, block))
    assert raw.dtype == np.uint8 and raw.shape[1] == type_size
    return raw.reshape(byte_shape)


# ---- city96-layout files ---------------------------------------------------------------------------------------------
def strip_prefix(keys) -> dict:
    """key in the file -> key in the GGUF: city96's prefix rule (see the module docstring)."""
    keys = list(keys)
    for prefix in ("model.diffusion_model.", "model."):
        if any(k.startswith(prefix) for k in keys):
            return {k: k[len(prefix):] for k in keys if k.startswith(prefix)}
    if keys and all(k.startswith("net.") for k in keys):
        return {k: k[len("net."):] for k in keys}
    return {k: k for k in keys}


def gguf_type_for(key: str, shape, source_dtype: torch.dtype, quant_type: str, architecture: str = "wan",
                  keep=None) -> str:
    """The type city96's tools give tensor `key` (after the prefix strip) of `shape` in a `quant_type` file."""
    block = QUANT_BLOCKS[quant_type][0]
    if len(shape) > MAX_GGML_DIMS:
        return "F32"
    if (block > 1 and key.endswith("weight") and len(shape) == 2
            and not any(part in key for part in KEEP_WHOLE.get(architecture, ()))
            and not (keep is not None and keep(key, tuple(shape)))):
        return quant_type if shape[-1] % block == 0 else "F16"
    if source_dtype in (torch.float32, torch.float64, torch.bfloat16) and (
            len(shape) <= 1 or math.prod(shape) <= SMALL_TENSOR
            or any(h in key for h in HIGH_PRECISION.get(architecture, ()))):
        return "F32"
    if block == 1:
        return quant_type
    return "BF16" if source_dtype == torch.bfloat16 else "F16"


def _file_type(quant_type: str):
    import gguf

    name = {"F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}.get(
        quant_type, f"MOSTLY_{quant_type}")
    return getattr(gguf.LlamaFileType, name, None)


def write_gguf_dit(src_safetensors: str, dst: str, quant_type: str, architecture: str = "wan", keep=None) -> dict:
    """Convert the safetensors DiT `src_safetensors` to a city96-layout GGUF `dst` of `quant_type` (rules in the
    module docstring; `keep(key, shape) -> bool`: True keeps that tensor unquantized). Returns {key: type written}."""
    import gguf
    from safetensors import safe_open

    if quant_type not in QUANT_BLOCKS:
        raise ValueError(f"quant type {quant_type} not supported (supported: {', '.join(QUANT_BLOCKS)})")
    with safe_open(src_safetensors, framework="pt") as f:
        names = strip_prefix(f.keys())
        ignored = IGNORED.get(architecture, ())
        names = {k: n for k, n in names.items() if not any(x in n for x in ignored)}
        source = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in names}
    st_dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    plan = []  # (source key, key, PyTorch shape, stored shape, type)
    for k, name in names.items():
        shape, st_dtype = source[k]
        qtype = gguf_type_for(name, shape, st_dtypes.get(st_dtype, torch.float16), quant_type, architecture, keep)
        stored = (shape[0], math.prod(shape[1:])) if len(shape) > MAX_GGML_DIMS else shape
        plan.append((k, name, shape, stored, qtype))

    writer = gguf.GGUFWriter(dst, architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if _file_type(quant_type) is not None:
        writer.add_file_type(_file_type(quant_type))
    for _, name, shape, stored, _ in plan:
        if stored != shape:
            writer.add_array(ORIG_SHAPE_KEY + name, [int(s) for s in shape])
    for _, name, _, stored, qtype in plan:  # the tensor table first, from the shapes alone
        block, type_size = QUANT_BLOCKS[qtype]
        nbytes = math.prod(stored) // block * type_size
        writer.add_tensor_info(name, stored, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with safe_open(src_safetensors, framework="pt") as f:
        for k, _, _, stored, qtype in plan:  # then the data, one tensor at a time
            values = f.get_tensor(k).to(torch.float32).reshape(stored).numpy()
            writer.write_tensor_data(quantize_values(values, qtype))
    writer.close()
    return {name: qtype for _, name, _, _, qtype in plan}


def write_dequantized_safetensors(gguf_path: str, dst: str, dtype: torch.dtype = torch.float32) -> str:
    """The weights GGUF `gguf_path` holds (gguf.py's `dequantize`: gguf's own numpy dequantization) as a `dtype`
    safetensors file with the same keys and PyTorch shapes: the reference a GGUF model is compared with."""
    from ..weights.gguf import dequantize, open_reader, read_gguf_header, read_rows
    from .synthetic import write_safetensors_stream

    header = read_gguf_header(gguf_path)
    reader = open_reader(gguf_path)

    def make(key):
        raw, qtype, shape = read_rows(reader, key, None)
        return dequantize(raw, qtype, shape, dtype)

    entries = [(key, shape, dtype, lambda key=key: make(key)) for key, (shape, _) in header.items()]
    return write_safetensors_stream(dst, entries)
