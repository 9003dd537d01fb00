"""The worker mesh: one DeviceMesh over dp x cfg x pp x ring x ulysses x tp, the groups each layer needs, and the
per-call layouts that keep every rank busy when a call carries fewer rows than there are replicas.

A replica (one (dp, cfg) coordinate) owns a slice of the batch rows. At cfg 1.0 ComfyUI sends one row per call,
and it may call cond and uncond separately at any cfg: then some replicas would own no row and idle. Instead the
idle replicas *fold* into the sequence split for that call: a fold factor f (dividing the replica count R) leaves
R / f active replicas, each spread over f x (ring x ulysses) sequence ranks - with Ulysses when the heads divide
(ulysses x f x tp), with Ring across the folded axis otherwise. Every fold's process groups are built once,
when the mesh is built; a call only picks one (no restart, no group creation while sampling).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ..config import AXES, ParallelConfig, rank_coords
from ..parallel.attention import SequenceParallelGroups
from ..parallel.replicas import replica_slice
from ..planner import fold_for, fold_kind  # which fold a call takes is the planner's choice; the groups are built here

FOLD_KINDS = ("ulysses", "ring")  # which sequence axis the folded replicas join


@dataclass(frozen=True)
class CallLayout:
    """How one call with a given row count is spread: which rows this rank's replica owns, the sequence groups
    it attends over, its chunk of the sequence, and whether it writes the replica's output."""
    fold: int
    kind: str                      # "none", "ulysses" or "ring"
    replicas: int                  # active replicas (R / fold)
    replica_index: int
    groups: SequenceParallelGroups
    sequence_index: int
    is_leader: bool

    def rows(self, batch: int) -> slice:
        return replica_slice(batch, self.replica_index, self.replicas)


@dataclass
class RankMesh:
    """This rank's view of the mesh: its coordinate on each axis and the groups along them."""
    config: ParallelConfig
    rank: int
    coord: dict
    groups: dict  # axis -> ProcessGroup (None for axes of size 1)
    device: torch.device
    folds: dict = field(default_factory=dict)  # (fold, kind) -> CallLayout, built once with the mesh
    weights_mesh: object = None  # a 1-D DeviceMesh of every rank, the blocks' weights are sharded over (or None)

    @property
    def replica_index(self) -> int:
        """Which slice of the batch this rank's (cfg, dp) replica owns: cfg outer, dp inner."""
        return self.coord["cfg"] * self.config.dp + self.coord["dp"]

    @property
    def sequence_index(self) -> int:
        return self.coord["ring"] * self.config.ulysses + self.coord["ulysses"]

    @property
    def is_replica_leader(self) -> bool:
        """The rank that writes its replica's output (first of its sequence x tp block, on the last pipeline stage)."""
        return (self.coord["ring"] == 0 and self.coord["ulysses"] == 0 and self.coord["tp"] == 0
                and self.coord["pp"] == self.config.pp - 1)

    def sequence_groups(self) -> SequenceParallelGroups:
        c = self.config
        return SequenceParallelGroups(self.groups["ulysses"], c.ulysses, self.groups["ring"], c.ring,
                                      self.coord["ring"], c.attention)

    def base_layout(self) -> CallLayout:
        return CallLayout(1, "none", self.config.replica_degree, self.replica_index, self.sequence_groups(),
                          self.sequence_index, self.is_replica_leader)

    @property
    def max_sequence_degree(self) -> int:
        """The widest sequence split any call can use (the base one, or the widest fold)."""
        return max([self.config.sequence_degree] + [l.groups.degree for l in self.folds.values()])

    def layout_for(self, batch: int, heads: int, fold: int | None = None) -> CallLayout:
        """The layout for a call of `batch` rows on a model with `heads` attention heads: the base mesh when every
        replica has a row, else the smallest fold that gives each active replica at least one row. `fold`: the
        owner's choice for this call instead (planner.choose_fold: a smaller fold, or none, leaves replicas without
        a row idle when the wider sequence split is predicted slower)."""
        c = self.config
        fold = fold_for(batch, c.replica_degree) if fold is None else fold
        if fold == 1:
            return self.base_layout()
        return self.folds[(fold, fold_kind(c, fold, heads))]


