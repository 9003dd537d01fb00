"""Tensor parallelism (Megatron style) on the host's own layers, each holding only its shard and loading only it.

A planned Linear (ComfyUI's class) is replaced by a layer of the same class with its column or row shard's shape
(`host_colwise` / `host_rowwise`); an RMSNorm over heads that TP splits becomes a HeadShardedRMSNorm
(`head_norm`, Wan's qk-norm). Each layer names, per parameter, the dim it is sharded on (`shard_dims`), so the
loader can read exactly that slice from the checkpoint with safetensors' `get_slice`. DTensor's ColwiseParallel /
RowwiseParallel would need the full tensor to distribute; these hold the local shard from the start, which is what
makes per-rank loading cheap.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .collectives import all_reduce


class _TPModule(nn.Module):
    shard_dims: dict = {}

    def __init__(self, group, tp_rank: int, tp_size: int):
        super().__init__()
        self.tp_group, self.tp_rank, self.tp_size = group, tp_rank, tp_size


class HeadShardedRMSNorm(_TPModule):
    """RMSNorm over all heads when each rank holds heads / tp of them (Wan's qk-norm).

    The mean of squares is a sum over the full width, so ranks all-reduce their partial sums
    (one scalar per token) before normalising their own channels.
    """
    shard_dims = {"weight": 0}

    def __init__(self, full_dim, eps, elementwise_affine, group, tp_rank, tp_size, device=None, dtype=None):
        super().__init__(group, tp_rank, tp_size)
        self.full_dim, self.eps = full_dim, eps
        local = full_dim // tp_size
        self.weight = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x):
        xf = x.float()
        sq = xf.pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            sq = all_reduce(sq, self.tp_group)
        y = xf * torch.rsqrt(sq / self.full_dim + (self.eps if self.eps is not None else torch.finfo(xf.dtype).eps))
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def head_sharded_norm(norm: nn.RMSNorm, group, tp_rank, tp_size) -> HeadShardedRMSNorm:
    w = norm.weight
    return HeadShardedRMSNorm(norm.normalized_shape[0], norm.eps, w is not None, group, tp_rank, tp_size,
                              device=None if w is None else w.device, dtype=None if w is None else w.dtype)


# ---- tensor parallelism on the host's own layers ------------------------------------------------------------------
# ComfyUI's Linear (and Conv) classes (comfy.ops: manual cast, scaled fp8, ...) carry the host's weight semantics.
# Splitting one keeps its class: a layer of the same class with the local shape, plus the collective the split needs. Parameter
# names stay the checkpoint's, and `shard_dims` tells the loader which slice each rank reads.


def _is_linear(layer: nn.Module) -> bool:
    """A Linear of the host: torch's, or one that only looks like it (ComfyUI's mixed-precision Linear is a plain
    Module with `in_features` / `out_features` that loads its own, possibly quantized, weight)."""
    return isinstance(layer, nn.Linear) or (not isinstance(layer, nn.modules.conv._ConvNd)
                                            and hasattr(layer, "in_features") and hasattr(layer, "out_features"))


def _sizes(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a host Linear or Conv layer."""
    if _is_linear(layer):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        if layer.groups != 1:
            raise ValueError(f"a grouped convolution ({layer}) cannot be split over tensor-parallel ranks")
        return layer.in_channels, layer.out_channels
    raise TypeError(f"tensor parallelism splits Linear and Conv layers, not {type(layer).__name__}")


def _shrunk(layer: nn.Module, in_features: int, out_features: int) -> nn.Module:
    if _is_linear(layer):
        new = type(layer)(in_features, out_features, bias=layer.bias is not None, device="meta",
                          dtype=layer.weight.dtype)
        if "weight" not in new._parameters:  # a layer that loads its own weight: the placeholder the loader fills
            # (models/host.py gives the host-built layer one, in the dtype the file stores its weight in)
            new.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=layer.weight.dtype, device="meta"),
                                      requires_grad=False)
    else:
        new = type(layer)(in_features, out_features, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                          device="meta", dtype=layer.weight.dtype)
    for attr in ("comfy_cast_weights",):  # per-instance switches the host may have set
        if attr in layer.__dict__:
            setattr(new, attr, layer.__dict__[attr])
    return new


