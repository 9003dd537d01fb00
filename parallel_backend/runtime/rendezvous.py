"""Rendezvous: how the ranks of one group find each other and pick their devices.

One machine: a FileStore in the group's private temporary directory (no network listener; the directory
is removed with the group). gloo on CPU keeps its connections on loopback.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import ParallelConfig


def pick_device(kind: str, index: int) -> torch.device:
    """This rank's device: CUDA device `index` made current (before ComfyUI is imported: models/host.py says why),
    or the CPU."""
    if kind != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def init_process_group(config: ParallelConfig, rank: int, store_path: str) -> torch.device:
    """Join the group through a FileStore (no network listener) and pick this rank's device."""
    if config.device == "cuda":
        device = pick_device("cuda", config.device_index(rank))
        backend = "nccl"
    else:
        device = pick_device("cpu", rank)
        backend = "gloo"
        # gloo connects ranks over TCP: keep it on loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(store_path, config.world_size)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=config.world_size, **kwargs)
    return device
