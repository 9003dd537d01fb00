"""The GGUF reader (parallel_backend/weights/gguf.py), on tiny files written here with gguf's own GGUFWriter:
header shapes / quant types / architecture, dequantization equal to gguf.quants.dequantize exactly, row reads
that copy only the rows' bytes, the dim-1 block-boundary rule, and the refusals naming the file.

F16 / BF16 / Q8_0 (and the legacy 32-blocks) are written with gguf.quants.quantize. gguf has no quantizer for
the K-quants (Q4_K / Q5_K / Q6_K): `test_k_quants_are_not_quantizable_by_gguf` asserts that, and their files are
written from random blocks whose f16 scale fields are set to sane values, which is a valid K-quant tensor to
read and dequantize.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from parallel_backend.weights.checkpoint import CheckpointError
from parallel_backend.weights.gguf import (
    QUANT_BLOCKS,
    column_slice_on_block_boundary,
    dequantize,
    open_reader,
    read_gguf_header,
    read_rows,
)

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only

Q = gguf.GGMLQuantizationType
QUANTIZED_BY_GGUF = ("F16", "BF16", "Q8_0", "Q4_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# byte offsets of the f16 `d` (and `dmin`) fields inside one K-quant block
K_SCALE_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _k_blocks(qtype: str, n_blocks: int, rng) -> np.ndarray:
    size = QUANT_BLOCKS[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in K_SCALE_FIELDS[qtype]:
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


def _raw(qtype: str, shape, rng) -> np.ndarray:
    """The tensor as the writer stores it: typed values for F16/F32, else uint8 bytes in ggml's byte shape."""
    if qtype in K_QUANTS:
        block, size = QUANT_BLOCKS[qtype]
        n = int(np.prod(shape)) // block
        return _k_blocks(qtype, n, rng).reshape(*shape[:-1], shape[-1] // block * size)
    x = rng.standard_normal(shape).astype(np.float32)
    return gguf.quants.quantize(x, Q[qtype])


# PyTorch shapes: a linear weight (rows x 256 columns: one K block, 8 Q8_0 blocks per row), a 1-D bias
TENSORS = {"blocks.0.self_attn.q.weight": (12, 512), "blocks.0.self_attn.q.bias": (512,)}


def _write(path, qtypes, arch="wan", seed=0, extra=None):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    written = {}
    for qtype in qtypes:
        for key, shape in TENSORS.items():
            name = f"{qtype}.{key}"
            raw = _raw(qtype, shape, rng)
            w.add_tensor(name, raw, raw_dtype=None if qtype in ("F16", "F32") else Q[qtype])
            written[name] = (raw, qtype, shape)
    for name, (raw, qtype) in (extra or {}).items():
        w.add_tensor(name, raw, raw_dtype=Q[qtype])
        written[name] = (raw, qtype, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


ALL = QUANTIZED_BY_GGUF + K_QUANTS


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny_wan.gguf"
    return path, _write(path, ALL)


def test_k_quants_are_not_quantizable_by_gguf():
    """Why the K-quant files are written from random blocks: gguf (0.19) only dequantizes them."""
    x = np.zeros((2, 256), np.float32)
    for qtype in K_QUANTS:
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(x, Q[qtype])


def test_header_shapes_types_architecture(gguf_file):
    path, written = gguf_file
    header = read_gguf_header(str(path))
    assert header.architecture == "wan"
    assert header == {name: (shape, qtype) for name, (_, qtype, shape) in written.items()}
    cosmos = path.parent / "cosmos.gguf"
    _write(cosmos, ["F16"], arch="cosmos")
    assert read_gguf_header(str(cosmos)).architecture == "cosmos"


def test_original_shape_metadata_gives_the_5d_shape(tmp_path):
    """A 5-D conv weight stored flattened (ggml holds 4 dims) with comfy.gguf.orig_shape.<key>."""
    path = tmp_path / "conv.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    x = np.random.default_rng(1).standard_normal((8, 16 * 1 * 2 * 2)).astype(np.float16)
    w.add_tensor("patch_embedding.weight", x)
    w.add_array("comfy.gguf.orig_shape.patch_embedding.weight", [8, 16, 1, 2, 2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert read_gguf_header(str(path)) == {"patch_embedding.weight": ((8, 16, 1, 2, 2), "F16")}
    raw, qtype, shape = read_rows(str(path), "patch_embedding.weight", slice(2, 5))
    assert shape == (3, 16, 1, 2, 2) and raw.nbytes == 3 * 64 * 2
    assert torch.equal(dequantize(raw, qtype, shape), torch.from_numpy(x[2:5].astype(np.float32)).reshape(shape))


@pytest.mark.parametrize("qtype", ALL)
def test_full_tensor_equals_gguf_dequantize(gguf_file, qtype):
    path, written = gguf_file
    for key in TENSORS:
        name = f"{qtype}.{key}"
        ref_raw, _, shape = written[name]
        raw, got_type, got_shape = read_rows(str(path), name, None)
        assert got_type == qtype and got_shape == shape
        ref = torch.from_numpy(gguf.quants.dequantize(ref_raw, Q[qtype]).astype(np.float32)).reshape(shape)
        assert torch.isfinite(ref).all()
        out = dequantize(raw, qtype, shape, torch.float32)
        assert out.dtype == torch.float32 and torch.equal(out, ref), qtype
        assert torch.equal(dequantize(raw, qtype, shape, torch.bfloat16), ref.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", ALL)
def test_row_slice_reads_only_those_rows(gguf_file, qtype):
    path, written = gguf_file
    name = f"{qtype}.blocks.0.self_attn.q.weight"
    _, _, shape = written[name]
    block, size = QUANT_BLOCKS[qtype]
    reader = open_reader(str(path))
    full_raw, _, _ = read_rows(reader, name, None)
    full = dequantize(full_raw, qtype, shape)
    for rows in (slice(0, 6), slice(6, 12), slice(3, 4), slice(5, 5)):
        raw, got_type, got_shape = read_rows(reader, name, rows)
        n = rows.stop - rows.start
        assert got_type == qtype and got_shape == (n, shape[1])
        assert raw.dtype == np.uint8 and raw.nbytes == n * shape[1] // block * size  # just those rows' bytes
        assert raw.base is None or not isinstance(raw.base, np.memmap)  # a copy: the map can be dropped
        assert torch.equal(dequantize(raw, qtype, got_shape), full[rows]), (qtype, rows)


def test_column_slice_on_block_boundary():
    assert column_slice_on_block_boundary((5120, 5120), "Q8_0", 2)
    assert column_slice_on_block_boundary((5120, 5120), "Q4_K", 4)
    assert not column_slice_on_block_boundary((5120, 5120), "Q4_K", 8)  # 640 columns: 2.5 K blocks
    assert column_slice_on_block_boundary((5120, 5120), "Q8_0", 8)  # 640 = 20 Q8_0 blocks
    assert not column_slice_on_block_boundary((12, 48), "Q8_0", 2)  # 24 columns: not a 32-block
    assert column_slice_on_block_boundary((12, 48), "F16", 2) and column_slice_on_block_boundary((12, 7), "BF16", 7)
    assert not column_slice_on_block_boundary((12, 7), "F32", 2)  # does not divide
    assert column_slice_on_block_boundary((8, 16, 1, 2, 2), "Q8_0", 2)  # 8 channels x 4 = 32 elements
    assert not column_slice_on_block_boundary((512,), "F16", 2)  # a 1-D tensor has no dim 1
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        column_slice_on_block_boundary((12, 256), "IQ2_XXS", 2)


def test_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        read_gguf_header(str(path))
    with pytest.raises(CheckpointError, match="model file not found"):
        read_gguf_header(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("cut", ["data", "header"])
def test_refuses_a_truncated_file(tmp_path, cut):
    path = tmp_path / "whole.gguf"
    _write(path, ["Q8_0"])
    data = path.read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: len(data) - 100] if cut == "data" else data[:40])
    with pytest.raises(CheckpointError, match=r"short\.gguf: .*truncated"):
        read_gguf_header(str(short))


def test_refuses_another_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    _write(path, ["F16"], arch="llama")
    with pytest.raises(CheckpointError, match=r"llama\.gguf: GGUF architecture 'llama' is not a DiT"):
        read_gguf_header(str(path))


def test_refuses_an_unsupported_quant_type_by_name(tmp_path):
    path = tmp_path / "tq.gguf"
    raw = np.zeros((2, 66), np.uint8)  # two TQ2_0 blocks of 256
    _write(path, ["F16"], extra={"blocks.0.ffn.0.weight": (raw, "TQ2_0")})
    with pytest.raises(CheckpointError, match=r"tq\.gguf: tensor blocks\.0\.ffn\.0\.weight is TQ2_0"):
        read_gguf_header(str(path))


def test_refuses_an_unknown_quant_type(tmp_path):
    """A type id this gguf does not know (patched into the tensor table)."""
    path = tmp_path / "unknown.gguf"
    _write(path, ["F16"])
    data = bytearray(path.read_bytes())
    name = b"F16.blocks.0.self_attn.q.bias"
    at = data.index(name) + len(name) + 4 + 8 * 1  # n_dims (u32), one u64 dim, then the type (u32)
    assert int.from_bytes(data[at:at + 4], "little") == int(Q.F16)
    data[at:at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"unknown\.gguf: unknown GGML quant type 250 "):
        read_gguf_header(str(path))


def test_row_read_refusals(gguf_file):
    path, _ = gguf_file
    with pytest.raises(CheckpointError, match=r"tiny_wan\.gguf: no tensor 'nope'"):
        read_rows(str(path), "nope", None)
    with pytest.raises(CheckpointError, match="contiguous"):
        read_rows(str(path), "F16.blocks.0.self_attn.q.weight", slice(0, 6, 2))
