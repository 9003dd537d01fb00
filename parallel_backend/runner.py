"""One rank's sharded model: build from a checkpoint, apply the family's plan, run its replica's rows."""
from __future__ import annotations

import os

import torch

from .cfg import replica_slice
from .config import validate_for_model
from .loading import DTYPE_NAMES, load_sharded, read_header
from .mesh import RankMesh
from .models import detect_family
from .parallelize import SequenceState, apply_sequence_parallel, apply_tensor_parallel


class ShardedModel:
    def __init__(self, mesh: RankMesh, path: str, precision: str | None = None):
        self.mesh, self.path = mesh, path
        self.precision = precision or mesh.config.dtype
        header = read_header(path)
        self.family = detect_family(header, path)
        self.shape = self.family.model_shape(header)
        validate_for_model(mesh.config, self.shape)
        self.dtype = DTYPE_NAMES[self.precision]
        fam, plan, c = self.family, self.family.PLAN, mesh.config
        model = fam.build(fam.diffusers_config(header), device=mesh.device)
        apply_tensor_parallel(model, plan, mesh.groups["tp"], mesh.coord["tp"], c.tp)
        self.seq_state = SequenceState(mesh.sequence_groups(), mesh.sequence_index)
        apply_sequence_parallel(model, plan, self.seq_state)
        fam.install_attention(model, self.seq_state, c.attention)
        self.load_stats = load_sharded(model, path, fam.key_map(header.keys()), self.dtype, mesh.device,
                                       keep_fp32=fam.keep_fp32)
        self.model = model.eval().requires_grad_(False)

    def info(self) -> dict:
        s = self.shape
        return {"family": s.family, "num_heads": s.num_heads, "head_dim": s.head_dim, "ffn_dim": s.ffn_dim,
                "num_layers": s.num_layers, "in_channels": s.in_channels, "out_channels": s.out_channels,
                "patch_size": tuple(s.patch_size), "path": self.path, "precision": self.precision,
                **self.load_stats}

    def rows(self, batch: int) -> slice:
        return replica_slice(batch, self.mesh.replica_index, self.mesh.config.replica_degree)

    @torch.no_grad()
    def forward_rows(self, x, timestep, context, **extras) -> torch.Tensor | None:
        """Run this replica's rows of the batch; None when it owns none."""
        rows = self.rows(x.shape[0])
        if rows.start == rows.stop:
            return None
        dev, dt = self.mesh.device, self.dtype
        take = lambda t: None if t is None else t[rows].to(dev, dt if t.is_floating_point() else t.dtype)
        kw = {k: take(v) for k, v in extras.items()}
        out = self.family.forward(self.model, take(x), timestep[rows].to(dev, torch.float32), take(context), **kw)
        return out.float()
