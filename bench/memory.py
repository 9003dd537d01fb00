"""Per-rank parameter bytes and peak RSS when loading Wan 14B shapes: tensor parallel, sharded weights, GGUF / fp8.

    python bench/memory.py                   # tp1/tp2/tp4 + sharded x2/x4, bf16 and Q8_0, on a 1-block file
    python bench/memory.py --blocks 2 --tps 1,2 --shards '' --gguf ''   # the old tp-only rows
    python bench/memory.py --modes tp2,shard2 --gguf Q8_0,Q4_K --fp8
    python bench/memory.py --blocks 3 --modes shard2 --gguf ''      # the forward's steady state under prefetch
    python bench/memory.py --family ltxv --modes tp1,tp2,shard2 --fp8   # another family: its largest release

Another --family (kandinsky5, ltxv, ltxav, minimax, hunyuan_video, cosmos, cosmos1: FAMILIES, each written in
its write_tiny_<family> layout) prints tables [1k] / [2k] only: --blocks of each block list at the real widths,
the rest at its real size, projected to the real block counts (LTX-2 and MiniMax H3 load without the forward).

A synthetic safetensors file with the real Wan 2.1 14B shapes (dim 5120, 40 heads, ffn 13824) but
only --blocks blocks is written in bf16 (in a child process, so this parent's RSS stays small); --gguf
types are converted from it with testing.gguf_files.write_gguf_dit (city96's layout and per-tensor rule)
and --fp8 writes a plain fp8 e4m3fn copy (testing.synthetic.write_fp8_variant), both in children too.
Each file is loaded with parallel_backend.runtime.sharded_model.ShardedModel in bf16 on every --modes
mode (--gguf-modes for the converted files), on CPU gloo ranks (CUDA/NCCL ranks with --device cuda where there
are enough GPUs); one spawn per mode, whose ranks load its files in turn:
  tpN      tensor parallel over N ranks (ParallelConfig(tp=N));
  shardN   sharded weights over N ranks (ParallelConfig(shard_weights=True, ulysses=N): each rank holds
           1/N of every block's rows, FSDP2; the ulysses axis only gives the N ranks work and holds no weights).
In each rank:
  baseline   after torch, ComfyUI's model code (the ranks build its WanModel) and the pack are imported and
             the mesh is built;
  peak RSS   resource.getrusage(RUSAGE_SELF).ru_maxrss, as runtime/rank.py reports it, after the load;
  VmHWM      /proc/self/status peak RSS, reset (clear_refs 5) just before the load: the load's own peak;
  anon/file  the largest RssAnon (private memory: the parameters) and RssFile (pages of the mmapped
             checkpoint that safetensors touched; page cache, shared and reclaimable) seen by a 5 ms
             sampler thread during the load;
  forward    VmHWM (reset just before) - RSS before one tiny forward (8 tokens, 8 text tokens): what a
             forward holds on top of the weights besides activations -- the gathered blocks under sharded
             weights, the per-call dequantized / cast layer of GGUF and fp8 files.
The delta columns are "peak during load - baseline". params = bytes of the parameters the rank holds
(info()["param_bytes"]: a sharded block counts its local rows only); "of full" divides by the tp1 rank's
bytes of the same file. Table [3] projects the measured per-rank bytes to the real 40-block model from the
measured block / non-block split; table [4] is ANALYTIC for every format and mode (the real 40-block shapes,
tensor by tensor: quantized_bytes for GGUF types, the Wan TP plan's splits, FSDP's ceil(rows / N) rows), checked
against [3] where a mode was measured; table [5] adds the forward transient and says what fits 16 / 24 / 80 GB.

Caveat, printed with the table: a spawned child's ru_maxrss starts at its parent's peak (Linux keeps
the peak across fork + exec), so ru_maxrss can never read below the launching process's peak; VmHWM
is per address space and does not have that floor.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from bench._common import WEIGHT_FORMATS, header, mib, table, wan_file_header, write_fast_checkpoint  # noqa: E402
from parallel_backend.config import ParallelConfig  # noqa: E402
from parallel_backend.testing import synthetic as syn  # noqa: E402
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes  # noqa: E402
from parallel_backend.weights.reads import held_bytes, read_header  # noqa: E402

PRESET = "wan2.1-14b"  # the default; --preset tiny / wan2.1-1.3b for a quick run (the tests')
PRESETS = ("tiny", "wan2.1-1.3b", "wan2.1-14b")
CARDS_GIB = (16, 24, 80)


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


FWD_TOKENS, FWD_CTX = 8, 8  # the tiny forward: a 1 x 2 x 4 patch grid (8 tokens), 8 text tokens
WAN_FWD = (4096, {})  # the tiny forward's (text width, {extra input: shape}): Wan's umt5 width, no other input


def _rank_load(mesh, paths: list, precision: str, forward=WAN_FWD, groups=None) -> list:
    """In each rank: load each file of `paths` in turn, each dropped before the next (one spawn per mode: starting
    ranks costs far more than a load here); only the first load's figures can use ru_maxrss (a process peak).
    `forward`: the tiny forward's inputs (text width, {name: shape}), None for none; `groups`: module lists whose
    bytes and lengths are recorded one by one (default: the family's BLOCKS)."""
    return [{**_load_one(mesh, path, precision, forward, groups), "first": i == 0} for i, path in enumerate(paths)]


def _group_bytes(model, local: list, groups) -> dict:
    """{module list: (bytes this rank holds in it, its length)} (a list the model lacks: (0, 0))."""
    out = {}
    for g in groups or (model.family.BLOCKS,):
        try:
            count = len(model.model.get_submodule(g))
        except AttributeError:
            count = 0
        out[g] = (sum(t.numel() * t.element_size() for n, t in local if n.startswith(g + ".")), count)
    return out


def _load_one(mesh, path: str, precision: str, forward=WAN_FWD, groups=None) -> dict:
    """Baseline after imports, then load `path` and record the memory figures (then one tiny forward)."""
    from safetensors import safe_open  # noqa: F401

    from parallel_backend.models.host import import_host
    from parallel_backend.parallel.sharded_weights import is_sharded, local_tensor
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
    local = [(n, local_tensor(p)) for n, p in params]  # a sharded block's parameter: this rank's rows

    def nbytes(t):
        return t.numel() * t.element_size()

    prefix = model.family.BLOCKS + "."  # the family's transformer blocks (Wan: blocks.)
    blocks = sum(nbytes(t) for n, t in local if n.startswith(prefix))
    mapped = _file_ranges(path)
    aliased = [t for _, t in local if t.numel() and any(a <= t.data_ptr() < b for a, b in mapped)]
    info = model.info()
    out = {
        "rank": mesh.rank, "tp_rank": mesh.coord["tp"], "load_s": load_s,
        "param_bytes": info["param_bytes"], "bytes_read": model.load_stats["bytes_read"],
        "block_bytes": blocks, "num_blocks": len(model.model.get_submodule(model.family.BLOCKS)),
        "num_params": len(params),
        # the blocks whole, as held (a sharded parameter's global size): what one gather assembles
        "block_full_bytes": sum(p.numel() * p.element_size() for n, p in params if n.startswith(prefix)),
        "sharded_params": sum(is_sharded(p) for _, p in params),
        "gguf_weight_bytes": info.get("gguf_weight_bytes"), "gguf_quantized_layers": info.get("gguf_quantized_layers"),
        "gguf_dequantized_at_load": info.get("gguf_dequantized_at_load"), "fp8_weight_bytes": info["fp8_weight_bytes"],
        "aliased": len(aliased), "aliased_bytes": sum(nbytes(t) for t in aliased),
        "noncontig": sum(not t.is_contiguous() for _, t in local),
        "base_rss": base.get("VmRSS", 0), "base_anon": base.get("RssAnon", 0), "base_file": base.get("RssFile", 0),
        "base_peak": base_peak,
        "peak_rss": _ru_maxrss(), "hwm": after.get("VmHWM", 0) if hwm_reset else None,
        "after_rss": after.get("VmRSS", 0), "after_anon": after.get("RssAnon", 0),
        "max_anon": sampler.max["RssAnon"], "max_file": sampler.max["RssFile"], "max_total": sampler.max["RssTotal"],
        "cuda_peak": torch.cuda.max_memory_allocated(mesh.device) if mesh.device.type == "cuda" else None,
        "groups": _group_bytes(model, local, groups),
    }
    # Read every parameter once, as the first forward does: pages of a lazily mapped file fault in now.
    with torch.no_grad():
        for _, t in local:  # 1-byte tensors (fp8, GGUF blocks) as uint8: max() allocates nothing (uint8 sum() would
            (t.view(torch.uint8).max() if t.element_size() == 1 and t.numel() else t.sum())  # cast it to int64)
    touched = _status_kb("VmRSS", "RssAnon", "RssFile")
    out.update(touched_rss=touched.get("VmRSS", 0), touched_anon=touched.get("RssAnon", 0),
               touched_file=touched.get("RssFile", 0), peak_rss_touched=_ru_maxrss())
    del params, local, aliased
    if forward:  # one tiny forward: what it holds beyond the weights (gathered blocks, a dequantized layer)
        out.update(_tiny_forward(model, mesh, *forward, hwm_reset))
    del model
    gc.collect()
    return out


def _tiny_forward(model, mesh, text_width: int, extras: dict, hwm_reset: bool) -> dict:
    """One forward of FWD_TOKENS tokens (a 1 x 2 x 4 grid of the family's patches) and FWD_CTX text tokens, with
    `extras` {name: shape} drawn at random: its RSS peak over the weights, the bytes it gathered, finite or not."""
    from parallel_backend.parallel.collectives import count_bytes

    pt, ph, pw = model.shape.patch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.shape.in_channels, pt, 2 * ph, 4 * pw, generator=g)
    ctx = torch.randn(1, FWD_CTX, text_width, generator=g)
    conds = {k: torch.randn(*shape, generator=g) for k, shape in extras.items()}
    gc.collect()
    if mesh.device.type == "cuda":
        torch.cuda.synchronize(mesh.device)
        torch.cuda.reset_peak_memory_stats(mesh.device)
        cuda_before = torch.cuda.memory_allocated(mesh.device)
    before = _status_kb("VmRSS").get("VmRSS", 0)
    _reset_hwm()
    t0 = time.perf_counter()
    with count_bytes() as counted:
        y = model.forward_rows(x, torch.full((1,), 500.0), ctx, **conds)
    return dict(fwd_s=time.perf_counter() - t0, fwd_rss_before=before,
                fwd_hwm=_status_kb("VmHWM").get("VmHWM", 0) if hwm_reset else None,
                fwd_gathered=counted.get("weight_gather", 0),
                fwd_gathered_formula=model.sharded_weights.gathered_bytes() if model.sharded_weights else 0,
                fwd_finite=None if y is None else bool(torch.isfinite(y).all()),
                fwd_cuda=(torch.cuda.max_memory_allocated(mesh.device) - cuda_before
                          if mesh.device.type == "cuda" else None))


