"""Run one function on N ranks (gloo on CPU) and collect the results: for tests and bench/.

This is not the WorkerGroup (no persistence, no shared memory): it is the plain SPMD harness
that parity tests and benchmarks use to compare a mesh against a single-process reference.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import ParallelConfig


def _entry(rank, fn, config, store_path, args, queue):
    from ..runtime.mesh import build_mesh
    from ..runtime.rendezvous import init_process_group

    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
        device = init_process_group(config, rank, store_path)
        mesh = build_mesh(config, rank, device)
        result = fn(mesh, *args)
        # Plain pickle copies tensor data into the message. torch's queue reducer would send a file
        # descriptor served by this process, which is gone if it exits before the parent reads it.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context(config: ParallelConfig):
    """Ranks forked from one forkserver per process that has already imported torch (and, for CPU ranks on a machine
    without CUDA, ComfyUI's model code): a rank then starts in a fraction of a second instead of re-importing them,
    which on 2 cores was most of a small parity test's time. Each rank is still a fresh child of that server, never of
    a process that ran a test. With CUDA the server imports torch only (ComfyUI probes the device at import)."""
    ctx = mp.get_context("forkserver")
    if not _PRELOADED:
        cpu_only = config.device == "cpu" and not torch.cuda.is_available()
        _PRELOADED.append("parallel_backend.testing.spmd_preload" if cpu_only else "torch.distributed")
        ctx.set_forkserver_preload(list(_PRELOADED))
    return ctx


_PRELOADED: list = []


def run_on_ranks(fn, config: ParallelConfig, *args, timeout: float = 300.0) -> list:
    """Call `fn(rank_mesh, *args)` on every rank of `config`; return the per-rank results."""
    ctx = _context(config)
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="pdit_spmd_") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, fn, config, store_path, args, queue), daemon=True)
                 for r in range(config.world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        deadline = time.monotonic() + timeout
        try:
            while len(results) < len(procs) and not errors:
                try:
                    rank, status, payload = queue.get(timeout=0.2)
                except queue_mod.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead:
                        errors.append(f"rank {dead[0][0]} died with exit code {dead[0][1]} before reporting")
                    elif time.monotonic() > deadline:
                        errors.append(f"ranks did not finish within {timeout:.0f} s")
                    continue
                if status == "ok":
                    results[rank] = pickle.loads(payload)
                else:
                    errors.append(f"rank {rank}:\n{payload}")
        finally:
            for p in procs:
                p.join(timeout=10 if not errors else 1)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(config.world_size)]
