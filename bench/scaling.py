"""Step time of one forward for each mesh, on CPU gloo ranks (or CUDA ranks where there are GPUs).

    python bench/scaling.py [--preset wan2.1-1.3b] [--blocks 2] [--latent 2,16,3,30,52] [--meshes ...]

CPU figures from a small machine say how much each axis costs in communication and bookkeeping,
not what GPUs gain: with 2 cores, 2 ranks already share the cores and 4 ranks oversubscribe them
(so each rank gets cores // world threads, and world 1 gets all). Multi-GPU speed-ups come only
from real multi-GPU runs (see README for the published anchors).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from _common import header, table, write_fast_checkpoint

from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes

MESHES = ["1", "ulysses=2", "ring=2", "tp=2", "cfg=2", "cfg=2,ulysses=2", "ulysses=2,tp=2", "ring=2,ulysses=2"]


def _parse(mesh: str) -> dict:
    if mesh == "1":
        return {}
    return {k: int(v) for k, v in (p.split("=") for p in mesh.split(","))}


def _rank_fn(mesh, path, dtype, shape, text_dim, repeats):
    import torch.distributed as dist
    m = ShardedModel(mesh, path, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    t = torch.full((shape[0],), 700.0)
    ctx = torch.randn(shape[0], 512, text_dim, generator=g)
    m.forward_rows(x, t, ctx)  # warm-up
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        m.forward_rows(x, t, ctx)
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--latent", default="2,16,3,30,52", help="B,C,T,H,W (batch 2 = cond + uncond)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--meshes", default=";".join(MESHES), help="';'-separated, e.g. 'ulysses=2;cfg=2,tp=2'")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    header(f"scaling: one forward per mesh ({args.device} ranks)")
    cfg = dict(WAN_PRESETS[args.preset], num_layers=args.blocks)
    shape = tuple(int(v) for v in args.latent.split(","))
    rows, base = [], None
    with tempfile.TemporaryDirectory(prefix="pdit_bench_") as tmp:
        path = write_fast_checkpoint(os.path.join(tmp, "model.safetensors"), wan_shapes(**cfg))
        for mesh in args.meshes.split(";"):
            degrees = _parse(mesh)
            world = 1
            for d in degrees.values():
                world *= d
            config = ParallelConfig(world_size=world, device=args.device, dtype=args.dtype, **degrees)
            per_rank = run_on_ranks(_rank_fn, config, path, args.dtype, shape, cfg["text_dim"], args.repeats,
                                    timeout=1800)
            step = max(per_rank)
            base = base or step
            rows.append([mesh, world, f"{step * 1e3:.0f}", f"{base / step:.2f}x"])
            print(f"  {mesh}: {step * 1e3:.0f} ms", flush=True)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    print(f"model: {args.preset} width, {args.blocks} blocks, {args.dtype}; latent {shape} = {tokens} tokens "
          f"x batch {shape[0]}; median of {args.repeats}; {os.cpu_count()} cores shared by all ranks")
    print(table(rows, ["mesh", "ranks", "ms / forward", "vs 1 rank"]))


if __name__ == "__main__":
    main()