def _write_file(path: str, blocks: int, preset: str = PRESET) -> None:
    write_fast_checkpoint(path, wan_shapes(**{**WAN_PRESETS[preset], "num_layers": blocks}), dtype=torch.bfloat16)


def _write_variant(src: str, dst: str, fmt: str) -> None:
    """`fmt` "fp8": a plain fp8 e4m3fn copy; a GGUF quant type: write_gguf_dit's conversion."""
    if fmt == "fp8":
        from parallel_backend.testing.synthetic import write_fp8_variant
        write_fp8_variant(src, dst, scaled=False)
    else:
        from parallel_backend.testing.gguf_files import write_gguf_dit
        write_gguf_dit(src, dst, fmt)


def _in_child(target, *args) -> None:
    """Run `target(*args)` in a spawned child, so that this parent's peak RSS (the ranks' ru_maxrss floor) stays low."""
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{target.__name__}{args[1:]} failed in its child process (exit code {p.exitcode})")


# ---- modes ----------------------------------------------------------------------------------------------------------
def parse_mode(mode: str) -> tuple:
    """'tp2' -> ('tp', 2); 'shard4' -> ('shard', 4)."""
    m = re.fullmatch(r"(tp|shard)([0-9]+)", mode.strip())
    if not m:
        raise ValueError(f"mode {mode!r} is not tpN or shardN")
    kind, n = m.group(1), int(m.group(2))
    if kind == "shard" and n < 2:
        raise ValueError("sharded weights need at least 2 ranks (shard2, shard4, ...)")
    return kind, n


