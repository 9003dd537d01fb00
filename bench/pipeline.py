"""Pipeline stages: step time vs one rank and vs Ulysses on the same ranks, and the bubble for 1, 2 and 4 micro-batches.

    python bench/pipeline.py                       # Wan 1.3B width, 4 blocks, CPU ranks
    python bench/pipeline.py --blocks 8 --latent 16,3,30,52 --device cuda

Rows (same file, same latent; the batch is the number of micro-batches: rows run one by one through the stages):
  native      ComfyUI's own WanModel forward in this process (the reference every pack row is divided by)
  1 rank      the pack at world 1
  ulysses=2   both ranks on every row, the sequence split
  pp=2        two stages, each half the blocks; rows in flight together
For pp the bubble is measured on each stage as 1 - (time inside its own blocks) / (wall time of the call), and
printed beside GPipe's (P - 1) / (M + P - 1). CPU figures: 2 ranks share the machine's cores, so they say what the
schedule costs, not what GPUs gain; pp's use is fitting a model on cards of different sizes, not speed on equal
cards (Ulysses splits every block's work, pp only hands it on).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from bench._common import header, import_comfy, table, write_fast_checkpoint  # noqa: E402
from parallel_backend.config import ParallelConfig  # noqa: E402
from parallel_backend.parallel.pipeline import bubble_fraction  # noqa: E402
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes  # noqa: E402

MICRO_BATCHES = (1, 2, 4)


def _inputs(batch, latent, text_dim):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, *latent, generator=g), torch.full((batch,), 700.0),
            torch.randn(batch, 64, text_dim, generator=g))


def _rank_fn(mesh, path, latent, text_dim, repeats, batches):
    import torch.distributed as dist

    from parallel_backend.parallel.pipeline import SkippedBlock
    from parallel_backend.runtime.sharded_model import ShardedModel

    m = ShardedModel(mesh, path, "fp32")
    busy = {"s": 0.0}
    own = [b for b in m.model.blocks if not isinstance(b, SkippedBlock)]
    starts = {}
    for i, b in enumerate(own):  # time inside this rank's own blocks (excluding a stage's wait for its input)
        b.register_forward_pre_hook(lambda mod, a, i=i: starts.__setitem__(i, time.perf_counter()), prepend=False)
        b.register_forward_hook(lambda mod, a, o, i=i: busy.__setitem__("s", busy["s"] + time.perf_counter()
                                                                        - starts[i]))
    out = {}
    for batch in batches:
        x, t, ctx = _inputs(batch, latent, text_dim)
        m.forward_rows(x, t, ctx)  # warm-up
        walls, idle = [], []
        for _ in range(repeats):
            if dist.is_initialized():
                dist.barrier()
            busy["s"] = 0.0
            t0 = time.perf_counter()
            m.forward_rows(x, t, ctx)
            wall = time.perf_counter() - t0
            if dist.is_initialized():
                dist.barrier()
            walls.append(wall)
            idle.append(1 - busy["s"] / wall)
        out[batch] = (statistics.median(walls), statistics.median(idle))
    return out


def _native(path, latent, text_dim, repeats, batches):
    import_comfy()
    import comfy.sd

    model = comfy.sd.load_diffusion_model(path).model.diffusion_model
    out = {}
    with torch.no_grad():
        for batch in batches:
            x, t, ctx = _inputs(batch, latent, text_dim)
            model(x, t, ctx)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x, t, ctx)
                times.append(time.perf_counter() - t0)
            out[batch] = statistics.median(times)
    return out


def main(argv=None):
    from parallel_backend.testing.spmd import run_on_ranks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--latent", default="16,2,16,16", help="C,T,H,W of one row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batches", default=",".join(map(str, MICRO_BATCHES)))
    args = ap.parse_args(argv)
    header(f"pipeline stages vs one rank and Ulysses ({args.device} ranks)")
    cfg = dict(WAN_PRESETS[args.preset], num_layers=args.blocks)
    latent = tuple(int(v) for v in args.latent.split(","))
    batches = tuple(int(v) for v in args.micro_batches.split(","))
    with tempfile.TemporaryDirectory(prefix="pdit_bench_") as tmp:
        path = write_fast_checkpoint(os.path.join(tmp, "model.safetensors"), wan_shapes(**cfg))
        native = _native(path, latent, cfg["text_dim"], args.repeats, batches)
        runs = {}
        for name, degrees in (("1 rank", {}), ("ulysses=2", dict(ulysses=2)), ("pp=2", dict(pp=2))):
            world = 2 if degrees else 1
            config = ParallelConfig(world_size=world, device=args.device, dtype="fp32", **degrees)
            per_rank = run_on_ranks(_rank_fn, config, path, latent, cfg["text_dim"], args.repeats, batches,
                                    timeout=1800)
            runs[name] = per_rank
            print(f"  {name} done", flush=True)
    rows = []
    for batch in batches:
        rows.append(["native ComfyUI", batch, f"{native[batch] * 1e3:.0f}", "1.00x", "", ""])
        for name, per_rank in runs.items():
            wall = max(r[batch][0] for r in per_rank)
            bubble = ""
            expected = ""
            if name == "pp=2":
                bubble = " / ".join(f"{r[batch][1]:.2f}" for r in per_rank)
                expected = f"{bubble_fraction(2, batch):.2f}"
            rows.append([name, batch, f"{wall * 1e3:.0f}", f"{native[batch] / wall:.2f}x", bubble, expected])
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    print(f"model: {args.preset} width, {args.blocks} blocks, fp32; one row = latent {latent} = {tokens} tokens; "
          f"micro-batches = rows per call; median of {args.repeats}; {os.cpu_count()} cores shared by all ranks")
    print(table(rows, ["run", "micro-batches", "ms / call", "speed vs native", "pp idle share (stage 0 / 1)",
                       "GPipe (P-1)/(M+P-1)"]))
    print("idle share: 1 - time inside the stage's own blocks / wall time of the call (stage 0 waits at the end, "
          "stage 1 at the start); embeddings and head run on every stage and count as idle here.")


if __name__ == "__main__":
    main()
