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
# ComfyUI's Linear classes (comfy.ops: manual cast, scaled fp8, ...) carry the host's weight semantics. Splitting one
# keeps its class: a layer of the same class with the local shape, plus the collective the split needs. Parameter
# names stay the checkpoint's, and `shard_dims` tells the loader which slice each rank reads.


def _shrunk(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    new = type(linear)(in_features, out_features, bias=linear.bias is not None, device="meta",
                       dtype=linear.weight.dtype)
    for attr in ("comfy_cast_weights",):  # per-instance switches the host may have set
        if attr in linear.__dict__:
            setattr(new, attr, linear.__dict__[attr])
    return new


def host_column_parallel(linear: nn.Linear, group, tp_rank, tp_size) -> nn.Linear:
    """The host layer with out_features / tp outputs: y[..., shard] = x @ W[shard].T + b[shard]."""
    assert linear.out_features % tp_size == 0, f"out_features {linear.out_features} % tp {tp_size}"
    new = _shrunk(linear, linear.in_features, linear.out_features // tp_size)
    new.shard_dims, new.tp_group, new.tp_rank, new.tp_size = {"weight": 0, "bias": 0}, group, tp_rank, tp_size
    return new


def host_row_parallel(linear: nn.Linear, group, tp_rank, tp_size) -> nn.Linear:
    """The host layer with in_features / tp inputs, its output all-reduced over TP. The bias is held by TP rank 0
    only (the others hold zeros), so the sum adds it once and the layer's own forward stays the host's."""
    assert linear.in_features % tp_size == 0, f"in_features {linear.in_features} % tp {tp_size}"
    new = _shrunk(linear, linear.in_features // tp_size, linear.out_features)
    new.shard_dims, new.tp_group, new.tp_rank, new.tp_size = ({"weight": 1, "bias": BIAS_ON_RANK0}, group, tp_rank,
                                                              tp_size)
    new.register_forward_hook(_all_reduce_output)
    return new


BIAS_ON_RANK0 = "rank0"  # a shard_dims value: TP rank 0 reads the whole tensor, the others hold zeros


def _all_reduce_output(module, _args, out):
    return all_reduce(out, module.tp_group) if module.tp_size > 1 else out


TP_STYLES = {"host_colwise": host_column_parallel, "host_rowwise": host_row_parallel, "head_norm": head_sharded_norm}