def host_column_parallel(layer: nn.Module, group, tp_rank, tp_size) -> nn.Module:
    """The host layer (Linear, or Conv: channels) with outputs / tp: y[..., shard] = x @ W[shard].T + b[shard]."""
    n_in, n_out = _sizes(layer)
    assert n_out % tp_size == 0, f"out_features {n_out} % tp {tp_size}"
    new = _shrunk(layer, n_in, n_out // tp_size)
    new.shard_dims, new.tp_group, new.tp_rank, new.tp_size = {"weight": 0, "bias": 0}, group, tp_rank, tp_size
    return new


def host_column_parallel_kv(layer: nn.Module, group, tp_rank, tp_size) -> nn.Module:
    """A fused k / v projection whose outputs are [k of every head | v of every head] (Wan Animate's face blocks):
    each rank holds its heads' rows of both blocks (`shard_chunks` = 2: the loader reads and joins the two
    slices), so its output is [its k heads | its v heads], what the layer's own rearrange then expects."""
    n_in, n_out = _sizes(layer)
    assert n_out % (2 * tp_size) == 0, f"out_features {n_out} % (2 x tp {tp_size})"
    new = host_column_parallel(layer, group, tp_rank, tp_size)
    new.shard_chunks = 2
    return new


def host_column_parallel_qkv(layer: nn.Module, group, tp_rank, tp_size) -> nn.Module:
    """A fused q / k / v projection whose outputs are [q of every head | k ... | v ...] (MiniMax H3): each rank holds
    its heads' rows of all three blocks, so its output is [its q heads | its k heads | its v heads]."""
    n_in, n_out = _sizes(layer)
    assert n_out % (3 * tp_size) == 0, f"out_features {n_out} % (3 x tp {tp_size})"
    new = host_column_parallel(layer, group, tp_rank, tp_size)
    new.shard_chunks = 3
    return new


def host_column_parallel_chunks(chunks: int):
    """A fused projection whose outputs are `chunks` equal blocks (HunyuanVideo's single block: [q | k | v | four
    blocks of its MLP's input]): each rank holds its part of every block, so its output is [its q heads | its k heads
    | its v heads | its part of each MLP block]; the layer after it takes the same parts (`host_row_parallel_chunks`)."""
    def style(layer: nn.Module, group, tp_rank, tp_size) -> nn.Module:
        n_in, n_out = _sizes(layer)
        assert n_out % (chunks * tp_size) == 0, f"out_features {n_out} % ({chunks} x tp {tp_size})"
        new = host_column_parallel(layer, group, tp_rank, tp_size)
        new.shard_chunks = chunks
        return new
    return style


def host_row_parallel_chunks(chunks: int):
    """A row-parallel layer whose input is `chunks` equal blocks, each split over TP (the input a
    `host_column_parallel_chunks` layer's parts make: HunyuanVideo's single block takes [attention | MLP])."""
    def style(layer: nn.Module, group, tp_rank, tp_size) -> nn.Module:
        n_in, n_out = _sizes(layer)
        assert n_in % (chunks * tp_size) == 0, f"in_features {n_in} % ({chunks} x tp {tp_size})"
        new = host_row_parallel(layer, group, tp_rank, tp_size)
        new.shard_chunks = chunks
        return new
    return style


def host_row_parallel(layer: nn.Module, group, tp_rank, tp_size) -> nn.Module:
    """The host layer with inputs / tp, its output all-reduced over TP. The bias is held by TP rank 0 only (the
    others hold zeros), so the sum adds it once and the layer's own forward stays the host's."""
    n_in, n_out = _sizes(layer)
    assert n_in % tp_size == 0, f"in_features {n_in} % tp {tp_size}"
    new = _shrunk(layer, n_in // tp_size, n_out)
    new.shard_dims, new.tp_group, new.tp_rank, new.tp_size = ({"weight": 1, "bias": BIAS_ON_RANK0}, group, tp_rank,
                                                              tp_size)
    new.register_forward_hook(_all_reduce_output)
    return new


def host_row_parallel_sliced_input(layer: nn.Module, group, tp_rank, tp_size) -> nn.Module:
    """A row-parallel layer whose input is whole on every rank (a projection from and back to the full hidden
    state): each rank takes its own input features (channels for a Conv), so the layer holds 1 / tp of the
    weight for one all-reduce, where a replicated layer would hold all of it."""
    new = host_row_parallel(layer, group, tp_rank, tp_size)
    new.input_dim = -1 if _is_linear(layer) else 1
    new.register_forward_pre_hook(_slice_input)
    return new


BIAS_ON_RANK0 = "rank0"  # a shard_dims value: TP rank 0 reads the whole tensor, the others hold zeros


def _all_reduce_output(module, _args, out):
    return all_reduce(out, module.tp_group) if module.tp_size > 1 else out


def _slice_input(module, args):
    x = args[0]
    n = x.shape[module.input_dim] // module.tp_size
    return (x.narrow(module.input_dim, module.tp_rank * n, n), *args[1:])


TP_STYLES = {"host_colwise": host_column_parallel, "host_colwise_kv": host_column_parallel_kv,
             "host_colwise_qkv": host_column_parallel_qkv,
             # HunyuanVideo's single block at mlp_ratio 4: linear1 [q | k | v | 4 x mlp], linear2 [attention | 4 x mlp]
             "host_colwise_7chunks": host_column_parallel_chunks(7), "host_rowwise_5chunks": host_row_parallel_chunks(5),
             "host_rowwise": host_row_parallel,
             "host_rowwise_sliced_input": host_row_parallel_sliced_input, "head_norm": head_sharded_norm}
