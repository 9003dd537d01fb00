"""Per-rank parameter bytes and peak RSS when loading Wan 14B shapes with tensor parallelism.

    python bench/memory.py                 # tp = 1, 2, 4 on a 2-block Wan 14B-shaped bf16 file
    python bench/memory.py --blocks 3 --tps 1,2

A synthetic safetensors file with the real Wan 2.1 14B shapes (dim 5120, 40 heads, ffn 13824) but
only --blocks blocks is written in bf16 (in a child process, so this parent's RSS stays small),
then loaded with parallel_backend.runtime.sharded_model.ShardedModel in bf16 on tp CPU gloo ranks (CUDA/NCCL ranks
with --device cuda where there are enough GPUs). In each rank:
  baseline   after torch, ComfyUI's model code (the ranks build its WanModel) and the pack are imported and
             the mesh is built;
  peak RSS   resource.getrusage(RUSAGE_SELF).ru_maxrss, as runtime/worker.py reports it, after the load;
  VmHWM      /proc/self/status peak RSS, reset (clear_refs 5) just before the load: the load's own peak;
  anon/file  the largest RssAnon (private memory: the parameters) and RssFile (pages of the mmapped
             checkpoint that safetensors touched; page cache, shared and reclaimable) seen by a 5 ms
             sampler thread during the load.
The delta columns are "peak during load - baseline". params = bytes of the parameters the rank holds
(load_stats["param_bytes"]); "of full" divides by the tp=1 rank's bytes. The last table projects the
per-rank bytes to the real 40-block model from the measured block / non-block split.

Caveat, printed with the table: a spawned child's ru_maxrss starts at its parent's peak (Linux keeps
the peak across fork + exec), so ru_maxrss can never read below the launching process's peak; VmHWM
is per address space and does not have that floor.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from bench._common import header, mib, table, write_fast_checkpoint  # noqa: E402
from parallel_backend.config import ParallelConfig  # noqa: E402
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes  # noqa: E402

PRESET = "wan2.1-14b"


def _status_kb(*fields) -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in fields:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _ru_maxrss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Largest RssAnon / RssFile seen while running (a thread reading /proc/self/status)."""

    def __init__(self, period: float = 0.005):
        self.period, self.max = period, {"RssAnon": 0, "RssFile": 0, "RssTotal": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        s = _status_kb("RssAnon", "RssFile", "RssShmem")
        total = sum(s.values())
        for k, v in (("RssAnon", s.get("RssAnon", 0)), ("RssFile", s.get("RssFile", 0)), ("RssTotal", total)):
            self.max[k] = max(self.max[k], v)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


def _file_ranges(path: str) -> list:
    """Address ranges of this process's mappings of `path` (from /proc/self/maps)."""
    real, out = os.path.realpath(path), []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and os.path.realpath(parts[5]) == real:
                    a, b = (int(v, 16) for v in parts[0].split("-"))
                    out.append((a, b))
    except OSError:
        pass
    return out


def _rank_load(mesh, path: str, precision: str) -> dict:
    """In each rank: baseline after imports, then load and record the memory figures."""
    from safetensors import safe_open  # noqa: F401

    from parallel_backend.models.host import import_host
    from parallel_backend.runtime.sharded_model import ShardedModel

    import_host(mesh.device.type)  # everything the load imports (ComfyUI's model code), so the baseline holds it
    import comfy.ldm.wan.model  # noqa: F401

    gc.collect()
    base = _status_kb("VmRSS", "RssAnon", "RssFile")  # RssFile here: the mapped libraries
    base_peak = _ru_maxrss()
    hwm_reset = _reset_hwm()
    if mesh.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(mesh.device)
    t0 = time.perf_counter()
    with _Sampler() as sampler:
        model = ShardedModel(mesh, path, precision)
    load_s = time.perf_counter() - t0
    after = _status_kb("VmRSS", "RssAnon", "RssFile", "VmHWM")
    params = list(model.model.named_parameters())
    blocks = sum(p.numel() * p.element_size() for n, p in params if n.startswith("blocks."))
    mapped = _file_ranges(path)
    aliased = [p for _, p in params if any(a <= p.data_ptr() < b for a, b in mapped)]
    out = {
        "rank": mesh.rank, "tp_rank": mesh.coord["tp"], "load_s": load_s,
        "param_bytes": model.load_stats["param_bytes"], "bytes_read": model.load_stats["bytes_read"],
        "block_bytes": blocks, "num_blocks": len(model.model.blocks), "num_params": len(params),
        "aliased": len(aliased), "aliased_bytes": sum(p.numel() * p.element_size() for p in aliased),
        "noncontig": sum(not p.is_contiguous() for _, p in params),
        "base_rss": base.get("VmRSS", 0), "base_anon": base.get("RssAnon", 0), "base_file": base.get("RssFile", 0),
        "base_peak": base_peak,
        "peak_rss": _ru_maxrss(), "hwm": after.get("VmHWM", 0) if hwm_reset else None,
        "after_rss": after.get("VmRSS", 0), "after_anon": after.get("RssAnon", 0),
        "max_anon": sampler.max["RssAnon"], "max_file": sampler.max["RssFile"], "max_total": sampler.max["RssTotal"],
        "cuda_peak": torch.cuda.max_memory_allocated(mesh.device) if mesh.device.type == "cuda" else None,
    }
    # Read every parameter once, as the first forward does: pages of a lazily mapped file fault in now.
    with torch.no_grad():
        for _, p in params:
            p.sum()
    touched = _status_kb("VmRSS", "RssAnon", "RssFile")
    out.update(touched_rss=touched.get("VmRSS", 0), touched_anon=touched.get("RssAnon", 0),
               touched_file=touched.get("RssFile", 0), peak_rss_touched=_ru_maxrss())
    del params, aliased
    del model
    gc.collect()
    return out


def _write_file(path: str, blocks: int) -> None:
    write_fast_checkpoint(path, wan_shapes(**{**WAN_PRESETS[PRESET], "num_layers": blocks}), dtype=torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=2, help="blocks in the synthetic file (real model: 40)")
    ap.add_argument("--tps", default="1,2,4", help="tensor-parallel degrees to load with")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto = cuda when there are at least max(tp) GPUs, else cpu/gloo")
    args = ap.parse_args(argv)
    tps = [int(t) for t in args.tps.split(",") if t.strip()]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= max(tps) else "cpu"

    header("Per-rank parameter bytes and RSS at load, Wan 14B shapes, tensor parallel")
    real_layers = WAN_PRESETS[PRESET]["num_layers"]
    import multiprocessing as mp

    from parallel_backend.testing.spmd import run_on_ranks

    results = {}
    with tempfile.TemporaryDirectory(prefix="pdit_bench_mem_") as tmp:
        path = os.path.join(tmp, "wan14b_shapes.safetensors")
        t0 = time.perf_counter()
        p = mp.get_context("spawn").Process(target=_write_file, args=(path, args.blocks))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"writing the synthetic checkpoint failed (exit code {p.exitcode})")
        size = os.path.getsize(path)
        print(f"file: Wan 2.1 14B shapes (dim 5120, 40 heads, ffn 13824), {args.blocks} of {real_layers} blocks, "
              f"bf16, {mib(size)} MiB, written in {time.perf_counter() - t0:.0f} s; loaded in bf16 on {device} ranks")
        parent_peak = _ru_maxrss()
        print(f"this parent's peak RSS before spawning ranks: {mib(parent_peak)} MiB (the floor of the ranks' "
              f"ru_maxrss)\n")
        for tp in tps:
            cfg = ParallelConfig(world_size=tp, tp=tp, device=device, dtype="bf16")
            t0 = time.perf_counter()
            results[tp] = run_on_ranks(_rank_load, cfg, path, "bf16", timeout=1800)
            results[tp][0]["wall_s"] = time.perf_counter() - t0

    if 1 in results:
        full = results[1][0]["param_bytes"]
    else:
        full = tps[0] * results[tps[0]][0]["param_bytes"]
        print("(no tp=1 run: 'of full' divides by tp x the first rank's bytes)")
    rows, rows2 = [], []
    for tp, ranks in results.items():
        for r in ranks:
            delta = r["peak_rss"] - r["base_rss"]
            rows.append([tp, r["rank"], mib(r["param_bytes"]), f"{r['param_bytes'] / full:.3f}", mib(r["bytes_read"]),
                         mib(r["base_rss"]), mib(r["peak_rss"]), mib(delta), f"{delta / r['param_bytes']:.2f}",
                         "" if r["hwm"] is None else mib(r["hwm"] - r["base_rss"]),
                         mib(r["max_anon"] - r["base_anon"]), mib(r["max_file"] - r["base_file"]), f"{r['load_s']:.1f}"]
                        + ([mib(r["cuda_peak"])] if r["cuda_peak"] is not None else []))
            t_delta = r["touched_rss"] - r["base_rss"]
            rows2.append([tp, r["rank"], mib(r["param_bytes"]), mib(t_delta), f"{t_delta / r['param_bytes']:.2f}",
                          mib(r["touched_anon"] - r["base_anon"]), mib(r["touched_file"] - r["base_file"]),
                          mib(r["peak_rss_touched"] - r["base_rss"]),
                          f"{r['aliased']}/{r['num_params']}", mib(r["aliased_bytes"]),
                          f"{r['noncontig']}"])
    cols = ["tp", "rank", "params MiB", "of full", "read MiB", "base RSS", "peak RSS", "load delta", "delta/params",
            "VmHWM delta", "anon delta", "file delta", "load s"]
    if device == "cuda":
        cols.append("cuda peak MiB")
    print(f"[1] At load, per rank (MiB; 'of full' = params / the tp=1 rank's {mib(full)} MiB):")
    print(table(rows, cols))
    print("base RSS: after imports + mesh, before ShardedModel. peak RSS: ru_maxrss after the load (runtime/worker.py's "
          "peak_rss). load delta = peak RSS - base RSS.\nVmHWM delta: the load's own peak (reset before the load) - "
          "base. anon / file delta: largest growth of private RSS / of file-backed RSS (mmapped checkpoint\npages: "
          "page cache, shared between ranks, reclaimable) during the load, sampled every 5 ms.")
    print("\n[2] After reading every parameter once (what the first forward does), per rank (MiB):")
    print(table(rows2, ["tp", "rank", "params MiB", "RSS delta", "delta/params", "anon delta", "file delta",
                        "ru_maxrss delta", "params in file map", "their MiB", "non-contig params"]))
    print("params in file map: parameters whose data lies inside this rank's mmap of the checkpoint (safetensors "
          "returns zero-copy views\nand weights/reads.py's .to() keeps them when dtype and device already match); "
          "their pages count as file RSS only once read.")

    # projection to the real 40-block model
    rows = []
    for tp, ranks in results.items():
        r = ranks[0]
        per_block = r["block_bytes"] / r["num_blocks"]
        other = r["param_bytes"] - r["block_bytes"]
        proj = other + per_block * real_layers
        r1 = results.get(1, [None])[0]
        full_proj = (r1["param_bytes"] - r1["block_bytes"] + r1["block_bytes"] / r1["num_blocks"] * real_layers
                     if r1 else None)
        rows.append([tp, mib(per_block), mib(other), f"{proj / 2**30:.2f}",
                     "" if full_proj is None else f"{proj / full_proj:.3f}",
                     "" if full_proj is None else f"{1 / tp:.3f}"])
    print(f"\n[3] Projection to the real {real_layers}-block Wan 14B, per rank (bf16, as ComfyUI's WanModel holds "
          f"them in bf16):")
    print(table(rows, ["tp", "per block MiB", "non-block MiB", "params GiB", "of full", "ideal 1/tp"]))
    print("Non-block parameters (patch/text/time embeddings, time_projection, head) are replicated on every tp "
          "rank; so are the row-parallel biases, norms and modulation of each block.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
