"""The GGUF test-file writer (parallel_backend/testing/gguf_files.py): our K-quant quantizers give valid blocks that
gguf dequantizes to within the documented error; a tiny Wan converted per type reads back (gguf.py's reader) with the
safetensors file's keys and PyTorch shapes, architecture "wan", city96's type per tensor, the 5-D patch embedding
5-D, the quantized bytes those of quantize_values, and dequantized weights near the originals; the dequantized
safetensors reference round-trips keys / shapes; prefixes are stripped; a Cosmos file keeps its parts whole.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from parallel_backend.testing.gguf_files import (
    ERROR_BOUNDS,
    gguf_type_for,
    quantize_values,
    strip_prefix,
    write_dequantized_safetensors,
    write_gguf_dit,
)
from parallel_backend.testing.synthetic import wan_shapes, write_checkpoint, write_tiny_cosmos, write_tiny_wan
from parallel_backend.weights.gguf import (
    ORIG_SHAPE_KEY,
    QUANT_BLOCKS,
    dequantize,
    open_reader,
    read_gguf_header,
    read_rows,
)
from parallel_backend.weights.gguf_kernels import dequantize_torch
from parallel_backend.weights.reads import read_header

Q = gguf.GGMLQuantizationType
FILE_TYPES = ("F16", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# the parts city96 keeps whole in a Wan file: 2-D, kept as F16; 1-D, modulation, the 5-D patch embedding: F32
WAN_WHOLE_2D = {"text_embedding.0.weight", "text_embedding.2.weight", "time_embedding.0.weight",
                "time_embedding.2.weight", "time_projection.1.weight", "head.head.weight"}


def _rel_rms(approx, exact) -> float:
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def _load(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("qtype", list(QUANT_BLOCKS))
def test_quantize_values_round_trip(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    x[0, :256] = 0.0  # a block of zeros: no division by a zero scale
    x[1, :256] = np.abs(x[1, :256]) + 0.5  # all positive (min offset 0)
    x[2, :256] = -np.abs(x[2, :256]) - 0.5  # all negative
    raw = quantize_values(x, qtype)
    block, size = QUANT_BLOCKS[qtype]
    assert raw.dtype == np.uint8 and raw.shape == (64, 1024 // block * size)
    y = gguf.quants.dequantize(raw, Q[qtype]).astype(np.float32).reshape(x.shape)
    assert np.isfinite(y).all() and np.array_equal(y[0, :256], np.zeros(256, np.float32))
    assert _rel_rms(y, x) <= ERROR_BOUNDS[qtype], (qtype, _rel_rms(y, x))
    assert _rel_rms(y[1:3, :256], x[1:3, :256]) <= 2 * ERROR_BOUNDS[qtype]  # one-signed blocks as well
    # the torch kernels read our blocks as gguf does; any leading shape packs the same rows
    assert torch.equal(dequantize_torch(torch.from_numpy(raw), qtype, x.shape), torch.from_numpy(y))
    assert np.array_equal(quantize_values(x.reshape(4, 16, 1024), qtype), raw.reshape(4, 16, -1))


def test_quantize_values_refuses_partial_blocks():
    with pytest.raises(ValueError, match="not whole blocks of 256"):
        quantize_values(np.zeros((2, 128), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="IQ2_XXS"):
        quantize_values(np.zeros((2, 256), np.float32), "IQ2_XXS")


def test_type_rule():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert gguf_type_for("blocks.0.self_attn.q.weight", (512, 512), f32, "Q4_K") == "Q4_K"
    assert gguf_type_for("blocks.0.ffn.2.weight", (512, 1000), f32, "Q4_K") == "F16"  # 1000 columns: no K blocks
    assert gguf_type_for("blocks.0.ffn.2.weight", (512, 1000), f32, "Q8_0") == "F16"
    assert gguf_type_for("blocks.0.ffn.2.weight", (512, 1024), f32, "Q8_0", keep=lambda k, s: "ffn" in k) == "F16"
    assert gguf_type_for("blocks.0.self_attn.q.bias", (512,), f32, "Q4_K") == "F32"
    assert gguf_type_for("blocks.0.self_attn.q.bias", (512,), f16, "Q4_K") == "F16"  # city96: F32 only from F32/BF16
    assert gguf_type_for("blocks.0.modulation", (1, 6, 512), bf16, "Q8_0") == "F32"
    assert gguf_type_for("text_embedding.0.weight", (512, 4096), bf16, "Q8_0") == "BF16"
    assert gguf_type_for("text_embedding.0.weight", (512, 4096), f32, "F16") == "F16"
    assert gguf_type_for("patch_embedding.weight", (512, 16, 1, 2, 2), f16, "Q8_0") == "F32"
    assert gguf_type_for("x_embedder.proj.1.weight", (512, 256), f32, "Q8_0", "cosmos") == "F16"
    assert gguf_type_for("x_embedder.proj.1.weight", (512, 256), f32, "Q8_0", "wan") == "Q8_0"
    assert strip_prefix(["model.diffusion_model.a", "model.diffusion_model.b", "vae.c"]) == {
        "model.diffusion_model.a": "a", "model.diffusion_model.b": "b"}
    assert strip_prefix(["net.a", "net.b"]) == {"net.a": "a", "net.b": "b"}
    assert strip_prefix(["net.a", "b"]) == {"net.a": "net.a", "b": "b"}


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_files")
    src = write_tiny_wan(str(d / "tiny_wan.safetensors"), seed=3)
    return d, src, _load(src)


@pytest.mark.parametrize("qtype", FILE_TYPES)
def test_tiny_wan_as_gguf(tiny_wan, qtype):
    d, src, original = tiny_wan
    dst = str(d / f"tiny_wan_{qtype}.gguf")
    written = write_gguf_dit(src, dst, qtype)

    header = read_gguf_header(dst)
    assert header.architecture == "wan"
    assert {k: shape for k, (shape, _) in header.items()} == {k: shape for k, (shape, _) in read_header(src).items()}
    assert {k: t for k, (_, t) in header.items()} == written
    assert header["patch_embedding.weight"] == ((512, 16, 1, 2, 2), "F32")  # 5-D: reshaped, with its orig shape
    reader = open_reader(dst)
    stored = next(t for t in reader.tensors if t.name == "patch_embedding.weight")
    assert tuple(reversed(stored.shape.tolist())) == (512, 64)
    assert reader.get_field(ORIG_SHAPE_KEY + "patch_embedding.weight") is not None
    for key, t in written.items():
        shape = original[key].shape
        if key == "patch_embedding.weight" or len(shape) == 1 or "modulation" in key:
            assert t == "F32", key
        elif key in WAN_WHOLE_2D or qtype in ("F16", "BF16"):
            assert t == ("BF16" if qtype == "BF16" else "F16"), key
        else:  # the blocks' linears
            assert key.startswith("blocks.") and len(shape) == 2 and t == qtype, key

    for key, t in written.items():
        raw, got_type, shape = read_rows(reader, key, None)
        assert got_type == t and shape == tuple(original[key].shape)
        x = original[key].numpy()
        assert np.array_equal(raw, quantize_values(x.reshape(shape[0], -1), t).reshape(-1)), key  # the bytes
        y = dequantize(raw, t, shape).numpy()
        assert _rel_rms(y, x) <= ERROR_BOUNDS[t], (key, t, _rel_rms(y, x))
        if t == qtype and qtype != "F16":  # an honest bound: not far below the measured error either
            assert _rel_rms(y, x) >= ERROR_BOUNDS[t] / 2, (key, t, _rel_rms(y, x))
        assert torch.equal(dequantize_torch(torch.from_numpy(raw), t, shape), torch.from_numpy(y))
        part, _, part_shape = read_rows(reader, key, slice(1, 3))  # dim-0 rows, of the 5-D embedding too
        assert torch.equal(dequantize(part, t, part_shape), torch.from_numpy(y[1:3])), key

    reference = str(d / f"tiny_wan_{qtype}_dequantized.safetensors")
    write_dequantized_safetensors(dst, reference)
    assert read_header(reference) == {k: (shape, "F32") for k, (shape, _) in read_header(src).items()}
    back = _load(reference)
    assert back["patch_embedding.weight"].dim() == 5
    for key, t in written.items():
        raw, _, shape = read_rows(reader, key, None)
        assert torch.equal(back[key], dequantize(raw, t, shape)), key
    write_dequantized_safetensors(dst, reference, torch.bfloat16)
    assert {dt for _, dt in read_header(reference).values()} == {"BF16"}


def test_prefixed_bf16_source(tmp_path):
    """A `model.diffusion_model.`-prefixed BF16 file: keys stripped, kept 2-D parts BF16, 1-D ones F32."""
    shapes = wan_shapes(dim=256, ffn_dim=512, num_layers=1, text_dim=256)
    src = write_checkpoint(str(tmp_path / "prefixed.safetensors"), shapes, dtype=torch.bfloat16,
                           prefix="model.diffusion_model.")
    written = write_gguf_dit(src, str(tmp_path / "prefixed.gguf"), "Q8_0")
    header = read_gguf_header(str(tmp_path / "prefixed.gguf"))
    assert {k: s for k, (s, _) in header.items()} == shapes
    assert written["blocks.0.ffn.0.weight"] == "Q8_0" and written["text_embedding.0.weight"] == "BF16"
    assert written["blocks.0.norm3.weight"] == "F32" and written["head.modulation"] == "F32"


def test_tiny_cosmos(tmp_path):
    src = write_tiny_cosmos(str(tmp_path / "cosmos.safetensors"))
    written = write_gguf_dit(src, str(tmp_path / "cosmos.gguf"), "Q6_K", architecture="cosmos")
    header = read_gguf_header(str(tmp_path / "cosmos.gguf"))
    assert header.architecture == "cosmos"
    assert {k: s for k, (s, _) in header.items()} == {k[len("net."):]: s for k, (s, _) in read_header(src).items()}
    assert written["blocks.0.cross_attn.k_proj.weight"] == "Q6_K"  # (512, 1024)
    assert written["x_embedder.proj.1.weight"] == "F16" and written["final_layer.linear.weight"] == "F16"
    assert written["pos_embedder.dim_spatial_range"] == "F32"
