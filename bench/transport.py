"""Round trip of a latent batch between the host (ComfyUI) process and a child process.

    python bench/transport.py                  # Wan 720p 81 frames: 2 x 16 x 21 x 90 x 160 fp32 (38.7 MB)
    python bench/transport.py --repeats 50 --shape 2,16,21,60,104

What is timed, per round trip (median of --repeats after --warmup untimed ones):
  (a) shm    parallel_backend.runtime.transport: the parent writes x into a ShmTensorSlot ("in"), lays out
             an output slot ("out") and sends both TensorRef descriptors over a Pipe; the child maps
             the segments with ShmReader, writes its result (x itself: an identity "model") into the
             output slot and answers; the parent reads the output with ShmTensorSlot.read (a copy,
             as WorkerGroup.forward does). 3 copies of the batch + 2 small pipe messages.
  (b) memcpy the same bytes inside one process, no IPC: one copy, and the same three copies
             (into a preallocated "in" buffer, "in" -> "out", clone of "out"): the memory-bandwidth floor.
  (c) pickle multiprocessing.Queue (spawn context) carrying x.numpy(): pickled by value, through a pipe,
             unpickled in the child, which puts its result (the received array) back the same way.
  (c2) torch torch.multiprocessing.Queue carrying a fresh tensor each way (a sampler's x is new every
             step; the child returns a new output tensor): torch moves each tensor's storage into a new
             shared-memory block (one copy) and passes a file descriptor.
  (e) cuda   only where CUDA is present: host -> GPU -> host copy of the batch in one process, from
             pageable and from pinned memory (what a rank adds after the shm hop).
The WorkerGroup forward's own overhead (control pipe to every rank, collectives) is out of scope here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from bench._common import header, table  # noqa: E402

DEFAULT_SHAPE = (2, 16, 21, 90, 160)  # cond + uncond, Wan latent channels, 81 frames at 1280 x 720


# ---- child processes (module level: spawn imports them by name) ---------------------------------

def _shm_child(conn) -> None:
    from parallel_backend.runtime.transport import ShmReader

    torch.set_num_threads(1)
    reader = ShmReader()
    while True:
        msg = conn.recv()
        if msg is None:
            break
        x_ref, out_ref = msg
        reader.view(out_ref).copy_(reader.view(x_ref))
        conn.send("ok")
    reader.close()
    conn.send("bye")


def _queue_child(q_in, q_out) -> None:
    while True:
        a = q_in.get()
        if a is None:
            break
        q_out.put(a)


def _torch_queue_child(q_in, q_out) -> None:
    torch.set_num_threads(1)
    while True:
        t = q_in.get()
        if t is None:
            break
        q_out.put(t.clone())  # the "model" output: a new tensor in the child's own memory
        del t


# ---- timed paths --------------------------------------------------------------------------------

def _timed(fn, repeats: int, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_shm(x: torch.Tensor, repeats: int, warmup: int) -> tuple[list, bool]:
    import multiprocessing as mp
    from multiprocessing import resource_tracker

    from parallel_backend.runtime.transport import ShmTensorSlot

    resource_tracker.ensure_running()  # as WorkerGroup does: the child shares the parent's tracker
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    p = ctx.Process(target=_shm_child, args=(child,), daemon=True)
    p.start()
    child.close()
    slot_in, slot_out = ShmTensorSlot("in", x.nbytes), ShmTensorSlot("out", x.nbytes)
    result = {}

    def trip():
        refs = slot_in.write({"x": x})
        out_ref = slot_out.layout({"out": (x.shape, x.dtype)})["out"]
        parent.send((refs["x"], out_ref))
        assert parent.recv() == "ok"
        result["y"] = slot_out.read(out_ref)

    try:
        times = _timed(trip, repeats, warmup)
        ok = torch.equal(result.pop("y"), x)
        parent.send(None)
        parent.recv()
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
        slot_in.close()
        slot_out.close()
    return times, ok


def bench_memcpy(x: torch.Tensor, repeats: int, warmup: int) -> tuple[list, list]:
    buf_in, buf_out, one = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

    def copy1():
        one.copy_(x)

    def copy3():
        buf_in.copy_(x)
        buf_out.copy_(buf_in)
        return buf_out.clone()

    return _timed(copy1, repeats, warmup), _timed(copy3, repeats, warmup)


def bench_pickle_queue(x: torch.Tensor, repeats: int, warmup: int) -> tuple[list, bool]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_queue_child, args=(q_in, q_out), daemon=True)
    p.start()
    arr = x.numpy()
    result = {}

    def trip():
        q_in.put(arr)
        result["y"] = torch.from_numpy(q_out.get())

    try:
        times = _timed(trip, repeats, warmup)
        ok = torch.equal(result.pop("y"), x)
        q_in.put(None)
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return times, ok


def bench_torch_queue(x: torch.Tensor, repeats: int, warmup: int) -> tuple[list, bool]:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_torch_queue_child, args=(q_in, q_out), daemon=True)
    p.start()
    times, y = [], None
    try:
        for i in range(warmup + repeats):
            fresh = x.clone()  # a new tensor each step, made outside the timed part
            t0 = time.perf_counter()
            q_in.put(fresh)
            y = q_out.get()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
            del fresh
        ok = torch.equal(y, x)
        del y
        q_in.put(None)
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return times, ok


def bench_cuda(x: torch.Tensor, repeats: int, warmup: int) -> dict:
    pinned = x.pin_memory()
    back = torch.empty_like(x).pin_memory()
    out = {}

    def pageable():
        torch.cuda.synchronize()
        g = x.to("cuda")
        x.copy_(g.cpu())
        torch.cuda.synchronize()

    def pinned_trip():
        g = pinned.to("cuda", non_blocking=True)
        back.copy_(g, non_blocking=True)
        torch.cuda.synchronize()

    out["pageable"] = _timed(pageable, repeats, warmup)
    out["pinned"] = _timed(pinned_trip, repeats, warmup)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)), help="latent batch shape (fp32)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of paths to skip: shm,memcpy,pickle,torchq,cuda")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    header("Host <-> child round trip of a latent batch: shared-memory slots vs copies vs queues")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mb = x.nbytes / 1e6
    print(f"batch: {tuple(shape)} fp32 = {mb:.1f} MB each way; median of {args.repeats} round trips after "
          f"{args.warmup} warm-up ones; torch threads in the parent: {torch.get_num_threads()}\n")

    rows, res = [], {}
    if "memcpy" not in skip:
        res["copy1"], res["copy3"] = bench_memcpy(x, args.repeats, args.warmup)
    if "shm" not in skip:
        res["shm"], ok = bench_shm(x, args.repeats, args.warmup)
        assert ok, "shm round trip returned different bytes"
    if "pickle" not in skip:
        res["pickle"], ok = bench_pickle_queue(x, args.repeats, args.warmup)
        assert ok, "pickling queue returned different bytes"
    if "torchq" not in skip:
        res["torchq"], ok = bench_torch_queue(x, args.repeats, args.warmup)
        assert ok, "torch queue returned different bytes"
    if "cuda" not in skip and torch.cuda.is_available():
        c = bench_cuda(x, args.repeats, args.warmup)
        res["cuda_pageable"], res["cuda_pinned"] = c["pageable"], c["pinned"]

    # key -> (label, copies of the batch it makes, times the batch crosses: 2 for a round trip)
    labels = {
        "shm": ("(a) ShmTensorSlot + ShmReader, child writes out slot", 3),
        "copy1": ("(b) in-process memcpy, 1 copy", 1),
        "copy3": ("(b) in-process memcpy, the same 3 copies as (a)", 3),
        "pickle": ("(c) multiprocessing.Queue, pickled ndarray both ways", None),
        "torchq": ("(c2) torch.multiprocessing.Queue, fresh tensor both ways", None),
        "cuda_pageable": ("(e) H2D + D2H, pageable host memory", None),
        "cuda_pinned": ("(e) H2D + D2H, pinned host memory", None),
    }
    med = {k: statistics.median(v) for k, v in res.items()}
    for key, (label, copies) in labels.items():
        if key not in med:
            continue
        m = med[key]
        rows.append([label, f"{1e3 * m:.1f}", f"{1e3 * min(res[key]):.1f}", f"{1e3 * max(res[key]):.1f}",
                     f"{(1 if key == 'copy1' else 2) * x.nbytes / m / 1e9:.2f}",
                     f"{m / med['copy1']:.1f}x" if "copy1" in med else "",
                     f"{m / med['shm']:.2f}x" if "shm" in med else "",
                     "" if copies is None else str(copies)])
    print(table(rows, ["path", "median ms", "min ms", "max ms", "GB/s", "vs 1 copy", "vs shm",
                       "copies"], "lrrrrrrr"))
    if "shm" in med and "copy3" in med:
        print(f"\nshm IPC overhead over the same copies in one process: {1e3 * (med['shm'] - med['copy3']):+.1f} ms "
              f"per round trip ({med['shm'] / med['copy3']:.2f}x)")
    if "pickle" in med and "shm" in med:
        print(f"pickling queue / shm: {med['pickle'] / med['shm']:.1f}x slower")
    print("GB/s: batch bytes carried / median time (the batch once for the single copy, twice for a round trip).\n"
          "(d) WorkerGroup.forward's own overhead (control pipe to every rank, collectives) is not measured here.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