def _coords(config: ParallelConfig, rank: int) -> dict:
    return rank_coords(config, rank)


def _build_folds(config: ParallelConfig, rank: int, base: dict) -> dict:
    """Every fold layout of this rank. All ranks create every group in the same order (new_group is collective).

    Replicas are numbered in mesh order, q = dp * cfg_degree + cfg; fold f splits q = a * f + b: a is the active
    replica, b joins the sequence. Group ranks are ascending global ranks, which orders members by (b, ulysses) in
    a Ulysses fold and by (b, ring) in a Ring fold, so the sequence chunk index is b * ulysses + u (resp.
    (b * ring + r) * ulysses + u) and all-to-all / ring steps see the chunks in order."""
    c = config
    R = c.replica_degree
    if R == 1 or c.world_size == 1:
        return {}
    layouts = {}
    coords = [_coords(c, g) for g in range(c.world_size)]
    q_of = [co["dp"] * c.cfg + co["cfg"] for co in coords]
    me = coords[rank]
    for fold in (f for f in range(2, R + 1) if R % f == 0):
        a, b = divmod(q_of[rank], fold)
        for kind in FOLD_KINDS:
            if kind == "ulysses":
                key = lambda g: (q_of[g] // fold, coords[g]["pp"], coords[g]["ring"], coords[g]["tp"])
            else:
                key = lambda g: (q_of[g] // fold, coords[g]["pp"], coords[g]["ulysses"], coords[g]["tp"])
            members = {}
            for g in range(c.world_size):
                members.setdefault(key(g), []).append(g)
            mine = None
            for k in sorted(members):
                pg = dist.new_group(sorted(members[k]))
                if rank in members[k]:
                    mine = pg
            if kind == "ulysses":
                u_deg, u_idx = c.ulysses * fold, b * c.ulysses + me["ulysses"]
                groups = SequenceParallelGroups(mine, u_deg, base["ring"], c.ring, me["ring"], c.attention)
                seq_index = me["ring"] * u_deg + u_idx
            else:
                r_deg, r_idx = c.ring * fold, b * c.ring + me["ring"]
                groups = SequenceParallelGroups(base["ulysses"], c.ulysses, mine, r_deg, r_idx, c.attention)
                seq_index = r_idx * c.ulysses + me["ulysses"]
            leader = b == 0 and me["ring"] == 0 and me["ulysses"] == 0 and me["tp"] == 0 and me["pp"] == c.pp - 1
            layouts[(fold, kind)] = CallLayout(fold, kind, R // fold, a, groups, seq_index, leader)
    return layouts


def build_mesh(config: ParallelConfig, rank: int, device: torch.device) -> RankMesh:
    """Build the mesh (and every fold's groups) on an initialised default process group."""
    shape = tuple(getattr(config, a) for a in AXES)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=AXES)
    coord = dict(zip(AXES, mesh.get_coordinate()))
    groups = {a: (mesh.get_group(a) if getattr(config, a) > 1 else None) for a in AXES}
    folds = _build_folds(config, rank, groups)
    weights_mesh = None
    if config.shard_weights:  # every rank, whatever its replica: all of them run every block of a call
        weights_mesh = init_device_mesh(device.type, (config.world_size,), mesh_dim_names=("weights",))
    return RankMesh(config, rank, coord, groups, device, folds, weights_mesh)


def single_rank_mesh(config: ParallelConfig, device: torch.device) -> RankMesh:
    """A mesh for a world of one, with no process group (the reference path)."""
    return RankMesh(config, 0, {a: 0 for a in AXES}, {a: None for a in AXES}, device)
