"""The worker mesh: one DeviceMesh over dp x cfg x ring x ulysses x tp, and the groups each layer needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh

from ..config import AXES, ParallelConfig
from ..parallel.attention import SequenceParallelGroups


@dataclass
class RankMesh:
    """This rank's view of the mesh: its coordinate on each axis and the groups along them."""
    config: ParallelConfig
    rank: int
    coord: dict
    groups: dict  # axis -> ProcessGroup (None for axes of size 1)
    device: torch.device

    @property
    def replica_index(self) -> int:
        """Which slice of the batch this rank's (cfg, dp) replica owns: cfg outer, dp inner."""
        return self.coord["cfg"] * self.config.dp + self.coord["dp"]

    @property
    def sequence_index(self) -> int:
        return self.coord["ring"] * self.config.ulysses + self.coord["ulysses"]

    @property
    def is_replica_leader(self) -> bool:
        """The rank that writes its replica's output (first of its sequence x tp block)."""
        return self.coord["ring"] == 0 and self.coord["ulysses"] == 0 and self.coord["tp"] == 0

    def sequence_groups(self) -> SequenceParallelGroups:
        c = self.config
        return SequenceParallelGroups(self.groups["ulysses"], c.ulysses, self.groups["ring"], c.ring,
                                      self.coord["ring"], c.attention)


def build_mesh(config: ParallelConfig, rank: int, device: torch.device) -> RankMesh:
    """Build the mesh on an initialised default process group."""
    shape = tuple(getattr(config, a) for a in AXES)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=AXES)
    coord = dict(zip(AXES, mesh.get_coordinate()))
    groups = {a: (mesh.get_group(a) if getattr(config, a) > 1 else None) for a in AXES}
    return RankMesh(config, rank, coord, groups, device)


def single_rank_mesh(config: ParallelConfig, device: torch.device) -> RankMesh:
    """A mesh for a world of one, with no process group (the reference path)."""
    return RankMesh(config, 0, {a: 0 for a in AXES}, {a: None for a in AXES}, device)