def mode_config(mode: str, device: str) -> ParallelConfig:
    kind, n = parse_mode(mode)
    if kind == "tp":
        return ParallelConfig(world_size=n, tp=n, device=device, dtype="bf16")
    return ParallelConfig(world_size=n, ulysses=n, shard_weights=True, device=device, dtype="bf16")


def modes_from_args(args) -> list:
    if args.modes:
        return [m.strip() for m in args.modes.split(",") if m.strip()]
    return ([f"tp{int(t)}" for t in args.tps.split(",") if t.strip()]
            + [f"shard{int(s)}" for s in args.shards.split(",") if s.strip()])


# ---- analytic per-rank bytes ----------------------------------------------------------------------------------------
# Wan's TP plan (models/wan.py PLAN): q / k / v and ffn.0 split by output rows (weight and bias), o and ffn.2 by
# input columns (bias whole: TP rank 0 holds it, the others zeros of the same size), the q / k RMSNorm by heads
_COLWISE = re.compile(r"blocks\.[0-9]+\.((self|cross)_attn\.[qkv]|ffn\.0)\.(weight|bias)$")
_ROWWISE = re.compile(r"blocks\.[0-9]+\.((self|cross)_attn\.o|ffn\.2)\.weight$")
_HEAD_NORM = re.compile(r"blocks\.[0-9]+\.(self|cross)_attn\.norm_[qk]\.weight$")
_LINEAR = re.compile(r"blocks\.[0-9]+\.((self|cross)_attn\.[qkvo]|ffn\.[02])\.weight$")


def host_held_bytes(key: str, shape, st: str, precision: str = "bf16", fp8_model: bool = False) -> int:
    """Bytes the host model holds for a file tensor of `shape` stored as `st` (wan_file_header's dtypes), as ComfyUI's
    WanModel builds it: its patch embedding always in fp32; a GGUF-quantized linear kept quantized (GGUFLinear);
    `fp8_model` (a file with fp8 weights): ComfyUI builds the model in fp8, norms, biases and modulation too; the rest
    at `precision`.
    (weights/reads.held_bytes, auto mode's estimate, differs only in the patch embedding and an fp8 file's 1-D
    tensors.)"""
    from parallel_backend.weights.gguf import QUANT_BLOCKS, quantized_bytes
    from parallel_backend.weights.reads import DTYPE_NAMES

    n = math.prod(shape)
    if key.startswith("patch_embedding."):
        return 4 * n
    if st in QUANT_BLOCKS and st not in ("F32", "F16", "BF16"):
        return quantized_bytes(shape, st)
    return n * (1 if fp8_model or st.startswith("F8") else DTYPE_NAMES[precision].itemsize)


