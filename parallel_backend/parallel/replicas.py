"""Batch split over the replica axes: CFG (cond / uncond halves) outer, data parallel inner.

ComfyUI batches [cond x N, uncond x N] together when it can, or calls them one at a time; both
are a batch of B rows, cut into contiguous chunks, one per active replica. When B is smaller than the
replica count (cfg 1.0 on a cfg=2 mesh, or cond and uncond called separately) the spare replicas fold
into the sequence split for that call (runtime/mesh.py), so fewer, wider replicas share the rows and
no rank idles.
"""
from __future__ import annotations


def replica_slice(batch: int, replica_index: int, replicas: int) -> slice:
    """Rows of a batch of `batch` owned by replica `replica_index` of `replicas` (torch.tensor_split rule)."""
    base, extra = divmod(batch, replicas)
    start = replica_index * base + min(replica_index, extra)
    return slice(start, start + base + (1 if replica_index < extra else 0))
