"""Batch split over the replica axes: CFG (cond / uncond halves) outer, data parallel inner.

ComfyUI batches [cond x N, uncond x N] together when it can, or calls them one at a time; both
are a batch of B rows, cut into cfg x dp contiguous chunks. A replica whose chunk is empty (batch
smaller than the replica count, e.g. cfg == 1.0 on a cfg=2 mesh) idles for that call, which keeps
every call correct whatever ComfyUI batches.
"""
from __future__ import annotations


def replica_slice(batch: int, replica_index: int, replicas: int) -> slice:
    """Rows of a batch of `batch` owned by replica `replica_index` of `replicas` (torch.tensor_split rule)."""
    base, extra = divmod(batch, replicas)
    start = replica_index * base + min(replica_index, extra)
    return slice(start, start + base + (1 if replica_index < extra else 0))
