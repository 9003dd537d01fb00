"""The torch dequantization kernels (parallel_backend/weights/gguf_kernels.py): for every GGUF type the pack reads,
dequantize_torch's float32 equals gguf.quants.dequantize bit for bit, on several shapes (multi-row, 3-D), on the
bytes of a row range alone, and under torch.compile (fullgraph: no graph break; inductor on CPU: the same bits).

Blocks are random bytes with sane f16 scale fields (every code / scale / bit pattern occurs, and no inf / NaN scale),
and for the types gguf can quantize also gguf.quants.quantize of normal values (F32 / F16 / BF16 only that way: their
random bytes would hold NaNs).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from parallel_backend.weights.checkpoint import CheckpointError
from parallel_backend.weights.gguf import QUANT_BLOCKS, QUANTIZED_TYPES
from parallel_backend.weights.gguf_kernels import dequantize_torch

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only

Q = gguf.GGMLQuantizationType
# byte offsets of each block's f16 fields (d, and dmin / m where the type has one), from gguf's dequantize_blocks
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
QUANTIZED_BY_GGUF = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# PyTorch shapes, blocks along the last dim (256: one K block, 8 legacy blocks)
SHAPES = [(1, 256), (6, 512), (3, 2, 768), (2, 3, 2, 256)]


def _random_blocks(qtype: str, shape, rng) -> np.ndarray:
    block, size = QUANT_BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(int(np.prod(shape)) // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:  # signed scales too: the kernels must not assume d > 0
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def _gguf_quantized(qtype: str, shape, rng) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:3] = (1e-6, -3e-8, 0.0)  # f16 subnormals and a zero among them
    return np.ascontiguousarray(gguf.quants.quantize(x, Q[qtype])).view(np.uint8)


def _cases(qtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if qtype in F16_FIELDS:
        yield "random", _random_blocks(qtype, shape, rng)
    if qtype in QUANTIZED_BY_GGUF:
        yield "gguf", _gguf_quantized(qtype, shape, rng)


def _reference(raw: np.ndarray, qtype: str, shape) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, Q[qtype]).astype(np.float32)).reshape(shape)


def test_quantized_types():
    assert QUANTIZED_TYPES == ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    assert set(F16_FIELDS) == set(QUANTIZED_TYPES) and set(QUANTIZED_BY_GGUF) <= set(QUANT_BLOCKS)


@pytest.mark.parametrize("qtype", list(QUANT_BLOCKS))
def test_equals_gguf_exactly(qtype):
    for shape in SHAPES:
        for how, raw in _cases(qtype, shape):
            ref = _reference(raw, qtype, shape)
            assert torch.isfinite(ref).all()
            out = dequantize_torch(torch.from_numpy(raw), qtype, shape)
            assert out.dtype == torch.float32 and out.shape == shape
            assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), (qtype, how, shape)  # the same bits
            # the raw bytes in any shape (flat, or a block matrix); the cast comes last
            flat = torch.from_numpy(raw.reshape(-1).copy())
            assert torch.equal(dequantize_torch(flat, qtype, shape, torch.bfloat16), ref.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", list(QUANT_BLOCKS))
def test_row_range_bytes_give_those_rows(qtype):
    shape = (6, 512)
    block, size = QUANT_BLOCKS[qtype]
    per_row = shape[1] // block * size
    for _, raw in _cases(qtype, shape, seed=1):
        whole = dequantize_torch(torch.from_numpy(raw), qtype, shape)
        flat = torch.from_numpy(raw.reshape(-1).copy())
        for a, b in ((0, 6), (0, 2), (2, 5), (5, 6), (3, 3)):
            part = dequantize_torch(flat[a * per_row: b * per_row], qtype, (b - a, shape[1]))  # a view at an offset
            assert torch.equal(part, whole[a:b]), (qtype, a, b)


def test_refusals():
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        dequantize_torch(raw, "IQ2_XXS", (1, 32))
    with pytest.raises(CheckpointError, match="takes 68 bytes, got 34"):
        dequantize_torch(raw, "Q8_0", (2, 32))
    with pytest.raises(CheckpointError, match="not whole Q8_0 blocks"):
        dequantize_torch(raw, "Q8_0", (32, 1))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_torch(raw.to(torch.int8), "Q8_0", (1, 32))


@pytest.mark.parametrize("qtype", list(QUANT_BLOCKS))
def test_traces_without_graph_breaks(qtype):
    """fullgraph=True fails on any graph break (a python loop over data, numpy, .item()); the eager backend runs
    the traced graph, so this checks dynamo's trace quickly. One reset per type: the type is a guarded constant."""
    torch._dynamo.reset()
    compiled = torch.compile(dequantize_torch, backend="eager", fullgraph=True)
    shape = (3, 512)
    for _, raw in _cases(qtype, shape, seed=2):
        ref = _reference(raw, qtype, shape)
        assert torch.equal(compiled(torch.from_numpy(raw), qtype, shape), ref)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K", "Q6_K"])  # d * q + m, (d * sc) * q - (dmin * m), (d * sc) * q
@pytest.mark.multirank
def test_inductor_gives_the_same_bits(qtype):
    """Inductor's CPU kernels (fused, vectorized) keep gguf's op order: no fma contraction changes a bit."""
    torch._dynamo.reset()
    compiled = torch.compile(dequantize_torch, fullgraph=True)
    shape = (4, 512)
    for _, raw in _cases(qtype, shape, seed=3):
        ref = _reference(raw, qtype, shape)
        out = compiled(torch.from_numpy(raw), qtype, shape)
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), qtype