def analytic_rank(header: dict, mode: str, precision: str = "bf16") -> dict:
    """Rank 0's bytes in `mode` for a file `header` (wan_file_header): held (all, blocks), one block whole as held
    (what a gather assembles), the elements of the largest linear cast to `precision` per call (fp8 / GGUF layers:
    in the blocks, the rank's TP shard or, sharded, the gathered whole layer; outside them, whole), and the layers the
    loader must dequantize (a row-parallel split off a quant-block boundary)."""
    from parallel_backend.weights.gguf import QUANT_BLOCKS, column_slice_on_block_boundary
    from parallel_backend.weights.reads import DTYPE_NAMES

    kind, n = parse_mode(mode)
    elt = DTYPE_NAMES[precision].itemsize
    held = blocks = full = block_cast = other_cast = 0
    dequantized = []
    fp8_model = any(str(st).startswith("F8") for _, st in header.values())
    for key, (shape, st) in header.items():
        block = key.startswith("blocks.")
        local, b = tuple(shape), None
        quant = st in QUANT_BLOCKS and st not in ("F32", "F16", "BF16")
        cast = (quant or st.startswith("F8")) and key.endswith(".weight") and len(shape) == 2
        if kind == "tp" and n > 1 and block:
            if _COLWISE.match(key) or _HEAD_NORM.match(key):
                local = (shape[0] // n, *shape[1:])
            elif _ROWWISE.match(key):
                local = (shape[0], shape[1] // n, *shape[2:])
                if quant and not column_slice_on_block_boundary(shape, st, n):
                    b = math.prod(local) * elt  # dequantized at load
                    dequantized.append(key)
                    cast = False
        elif kind == "shard" and block and len(shape) >= 1:
            local = (-(-shape[0] // n), *shape[1:])  # FSDP's rows: ceil(rows / N), rank 0 holds a full chunk
        if b is None:
            b = host_held_bytes(key, local, st, precision, fp8_model)
        held += b
        if block:
            blocks += b
            full += host_held_bytes(key, shape, st, precision, fp8_model)
            if cast:  # sharded: the gathered layer is whole
                block_cast = max(block_cast, math.prod(shape if kind == "shard" else local))
        elif cast:
            other_cast = max(other_cast, math.prod(local))
    layers = len({k.split(".")[1] for k in header if k.startswith("blocks.")})
    return {"held": held, "blocks": blocks, "block_full": full / max(layers, 1), "block_cast": block_cast,
            "other_cast": other_cast, "layers": layers, "dequantized": dequantized}


# Bytes per element of the largest layer a forward casts per call, what it holds while the cast result is used: an fp8
# layer cast to bf16 by ComfyUI's ops (2); a GGUF layer dequantized by weights/gguf_kernels (float32 arithmetic, then
# the bf16 cast). MEASURED on CPU by table [2b] (Q8_0 8.8, Q4_K 12.7 B/element of the ffn layer; fp8 2.1 of
# time_projection); Q6_K / Q5_K are taken as Q4_K (K-quant kernels alike, not measured by default).
CAST_BYTES = {"bf16": 0, "fp8": 2, "Q8_0": 9, "Q6_K": 13, "Q5_K": 13, "Q4_K": 13}


def resident_blocks(layers: int, gloo: bool) -> int:
    """Whole blocks a sharded-weights forward holds at its peak, by torch FSDP2's forward as the pack runs it (one
    block prefetched): the running block's unsharded parameters, its flat all-gather buffer (FSDP2 defers freeing it
    to the next block's copy-out, `all_gather_state`) and the prefetched next block's buffer = 3; a 1-block model
    holds only its buffer + its parameters = 2. gloo (CPU) gathers through a temporary flat copy of the whole output
    (ProcessGroupGloo allgather), one more block while the prefetch runs; NCCL gathers in place."""
    if layers <= 1:
        return 2
    return 3 + (1 if gloo else 0)


def transient(an: dict, mode: str, fmt: str, resident: int) -> float:
    """What a forward holds beyond the weights (not activations), rank 0: sharded, `resident` whole blocks (the
    largest block layer's cast comes on top of the 3 FSDP keeps while a block runs); tp, the cast of the largest
    block layer shard; the layers outside the blocks (time projection, text embedding) run before / after the
    blocks, with nothing gathered."""
    kind, _ = parse_mode(mode)
    per = CAST_BYTES.get(fmt, 13)
    inside = per * an["block_cast"]
    if kind == "shard":
        inside = max(resident * an["block_full"], min(resident, 3) * an["block_full"] + inside)
    return max(inside, per * an["other_cast"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1, help="blocks in the synthetic file (real model: 40)")
    ap.add_argument("--preset", default=None, help=f"the shapes: Wan {', '.join(PRESETS)} (default {PRESET}; tiny: "
                    f"the tests' quick run); with another --family a name of its synthetic <FAMILY>_PRESETS (default: "
                    f"its largest release)")
    ap.add_argument("--family", default="wan", choices=("wan", *FAMILIES),
                    help="another family than Wan: tables [1k] / [2k] only (bf16 and fp8 files; --blocks of each of "
                         "its block lists, the rest at its real size)")
    ap.add_argument("--tps", default="1,2,4", help="tensor-parallel degrees to load with (modes tpN)")
    ap.add_argument("--shards", default="2,4", help="sharded-weights world sizes to load with (modes shardN; '' none)")
    ap.add_argument("--modes", default="", help="explicit mode list, e.g. tp1,tp2,shard2 (overrides --tps/--shards)")
    ap.add_argument("--gguf", default="Q8_0", help="GGUF quant types to convert the file to and load on --gguf-modes "
                                                   "('' none; e.g. Q8_0,Q6_K,Q5_K,Q4_K)")
    ap.add_argument("--fp8", action="store_true", help="also load a plain fp8 e4m3fn copy on --gguf-modes")
    ap.add_argument("--gguf-modes", default="same",
                    help="modes the --gguf / --fp8 files are loaded on ('same' = every bf16 mode)")
    ap.add_argument("--no-forward", action="store_true", help="skip the tiny forward after each load")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto = cuda when there are at least max(world) GPUs, else cpu/gloo")
    args = ap.parse_args(argv)
    modes = modes_from_args(args)
    vmodes = modes if args.gguf_modes.strip() == "same" else [m.strip() for m in args.gguf_modes.split(",")
                                                               if m.strip()]
    for m in modes + vmodes:
        parse_mode(m)
    formats = ["bf16"] + (["fp8"] if args.fp8 else []) + [q.strip() for q in args.gguf.split(",") if q.strip()]
    worlds = [parse_mode(m)[1] for m in modes + (vmodes if len(formats) > 1 else [])]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= max(worlds) else "cpu"
    backend = "nccl" if device == "cuda" else "gloo"
    if args.family != "wan":
        return family_main(args, modes, device)
    args.preset = args.preset or PRESET
    if args.preset not in PRESETS:
        ap.error(f"--preset must be one of {PRESETS} for Wan")

    preset, shape = args.preset, WAN_PRESETS[args.preset]
    real_layers = shape["num_layers"]
    name = {"wan2.1-14b": "Wan 2.1 14B", "wan2.1-1.3b": "Wan 2.1 1.3B"}.get(preset, f"Wan '{preset}'")
    header(f"Per-rank parameter bytes and RSS at load, {name} shapes: tensor parallel, sharded weights, GGUF / fp8")
    from parallel_backend.testing.spmd import run_on_ranks

    results, files = {}, {}  # (format, mode) -> per-rank records; format -> (path, MiB)
    with tempfile.TemporaryDirectory(prefix="pdit_bench_mem_") as tmp:
        path = os.path.join(tmp, f"{preset}_shapes.safetensors")
        t0 = time.perf_counter()
        _in_child(_write_file, path, args.blocks, preset)
        files["bf16"] = path
        print(f"file: {name} shapes (dim {shape['dim']}, {shape['dim'] // 128} heads, ffn {shape['ffn_dim']}), "
              f"{args.blocks} of {real_layers} blocks, "
              f"bf16, {mib(os.path.getsize(path))} MiB, written in {time.perf_counter() - t0:.0f} s")
        for fmt in formats[1:]:
            t0 = time.perf_counter()
            dst = os.path.join(tmp, f"{preset}_shapes_{fmt}." + ("safetensors" if fmt == "fp8" else "gguf"))
            _in_child(_write_variant, path, dst, fmt)
            files[fmt] = dst
            how = "write_fp8_variant(scaled=False)" if fmt == "fp8" else "write_gguf_dit"
            print(f"      {fmt}: {mib(os.path.getsize(dst))} MiB, converted by {how} in "
                  f"{time.perf_counter() - t0:.0f} s")
        print(f"loaded in bf16 on {device} ranks ({backend}); bf16 on {', '.join(modes)}"
              + (f"; {', '.join(formats[1:])} on {', '.join(vmodes)}" if len(formats) > 1 else ""))
        parent_peak = _ru_maxrss()
        print(f"this parent's peak RSS before spawning ranks: {mib(parent_peak)} MiB (the floor of the ranks' "
              f"ru_maxrss)\n")
        all_modes = modes + [m for m in vmodes if m not in modes and len(formats) > 1]
        for mode in all_modes:  # one spawn per mode, loading its files in turn
            fmts = [f for f in formats if mode in (modes if f == "bf16" else vmodes)]
            per_rank = run_on_ranks(_rank_load, mode_config(mode, device), [files[f] for f in fmts], "bf16",
                                    None if args.no_forward else WAN_FWD, timeout=1800)
            for j, fmt in enumerate(fmts):
                results[fmt, mode] = [recs[j] for recs in per_rank]
    results = {k: results[k] for k in sorted(results, key=lambda k: (formats.index(k[0]), all_modes.index(k[1])))}

    headers = {fmt: wan_file_header(preset, fmt, args.blocks) for fmt in formats}
    full = {}
    for fmt in formats:
        if (fmt, "tp1") in results:
            full[fmt] = results[fmt, "tp1"][0]["param_bytes"]
        else:
            full[fmt] = analytic_rank(headers[fmt], "tp1")["held"]
    if any((fmt, "tp1") not in results for fmt in formats):
        print("(no tp1 run: 'of full' divides by the analytic whole-model bytes of the file)")
    rows, rows2, rows_f = [], [], []
    for (fmt, mode), ranks in results.items():
        for r in ranks:
            delta = r["peak_rss"] - r["base_rss"]
            first = r["first"]  # ru_maxrss is the process's peak: only the first load of a spawn has its own
            rows.append([fmt, mode, r["rank"], mib(r["param_bytes"]), f"{r['param_bytes'] / full[fmt]:.3f}",
                         mib(r["bytes_read"]), mib(r["base_rss"]), mib(r["peak_rss"]) if first else "-",
                         mib(delta) if first else "-", f"{delta / r['param_bytes']:.2f}" if first else "-",
                         "" if r["hwm"] is None else mib(r["hwm"] - r["base_rss"]),
                         mib(r["max_anon"] - r["base_anon"]), mib(r["max_file"] - r["base_file"]), f"{r['load_s']:.1f}"]
                        + ([mib(r["cuda_peak"])] if r["cuda_peak"] is not None else []))
            t_delta = r["touched_rss"] - r["base_rss"]
            rows2.append([fmt, mode, r["rank"], mib(r["param_bytes"]), mib(t_delta),
                          f"{t_delta / r['param_bytes']:.2f}",
                          mib(r["touched_anon"] - r["base_anon"]), mib(r["touched_file"] - r["base_file"]),
                          mib(r["peak_rss_touched"] - r["base_rss"]) if r["first"] else "-",
                          f"{r['aliased']}/{r['num_params']}", mib(r["aliased_bytes"]),
                          f"{r['noncontig']}"])
        r = ranks[0]
        if "fwd_hwm" in r:
            an = analytic_rank(headers[fmt], mode)
            resident = resident_blocks(r["num_blocks"], gloo=device != "cuda") if mode.startswith("shard") else 0
            exp = transient(an, mode, fmt, resident)
            fwd = None if r["fwd_hwm"] is None else r["fwd_hwm"] - r["fwd_rss_before"]
            deq = r["gguf_dequantized_at_load"] or []
            cast = CAST_BYTES.get(fmt, 13) * max(an["block_cast"], an["other_cast"])
            rows_f.append([fmt, mode, "" if fwd is None else mib(fwd)]
                          + (["" if r["fwd_cuda"] is None else mib(r["fwd_cuda"])] if device == "cuda" else [])
                          + [mib(r["block_full_bytes"] / r["num_blocks"]), resident or "", mib(cast), mib(exp),
                             "" if fwd is None or not exp else f"{fwd / exp:.2f}",
                             mib(r["fwd_gathered"]), mib(r["fwd_gathered_formula"]),
                             "" if r["gguf_quantized_layers"] is None else
                             f"{r['gguf_quantized_layers']} / {len(deq)}",
                             f"{r['fwd_s']:.1f}", "yes" if r["fwd_finite"] in (True, None) else "NO"])
    cols = ["weights", "mode", "rank", "params MiB", "of full", "read MiB", "base RSS", "peak RSS", "load delta",
            "delta/params", "VmHWM delta", "anon delta", "file delta", "load s"]
    if device == "cuda":
        cols.append("cuda peak MiB")
    print(f"[1] At load, per rank (MiB; 'of full' = params / the tp1 rank's of the same file: "
          f"{', '.join(f'{f} {mib(b)} MiB' for f, b in full.items())}):")
    print(table(rows, cols, "llr" + "r" * (len(cols) - 3)))
    print("base RSS: after imports + mesh, before ShardedModel. peak RSS: ru_maxrss after the load (runtime/rank.py's "
          "peak_rss). load delta = peak RSS - base RSS.\nVmHWM delta: the load's own peak (reset before the load) - "
          "base. anon / file delta: largest growth of private RSS / of file-backed RSS (mmapped checkpoint\npages: "
          "page cache, shared between ranks, reclaimable) during the load, sampled every 5 ms. shardN: sharded "
          "weights over N ranks (params = local rows).\nEach mode's ranks load its files in turn (one spawn per "
          "mode); '-': ru_maxrss figures of a load after the first of its ranks (the process's peak, not its own).")
    print("\n[2] After reading every parameter once (what the first forward does), per rank (MiB):")
    print(table(rows2, ["weights", "mode", "rank", "params MiB", "RSS delta", "delta/params", "anon delta",
                        "file delta", "ru_maxrss delta", "params in file map", "their MiB", "non-contig params"],
                "llr" + "r" * 9))
    print("params in file map: parameters whose data lies inside this rank's mmap of the checkpoint (safetensors "
          "returns zero-copy views\nand weights/reads.py's .to() keeps them when dtype and device already match); "
          "their pages count as file RSS only once read.")
    if rows_f:
        print(f"\n[2b] One tiny forward ({FWD_TOKENS} tokens, {FWD_CTX} text tokens, batch 1) after "
              f"the load, rank 0 (MiB): what it holds beyond the weights")
        print(table(rows_f, ["weights", "mode", "fwd peak"] + (["cuda peak"] if device == "cuda" else [])
                    + ["block whole", "blocks held", "cast", "expected", "peak/exp", "gathered", "gather formula",
                       "gguf kept / deq.", "fwd s", "finite"], "ll" + "r" * (12 if device == "cuda" else 11)))
        print("fwd peak: VmHWM (reset before the forward) - RSS before it (activations of 8 tokens: ~20 MiB). "
              "expected = blocks held x block whole (shardN; resident_blocks():\nFSDP2 keeps the running block's "
              "parameters + its all-gather buffer + the prefetched next block's buffer, and gloo gathers through a "
              "temporary copy;\na 1-block file: buffer + parameters) with the cast of the largest layer on top "
              "(cast = CAST_BYTES[format] x its elements: fp8 2, GGUF 9-13 B,\nthe float32 dequantization). "
              "gathered: count_bytes()['weight_gather'] of the forward; gather formula: "
              "sharded_weights.gathered_bytes().\ngguf kept / deq.: linears kept quantized / dequantized at load "
              "(a row-parallel split off a quant-block boundary).")

    # projection to the real 40-block model, from the measured split
    rows, full_headers = [], {fmt: wan_file_header(preset, fmt) for fmt in formats}
    for (fmt, mode), ranks in results.items():
        r = ranks[0]
        per_block = r["block_bytes"] / r["num_blocks"]
        other = r["param_bytes"] - r["block_bytes"]
        proj = other + per_block * real_layers
        an = analytic_rank(full_headers[fmt], mode)["held"]
        an_file = analytic_rank(headers[fmt], mode)["held"]
        r1 = results.get((fmt, "tp1"), [None])[0]
        full_proj = (r1["param_bytes"] - r1["block_bytes"] + r1["block_bytes"] / r1["num_blocks"] * real_layers
                     if r1 else None)
        n = parse_mode(mode)[1]
        rows.append([fmt, mode, mib(per_block), mib(other), f"{proj / 2**30:.2f}",
                     "" if full_proj is None else f"{proj / full_proj:.3f}", f"{1 / n:.3f}",
                     f"{an / 2**30:.2f}", f"{100 * (proj - an) / an:+.2f}%",
                     f"{100 * (r['param_bytes'] - an_file) / an_file:+.2f}%"])
    print(f"\n[3] Projection to the real {real_layers}-block {name}, per rank (rank 0), from the MEASURED block / "
          f"non-block split (weights as ComfyUI's WanModel holds them at bf16 compute):")
    print(table(rows, ["weights", "mode", "per block MiB", "non-block MiB", "params GiB", "of full", "ideal 1/n",
                       "analytic GiB", "proj vs an", f"file vs an ({args.blocks} blk)"], "ll" + "r" * 8))
    print("Non-block parameters (patch/text/time embeddings, time_projection, head) are whole on every rank in every "
          "mode; under tp so are\nthe row-parallel biases, norms and modulation of each block. analytic: table [4]'s "
          "rule; 'file vs an' compares the measured params with it at the file's own size.")

    # analytic table for every format and mode
    proj_modes = ["tp1", "tp2", "tp4", "shard2", "shard4", "shard8"]
    an_all = {(fmt, m): analytic_rank(wan_file_header(preset, fmt), m) for fmt in WEIGHT_FORMATS for m in proj_modes}
    gib = 2**30
    rows = [[fmt, f"{an_all[fmt, 'shard2']['block_full'] / 2**20:.0f}"]
            + [f"{an_all[fmt, m]['held'] / gib:.2f}" for m in proj_modes] for fmt in WEIGHT_FORMATS]
    print(f"\n[4] ANALYTIC per-rank weight bytes of the full {name} ({real_layers} blocks), GiB, rank 0, by "
          f"weight format and mode (tpN = tensor parallel, shardN = sharded weights x N):")
    print(table(rows, ["weights", "block MiB"] + proj_modes, "l" + "r" * (1 + len(proj_modes))))
    deq = {(fmt, m): an["dequantized"] for (fmt, m), an in an_all.items() if an["dequantized"]}
    print("Computed tensor by tensor from the real shapes (not measured): the file's per-tensor types (bf16; fp8 = "
          "every 2+-dim weight fp8, as\nwrite_fp8_variant(scaled=False); GGUF = write_gguf_dit's rule: block linears "
          "quantized, embeddings / head / modulation kept BF16/F32)\nheld as the host holds them (GGUF quantized "
          "linears: weights/gguf.quantized_bytes; patch embedding fp32; the rest bf16, an fp8 model's\nall fp8), "
          "split by the Wan TP plan (tpN) or into FSDP's ceil(rows / N) rows per block parameter (shardN; "
          "non-block whole).")
    if deq:
        print("Row-parallel layers a tpN split cuts off a quant-block boundary are dequantized at load (held bf16 / "
              "N): " + "; ".join(f"{f} {m}: {len(v)} layers ({sorted({k.split('.', 2)[2] for k in v})})"
                                 for (f, m), v in deq.items()))
    rows, rows_t = [], []
    resident = resident_blocks(real_layers, gloo=False)
    for fmt in WEIGHT_FORMATS:
        row = [fmt]
        for m in proj_modes:
            an = an_all[fmt, m]
            peak = an["held"] + transient(an, m, fmt, resident if m.startswith("shard") else 0)
            card = next((c for c in CARDS_GIB if peak <= c * gib), None)
            row.append(f"{peak / gib:.2f} " + (f"[{card}]" if card else "[>80]"))
        rows.append(row)
        an = an_all[fmt, "shard2"]
        rows_t.append([fmt, f"{an['block_full'] / 2**20:.0f}"]
                      + [f"{transient(an, 'shard2', fmt, k) / gib:.2f}" for k in (2, 3, 4)]
                      + [f"{CAST_BYTES[fmt] * an['block_cast'] / 2**20:.0f}",
                         f"{CAST_BYTES[fmt] * an['other_cast'] / 2**20:.0f}"])
    print(f"\n[5] ANALYTIC per-rank weights + forward transient, GiB, and [the smallest of "
          f"{' / '.join(map(str, CARDS_GIB))} GB cards it fits] (GPU / NCCL model):")
    print(table(rows, ["weights"] + proj_modes, "l" + "r" * len(proj_modes)))
    print(f"transient: shardN holds {resident} blocks whole while a block runs (resident_blocks(): the running "
          f"block's parameters, its FSDP2 all-gather buffer, the prefetched\nnext block's buffer), the largest "
          f"block layer's cast on top; fp8 / GGUF layers are cast / dequantized per call (CAST_BYTES: fp8 2, GGUF "
          f"9-13 B per\nelement of the layer, measured on CPU by [2b]). Weights only: activations (Wan 14B 720p: "
          f"several GiB), the CUDA context and whatever else the card\nholds come on top, so a cell near its card's "
          f"limit does not fit in practice. Cards as their nominal GiB (16 / 24 / 80 GiB = 17.2 / 25.8 / 85.9 GB).")
    print("\n[5b] The sharded-weights transient of the full model, GiB per rank (any N: the gathered blocks are "
          "whole), by how many whole blocks are held:")
    print(table(rows_t, ["weights", "block MiB", "2 blocks", "3 blocks (GPU)", "4 blocks (CPU gloo)",
                         "block cast MiB", "outside cast MiB"]))
    print("2 blocks: the running block + the prefetched next as parameters only (the lower bound); 3: FSDP2 as the "
          "pack runs it, which also keeps the running\nblock's all-gather buffer until the next copy-out (torch "
          "_fsdp_param_group.wait_for_unshard); 4: on CPU, gloo's all-gather adds a temporary copy of\nthe whole "
          "output (measured: [2b] with --blocks 3 reads 4.0 blocks). Each with the largest block layer's cast where "
          "it is larger; the cast of the layers\noutside the blocks (fp8's time_projection) happens with no block "
          "gathered.")
    return 0


# ---- the other families: measured per-rank bytes and RSS, projected to the real block count --------------------------
@dataclass(frozen=True)
class FamilyBench:
    """How the bench writes and loads one family's file (parallel_backend/testing/synthetic.py's write_tiny_<family>
    layout, written by write_fast_checkpoint in bf16): its presets, its shapes (preset dict -> {key: shape}), the
    largest real preset (the default), the block lists --blocks cuts and the projection scales ((preset key, module
    list), ...), the key prefix, the metadata config ("transformer" entries, from the preset dict), tensors stored as
    given (fp32 buffers), and the tiny forward's inputs (preset dict -> (text width, {input: shape})), None where
    the forward needs inputs the bench cannot make simply (`no_forward`: why)."""
    presets: dict
    shapes: Callable
    default: str
    blocks: tuple
    prefix: str = ""
    metadata: Callable | None = None
    extra: Callable | None = None
    forward: Callable | None = None
    no_forward: str = ""


def _hunyuan_file_shapes(**cfg) -> dict:
    return {syn.hunyuan_released_name(k): v for k, v in syn.hunyuan_video_shapes(**cfg).items()}


def _minimax_rope(cfg: dict) -> dict:  # a geometric ladder in fp32, as write_tiny_minimax and the release keep it
    return {"rope.inv_freq": 1.0 / (10000.0 ** (torch.arange(cfg["rope_len"], dtype=torch.float32) / cfg["rope_len"]))}


def _hunyuan_inputs(cfg: dict) -> tuple:  # 1.0: the pooled CLIP-L vector and the guidance strength
    return cfg["text_dim"], ({"y": (1, 768)} if cfg.get("vector") else {}) | ({"guidance": (1,)} if cfg["guidance"]
                                                                              else {})


LTX = "model.diffusion_model."
FAMILIES = {
    "kandinsky5": FamilyBench(syn.KANDINSKY5_PRESETS, syn.kandinsky5_shapes, "kandinsky5-lite-video",
                              (("visual_blocks", "visual_transformer_blocks"),),
                              forward=lambda cfg: (3584, {"y": (1, 768)})),
    "ltxv": FamilyBench(syn.LTXV_PRESETS, syn.ltxv_shapes, "ltxv-13b", (("num_layers", "transformer_blocks"),),
                        prefix=LTX, forward=lambda cfg: (cfg["caption_channels"], {})),
    "ltxav": FamilyBench(syn.LTXAV_PRESETS, syn.ltxav_shapes, "ltx-2-19b", (("num_layers", "transformer_blocks"),),
                         prefix=LTX, metadata=syn.ltxav_metadata,
                         no_forward="its forward takes the packed audio + video latent"),
    "minimax": FamilyBench(syn.MINIMAX_PRESETS, syn.minimax_shapes, "minimax-h3", (("num_layers", "blocks"),),
                           extra=_minimax_rope, no_forward="its forward takes [video, audio] latents"),
    "hunyuan_video": FamilyBench(syn.HUNYUAN_PRESETS, _hunyuan_file_shapes, "hunyuan-video-1.5",
                                 (("depth", "double_blocks"), ("single", "single_blocks")), forward=_hunyuan_inputs),
    "cosmos": FamilyBench(syn.COSMOS_PRESETS, syn.cosmos_predict2_shapes, "cosmos-predict2-14b-t2i",
                          (("num_blocks", "blocks"),), prefix="net.",
                          extra=lambda cfg: syn.cosmos_rope_ranges(cfg["model_channels"] // cfg["num_heads"]),
                          forward=lambda cfg: (1024, {})),
    "cosmos1": FamilyBench(syn.COSMOS1_PRESETS, syn.cosmos1_shapes, "cosmos-1.0-14b-t2w", (("num_blocks", "blocks"),),
                           prefix="net.", forward=lambda cfg: (1024, {})),
}


def family_config(family: str, preset: str, blocks: int) -> tuple:
    """(the real preset's dict, the file's: each block list cut to `blocks`, a list the model lacks stays empty)."""
    spec = FAMILIES[family]
    real = spec.presets[preset]
    return real, {**real, **{k: min(blocks, real[k]) for k, _ in spec.blocks}}


def _write_family_file(path: str, family: str, preset: str, blocks: int) -> None:
    spec = FAMILIES[family]
    _, cfg = family_config(family, preset, blocks)
    meta = {"config": json.dumps({"transformer": spec.metadata(**cfg)})} if spec.metadata else None
    write_fast_checkpoint(path, spec.shapes(**cfg), dtype=torch.bfloat16, prefix=spec.prefix, metadata=meta,
                          extra=spec.extra(cfg) if spec.extra else None)


def whole_bytes(family: str, preset: str, blocks: int | None = None) -> int:
    """Bytes of the whole model (or a `blocks`-block file of it) as a bf16 load holds it, from the shapes alone."""
    spec = FAMILIES[family]
    _, cfg = family_config(family, preset, blocks if blocks is not None else 10**9)
    extra = spec.extra(cfg) if spec.extra else {}
    return sum(math.prod(sh) * (extra[k].element_size() if k in extra else 2) for k, sh in spec.shapes(**cfg).items())


def _family_runs(args, family: str, preset: str, modes: list, device: str, formats: list) -> tuple:
    """({(format, mode): per-rank records}, {format: the file's bytes as held}): the file (and its fp8 copy)
    written, then loaded on every mode."""
    from parallel_backend.testing.spmd import run_on_ranks

    spec = FAMILIES[family]
    real, cfg = family_config(family, preset, args.blocks)
    forward = None if args.no_forward or not spec.forward else spec.forward(cfg)
    results = {}
    with tempfile.TemporaryDirectory(prefix="pdit_bench_mem_") as tmp:
        files = {"bf16": os.path.join(tmp, f"{preset}.safetensors")}
        _in_child(_write_family_file, files["bf16"], family, preset, args.blocks)
        if "fp8" in formats:
            files["fp8"] = os.path.join(tmp, f"{preset}_fp8.safetensors")
            _in_child(_write_variant, files["bf16"], files["fp8"], "fp8")
        print(f"file: {', '.join(f'{cfg[k]} of {real[k]} {m}' for k, m in spec.blocks)}, bf16 "
              f"{mib(os.path.getsize(files['bf16']))} MiB; loaded in bf16 on {device} ranks, modes {', '.join(modes)}"
              + ("" if forward or args.no_forward else f"\nno tiny forward for {family}: {spec.no_forward} (the "
                                                      f"bench makes only plain latents); load figures only"))
        for mode in modes:
            per_rank = run_on_ranks(_rank_load, mode_config(mode, device), [files[f] for f in formats], "bf16",
                                    forward, [m for _, m in spec.blocks], timeout=1800)
            for j, fmt in enumerate(formats):
                results[fmt, mode] = [recs[j] for recs in per_rank]
        full = {f: sum(held_bytes(sh, d, "bf16") for sh, d in read_header(p).values()) for f, p in files.items()}
    return results, full


def project(r: dict, spec: FamilyBench, real: dict) -> tuple:
    """(per-block bytes of each block list, non-block bytes, bytes at the real block counts) of one rank's record."""
    per = [b / n if n else 0.0 for b, n in (r["groups"][m] for _, m in spec.blocks)]
    other = r["param_bytes"] - sum(r["groups"][m][0] for _, m in spec.blocks)
    return per, other, other + sum(p * real[k] for p, (k, _) in zip(per, spec.blocks))


def family_main(args, modes: list, device: str) -> int:
    """Tables [1k] (per rank at load and after one tiny forward) and [2k] (projection to the real model from the
    measured block / non-block split) for a family other than Wan."""
    spec = FAMILIES[args.family]
    preset = args.preset or spec.default
    if preset not in spec.presets:
        raise SystemExit(f"--preset for {args.family}: one of {', '.join(spec.presets)}")
    real = spec.presets[preset]
    counts = " + ".join(f"{real[k]} {m}" for k, m in spec.blocks if real[k])
    header(f"Per-rank parameter bytes and RSS at load, {args.family} {preset} shapes ({counts}): tensor parallel, "
           f"sharded weights")
    formats = ["bf16"] + (["fp8"] if args.fp8 else [])
    results, full = _family_runs(args, args.family, preset, modes, device, formats)
    _family_tables(results, full, spec, real, whole_bytes(args.family, preset))
    return 0


def _family_tables(results: dict, full: dict, spec: FamilyBench, real: dict, whole: int) -> None:
    rows, rows_p = [], []
    for (fmt, mode), ranks in results.items():
        for r in ranks:
            fwd = None if r.get("fwd_hwm") is None else r["fwd_hwm"] - r["fwd_rss_before"]
            rows.append([fmt, mode, r["rank"], mib(r["param_bytes"]), f"{r['param_bytes'] / full[fmt]:.3f}",
                         mib(r["bytes_read"]), mib(r["peak_rss"] - r["base_rss"]) if r["first"] else "-",
                         "" if r["hwm"] is None else mib(r["hwm"] - r["base_rss"]), "" if fwd is None else mib(fwd),
                         f"{r['load_s']:.1f}", {True: "yes", False: "NO"}.get(r.get("fwd_finite"), "-")])
        per, other, proj = project(ranks[0], spec, real)
        tp1 = results.get((fmt, "tp1"))
        rows_p.append([fmt, mode, " / ".join(mib(p) for p in per), mib(other), f"{proj / 2**30:.2f}",
                       f"{proj / project(tp1[0], spec, real)[2]:.3f}" if tp1 else "",
                       f"{proj / whole:.3f}" if fmt == "bf16" else "", f"{1 / parse_mode(mode)[1]:.3f}"])
    print("[1k] At load and one tiny forward, per rank (MiB; 'of full' = params / the whole file as held):")
    print(table(rows, ["weights", "mode", "rank", "params MiB", "of full", "read MiB", "load delta", "VmHWM delta",
                       "fwd peak", "load s", "finite"], "llr" + "r" * 8))
    print(f"load delta: ru_maxrss after the load - RSS before it (first load of a spawn only); VmHWM delta: the load's "
          f"own peak - that RSS; fwd peak: VmHWM over one forward of {FWD_TOKENS} tokens - RSS before it ('-': none).")
    blocks = " + ".join(f"{real[k]} {m}" for k, m in spec.blocks if real[k])
    print(f"\n[2k] Projection to the real {blocks}, per rank (rank 0), from the MEASURED split (non-block: what the "
          f"file holds outside those lists, at its real size):")
    print(table(rows_p, ["weights", "mode", "per block MiB", "non-block MiB", "params GiB", "of tp1", "of whole",
                         "ideal 1/n"], "llrrrrrr"))
    print(f"per block: one block of each list ({' / '.join(m for _, m in spec.blocks)}); of whole: params / the whole "
          f"bf16 model counted from its shapes ({whole / 2**30:.2f} GiB, 2 bytes an element, fp32 buffers 4).")


if __name__ == "__main__":
    sys.exit(main())
