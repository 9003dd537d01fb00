"""Sharded weights: every rank keeps 1/N of each transformer block's weights and the block is gathered whole just
before it runs (the next block's gather issued as this one starts), then dropped -- ZeRO-3 / FSDP for inference.

torch's FSDP2 (`fully_shard`) does all of it on the host's own meta-built classes: each block becomes one FSDP unit
(a DTensor Shard(0) per parameter: rows [r * c, (r + 1) * c) with c = ceil(rows / N), what the loader reads with
`get_slice`); mixed dtypes in one block (fp8 weights beside fp32 norms, GGUF's uint8 blocks) are gathered in one
uint8 buffer by FSDP itself; a 0-dim parameter (a scaled-fp8 layer's scale) is left out of the unit and held whole.
Written here only what FSDP lacks for this use:
  - a root that the family's forward runs through (`ShardedWeights.run`): the host's `_forward` is not the module's
    `__call__` (that would apply ComfyUI's wrappers a second time), so FSDP's root hooks are driven explicitly;
  - an all-gather that counts its bytes into `collectives.count_bytes()` ("weight_gather"), so tests and bench/
    measure what the gathers move;
Everything outside the blocks (embeddings, head, modulation tables) stays whole on every rank: it is small and
runs once per forward.

Every rank must run every block of a call, in the same order (each gather is a collective over all ranks): ranks of
all replicas run the same blocks because a call's control flow depends on its options, never on the rows (a block
replaced by a patch - SkipLayerGuidance - is replaced for the whole call).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .collectives import _count


def fsdp_rows(rows: int, rank: int, world: int) -> slice:
    """The dim-0 rows FSDP gives `rank` of a parameter with `rows` rows (torch.chunk: ceil-sized, the last ranks
    may get fewer or none)."""
    c = -(-rows // world)
    return slice(min(rank * c, rows), min((rank + 1) * c, rows))


def shard_units(model: nn.Module, containers: tuple) -> list:
    """(name, module) of every block to shard: each child of the `containers` (ModuleList / ModuleDict names, dotted
    paths allowed) the model has, in order."""
    units = []
    for path in containers:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        for child_name, child in container.named_children():
            units.append((f"{path}.{child_name}", child))
    return units


_BYTE_FLOATS = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                     if hasattr(torch, n))


def _counting_all_gather_class():
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather

    class CountingAllGather(AllGather):
        """FSDP's all-gather (one flat buffer per block), its bytes counted like collectives.all_gather's: a rank's
        shard x (N - 1) leaves it."""

        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            _count("weight_gather", input_tensor.numel() * input_tensor.element_size()
                   * (dist.get_world_size(group) - 1))
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name first
            if input_tensor.dtype in _BYTE_FLOATS:  # a block all fp8 (gloo has no fp8 type): moved as its bytes
                output_tensor, input_tensor = output_tensor.view(torch.uint8), input_tensor.view(torch.uint8)
            return gather(output_tensor, input_tensor, group=group, async_op=async_op)

    return CountingAllGather


class _Root(nn.Module):
    """FSDP's root over the model: runs a call (the family's forward) inside the root's hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class ShardedWeights:
    """The blocks of `model` sharded over `mesh` (a 1-D DeviceMesh of every rank), built on meta: call
    `materialize` before loading, then run each forward through `run`."""

    def __init__(self, model: nn.Module, containers: tuple, mesh, prefetch: int = 1):
        from torch.distributed.fsdp import fully_shard

        self.mesh, self.world, self.rank = mesh, mesh.size(), mesh.get_local_rank()
        self.units = shard_units(model, containers)
        if not self.units:
            raise ValueError(f"no blocks to shard: the model has none of {containers}")
        gather = _counting_all_gather_class()()
        unit_params = set()
        for _, unit in self.units:
            scalars = {p for p in unit.parameters() if p.dim() == 0}
            fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=scalars)
            unit.set_custom_all_gather(gather)
            unit_params.update(p for p in unit.parameters() if p.dim() > 0)
        modules = [u for _, u in self.units]
        for i, unit in enumerate(modules):
            ahead = modules[i + 1:i + 1 + prefetch]
            if ahead:  # the next block's gather is issued when this one's has landed, before it computes
                unit.set_modules_to_forward_prefetch(ahead)
        self.root = _Root(model)
        fully_shard(self.root, mesh=mesh, ignored_params={p for p in model.parameters() if p not in unit_params})
        self.unit_names = [n for n, _ in self.units]

    def materialize(self, device) -> None:
        """Allocate every block's local shard (and its whole 0-dim parameters) on `device`, uninitialised; buffers
        the host class computed at build (not meta) keep their values."""
        for _, unit in self.units:
            built = {n: b for n, b in unit.named_buffers() if not b.is_meta}
            unit.to_empty(device=device)
            for name, b in built.items():
                owner_name, _, bname = name.rpartition(".")
                owner = unit.get_submodule(owner_name) if owner_name else unit
                owner._buffers[bname] = b.to(device)

    def run(self, fn, *args, **kwargs):
        return self.root(fn, *args, **kwargs)

    def gathered_bytes(self) -> int:
        """Bytes the block gathers move out of one rank per forward: its padded shard of every block x (N - 1)."""
        total = 0
        for _, unit in self.units:
            for p in unit.parameters():
                if is_sharded(p):
                    total += -(-p.shape[0] // self.world) * math.prod(p.shape[1:]) * p.element_size()
        return total * (self.world - 1)


def is_sharded(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds (a sharded parameter's local rows; anything else itself)."""
    return p.to_local() if is_sharded(p) else p
