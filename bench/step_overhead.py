"""Per-step overhead of the pack: one model evaluation through a world-size-1 WorkerGroup (shared
memory in and out, control pipe, a second process) against the same ShardedModel called in-process.

    python bench/step_overhead.py [--device cpu|cuda] [--preset wan2.1-1.3b] [--blocks 2]
                                  [--latents "1,16,3,16,16;2,16,3,30,52"] [--dtype bf16] [--repeats 5]

Prints median seconds per step for both and their ratio (goal <= 1.01 at realistic sizes: the hop
costs milliseconds, a real step costs seconds). On CPU the figures are CPU figures.
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
from parallel_backend.runtime.group import WorkerGroup
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes


def _once(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _timed_pair(a, b, repeats):
    """Medians of a and b, measured alternately so load drift hits both alike."""
    a(), b()  # warm-up (allocations, kernels, first shm mapping)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_once(a))
        tb.append(_once(b))
    return statistics.median(ta), statistics.median(tb)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks in the synthetic file")
    ap.add_argument("--latents", default="1,16,3,16,16;2,16,3,30,52",
                    help="latent shapes B,C,T,H,W separated by ';' (batch 2 = cond + uncond)")
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    header("per-step overhead: WorkerGroup (world size 1) vs in-process model")
    cfg = dict(WAN_PRESETS[args.preset], num_layers=args.blocks)
    threads = torch.get_num_threads()
    config = ParallelConfig(world_size=1, device=args.device, dtype=args.dtype, threads_per_rank=threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdit_bench_") as tmp:
        path = write_fast_checkpoint(os.path.join(tmp, "model.safetensors"), wan_shapes(**cfg))
        device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        local = ShardedModel(single_rank_mesh(config, device), path, args.dtype)
        group = WorkerGroup(config).start()
        try:
            group.load(path, args.dtype)
            for spec in args.latents.split(";"):
                shape = tuple(int(v) for v in spec.split(","))
                x = torch.randn(shape)
                t = torch.full((shape[0],), 700.0)
                ctx = torch.randn(shape[0], 512, cfg["text_dim"])
                tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
                in_proc, via_group = _timed_pair(lambda: local.forward_rows(x, t, ctx).cpu(),
                                                 lambda: group.forward(x, t, ctx), args.repeats)
                rows.append([f"{shape}", tokens, f"{in_proc * 1e3:.1f}", f"{via_group * 1e3:.1f}",
                             f"{(via_group - in_proc) * 1e3:+.1f}", f"{via_group / in_proc:.3f}"])
        finally:
            group.stop()
    print(f"model: {args.preset} width, {args.blocks} blocks, {args.dtype}, device {args.device}, "
          f"{threads} torch threads in both; context 512 tokens; median of {args.repeats}")
    print(table(rows, ["latent", "tokens", "in-process ms", "via group ms", "overhead ms", "ratio"]))


if __name__ == "__main__":
    main()
