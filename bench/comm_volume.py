"""Bytes communicated per forward, per parallel axis, for Wan models: analytic formula vs measurement.

    python bench/comm_volume.py                      # Wan 1.3B + 14B, 480p + 720p, degrees 2/4/8
    python bench/comm_volume.py --measure-degrees 2,4  # also measure on 4 ranks (slower)
    python bench/comm_volume.py --no-measure         # formula only (instant)
    python bench/comm_volume.py --measure-weights bf16,Q4_K --weight-formats bf16,fp8,Q8_0,Q6_K,Q5_K,Q4_K

CONVENTION (the one that reproduces design.md's table)
    Bytes SENT BY ONE RANK (every rank of an axis sends the same amount) during ONE forward of ONE
    batch row (the cond or the uncond half, batch 1), activations in bf16 (2 bytes), GB = 1e9 bytes.
    This is also what parallel_backend.parallel.collectives.count_bytes() counts on each rank:
      all-to-all  : nbytes(local tensor) * (n-1)/n   (the part that leaves the rank)
      all-reduce  : 2 * nbytes * (n-1)/n             (ring all-reduce: reduce-scatter + all-gather)
      all-gather  : nbytes(local chunk) * (n-1)
      ring p2p    : nbytes of the K/V block passed to the next rank, per ring step
    Multiply by the degree for the bytes summed over all ranks of the axis (printed too).

    With S tokens, width D = heads x 128, L blocks, e = 2 bytes, degree n, context C = 512 tokens:
      Ulysses : per block 4 all-to-alls (q, k, v to head-sharded, output back), each of a local
                (S/n, D) tensor:                 4 * S*D*e * (n-1) / n^2
      Ring    : per block n-1 passes of the local K and V:   2 * S*D*e * (n-1) / n
      TP      : per block 3 all-reduces of the full (S, D) activation (self-attn out, cross-attn
                out, FFN down):                  3 * 2 * S*D*e * (n-1) / n
                + the distributed qk RMSNorm: one fp32 sum of squares per token for self q, k,
                  cross q (S tokens) and cross k (C tokens): 2 * 4 * (3S + C) * (n-1) / n
      CFG     : nothing inside the model (each replica runs its own rows; the result reaches the
                host through shared memory, not a collective)
      Outside the blocks, Ulysses and Ring gather the final projection (S/n, 64 = 16 ch x 1x2x2
      patch) back to the full sequence: S/n * 64 * e * (n-1).
      Sharded weights (shard_weights=True over n ranks, table [4]): every block is gathered whole once per
                forward, so a rank sends its 1/n of it to the n-1 others: W * (n-1) / n for W = all the
                blocks' weight bytes as held (bf16 2 B, fp8 1 B, GGUF its quantized bytes) -- parallel/
                traffic.weight_gather_bytes, independent of the tokens and of the batch rows; compared
                with TP's all-reduces (traffic.tensor_parallel_bytes), as auto mode (planner.choose_weights)
                does.
    design.md's anchors (Wan 14B 720p: S = 75600, D = 5120, L = 40) are the leading terms times L:
      Ulysses 4*S*D*e*L*(n-1)/n^2 = 31.0 / 23.2 / 13.5 GB at n = 2 / 4 / 8   (13.55 printed as 13.5)
      Ring    2*S*D*e*L*(n-1)/n   = 31.0 / 46.5 / 54.2 GB
      TP      6*S*D*e*L*(n-1)/n   = 92.9 / 139.4 / 162.6 GB (quoted 93 / 139 / 163)
    i.e. per rank, batch 1, bf16; the small terms (qk-norm sums, final gather) add < 0.1 %.
    Summed over all ranks they would be n times larger (62 / 93 / 108 GB for Ulysses), and an
    fp32 count twice as large, so neither of those is the convention behind the quoted numbers.

MEASURED
    parallel_backend.runtime.sharded_model.ShardedModel runs a real forward on CPU gloo ranks (NCCL GPUs with
    --device cuda) under collectives.count_bytes(), on a synthetic checkpoint with the real width,
    heads and FFN width of the named model but only --measure-blocks blocks, at two small latent
    sizes. Byte counters are snapshotted around the blocks, so per-block bytes and outside-block
    bytes are known separately. Both are affine in the token count, so a line through the two token
    counts, evaluated at the real token count, times the real layer count (plus the outside part)
    is the scaled measurement compared with the formula. The formula is also checked at the shape
    actually run (no scaling). Sharded weights ([2s]) run the same forward with shard_weights=True on
    bf16 and --measure-weights GGUF files (write_gguf_dit): the gathers' bytes counted in the real
    all-gathers equal model.sharded_weights.gathered_bytes() (padded shards) and, per block x the real
    block count, weight_gather_bytes of the full model.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from bench._common import gb, header, table, wan_file_header, write_fast_checkpoint  # noqa: E402
from parallel_backend.config import ConfigError, ModelShape, ParallelConfig, validate_for_model  # noqa: E402
from parallel_backend.models import wan  # noqa: E402
from parallel_backend.parallel.traffic import weight_gather_bytes  # noqa: E402
from parallel_backend.planner import FitCosts, auto_tp, block_weight_bytes, choose_weights  # noqa: E402
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes  # noqa: E402

AXES = ("ulysses", "ring", "tp", "cfg")
HEAD_DIM = 128
PATCH = (1, 2, 2)
CONTEXT_LEN = 512  # Wan's umt5 text context as ComfyUI passes it
MODELS = {"1.3b": "wan2.1-1.3b", "14b": "wan2.1-14b"}
# name -> (width, height, frames); latent = ((frames-1)/4+1, height/8, width/8); tokens after 1x2x2 patches
RESOLUTIONS = {"480p": (832, 480, 81), "720p": (1280, 720, 81)}
# design.md: Wan 14B, 720p, 75,600 tokens, one forward (GB)
DESIGN_ANCHORS = {"ulysses": {2: 31.0, 4: 23.2, 8: 13.5}, "ring": {2: 31.0, 4: 46.5, 8: 54.2},
                  "tp": {2: 93.0, 4: 139.0, 8: 163.0}}


@dataclass(frozen=True)
class Shape:
    """What the formula needs: model width and depth, tokens, context length, batch and dtype size."""
    dim: int
    heads: int
    ffn: int
    layers: int
    tokens: int
    ctx_len: int = CONTEXT_LEN
    batch: int = 1
    elt: int = 2
    out_patch: int = 16 * math.prod(PATCH)  # proj_out width: out channels x patch volume


def latent_grid(width: int, height: int, frames: int) -> tuple:
    """Wan VAE: 4x temporal (first frame kept), 8x spatial compression."""
    return ((frames - 1) // 4 + 1, height // 8, width // 8)


def grid_tokens(grid) -> int:
    return math.prod(-(-g // p) for g, p in zip(grid, PATCH))


def model_shape(preset: str, tokens: int, layers: int | None = None, **kw) -> Shape:
    p = WAN_PRESETS[preset]
    return Shape(p["dim"], p["dim"] // HEAD_DIM, p["ffn_dim"], layers or p["num_layers"], tokens,
                 out_patch=p["out_dim"] * math.prod(PATCH), **kw)


def invalid_reason(axis: str, degree: int, s: Shape) -> str | None:
    """Why this axis cannot take this degree on this model (the pack's own validation), or None."""
    cfg = ParallelConfig(world_size=degree, device="cpu", **{axis: degree})
    try:
        validate_for_model(cfg, ModelShape("wan", s.heads, HEAD_DIM, s.ffn, s.layers, 16, 16, PATCH))
    except ConfigError:
        return f"{s.heads} heads % {degree}"
    if axis in ("ulysses", "ring") and s.tokens % degree:
        return f"{s.tokens} tokens % {degree} (padded)"
    return None


def analytic(axis: str, n: int, s: Shape) -> dict:
    """Bytes one rank sends in one forward: {"per_block": {kind: bytes}, "outside": {kind: bytes}}."""
    S, D, e, B = s.tokens, s.dim, s.elt, s.batch
    per_block, outside = {}, {}
    if n > 1 and axis == "ulysses":
        per_block["all_to_all"] = 4 * B * (S // n) * D * e * (n - 1) // n
        outside["all_gather"] = B * (S // n) * s.out_patch * e * (n - 1)
    elif n > 1 and axis == "ring":
        per_block["ring_p2p"] = (n - 1) * 2 * B * (S // n) * D * e
        outside["all_gather"] = B * (S // n) * s.out_patch * e * (n - 1)
    elif n > 1 and axis == "tp":
        per_block["all_reduce"] = (3 * 2 * B * S * D * e * (n - 1) // n
                                   + 2 * B * (3 * S + s.ctx_len) * 4 * (n - 1) // n)
    return {"per_block": per_block, "outside": outside}


def total(parts: dict, layers: int) -> int:
    return layers * sum(parts["per_block"].values()) + sum(parts["outside"].values())


def leading_term(axis: str, n: int, s: Shape) -> int:
    """design.md's convention: the big per-block collective only, times the layer count."""
    S, D, e, L = s.tokens, s.dim, s.elt, s.layers
    return {"ulysses": 4 * S * D * e * L * (n - 1) / n**2, "ring": 2 * S * D * e * L * (n - 1) / n,
            "tp": 6 * S * D * e * L * (n - 1) / n, "cfg": 0}[axis]


# ---- measurement on real ranks ------------------------------------------------------------------

def _rank_measure(mesh0, jobs: list, points: list, precision: str) -> list:
    """On every rank: for each job (model file x axis config) load ShardedModel, run one forward per
    (latent grid, context length) point under count_bytes(), and record total and in-block bytes
    by collective kind."""
    from parallel_backend.parallel.collectives import count_bytes
    from parallel_backend.runtime.mesh import build_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    results = []
    for job in jobs:
        mesh = build_mesh(ParallelConfig(**job["config"]), mesh0.rank, mesh0.device)
        model = ShardedModel(mesh, job["path"], precision)
        blocks = model.model.blocks
        sw = model.sharded_weights  # sharded weights: the gathers' formula and the blocks' bytes as held, whole
        gathered = sw.gathered_bytes() if sw is not None else None
        unit_bytes = (sum(p.numel() * p.element_size() for _, u in sw.units for p in u.parameters())
                      if sw is not None else None)
        live, snaps = {}, {}
        hooks = [blocks[0].register_forward_pre_hook(lambda *_: snaps.__setitem__("start", dict(live["c"]))),
                 blocks[-1].register_forward_hook(lambda *_: snaps.__setitem__("end", dict(live["c"])))]
        for grid, ctx_len in points:
            g = torch.Generator().manual_seed(0)  # same inputs on every rank
            b = job["batch"]
            x = torch.randn(b, model.shape.in_channels, *grid, generator=g)
            ctx = torch.randn(b, ctx_len, 4096, generator=g)
            t = torch.full((b,), 500.0)
            with count_bytes() as counted:
                live["c"] = counted
                out = model.forward_rows(x, t, ctx)
            kinds = set(counted) | set(snaps["end"])
            in_blocks = {k: snaps["end"].get(k, 0) - snaps["start"].get(k, 0) for k in kinds}
            results.append({"name": job["name"], "grid": tuple(grid), "ctx": ctx_len, "total": dict(counted),
                            "gathered_formula": gathered, "unit_bytes": unit_bytes, "layers": len(blocks),
                            "blocks": in_blocks, "finite": None if out is None else bool(torch.isfinite(out).all())})
        for h in hooks:
            h.remove()
        del model, blocks
        gc.collect()
    return results


def measure(jobs: list, world: int, points: list, precision: str = "bf16", device: str = "cpu") -> dict:
    """Run `jobs` (dicts: name, path, config, batch) on `world` ranks at each (grid, context length)
    point; -> {(name, grid, ctx): rank-0 record}. Raises if ranks disagree (each rank of these axes
    must send the same bytes)."""
    from parallel_backend.testing.spmd import run_on_ranks

    base = ParallelConfig(world_size=world, ulysses=world, device=device, dtype=precision)
    per_rank = run_on_ranks(_rank_measure, base, jobs, points, precision, timeout=1800)
    out = {}
    for i, rec in enumerate(per_rank[0]):
        others = [r[i]["total"] for r in per_rank[1:]]
        if any(o != rec["total"] for o in others):
            raise AssertionError(f"ranks sent different bytes for {rec['name']}: {[rec['total'], *others]}")
        out[(rec["name"], rec["grid"], rec["ctx"])] = rec
    return out


def job(name: str, path: str, axis: str, degree: int, device: str, precision: str, batch: int = 1) -> dict:
    return {"name": name, "path": path, "batch": 2 * batch if axis == "cfg" else batch,
            "config": dict(world_size=degree, device=device, dtype=precision, **{axis: degree})}


def shard_job(preset: str, fmt: str, path: str, degree: int, device: str, precision: str) -> dict:
    """Sharded weights over `degree` ranks (with ulysses over the same ranks: the mesh needs an axis), named
    'preset/shardN@format'."""
    return {"name": f"{preset}/shard{degree}@{fmt}", "path": path, "batch": 1,
            "config": dict(world_size=degree, ulysses=degree, shard_weights=True, device=device, dtype=precision)}


def is_shard(name: str) -> bool:
    return "/shard" in name


def split_shard_name(name: str) -> tuple:
    """'wan2.1-14b/shard2@Q8_0' -> ('wan2.1-14b', 2, 'Q8_0')."""
    preset, rest = name.split("/")
    degree, fmt = rest[len("shard"):].split("@")
    return preset, int(degree), fmt


def sharded_vs_tp(preset: str, fmt: str, n: int, tokens: int, precision: str = "bf16") -> dict:
    """Per rank, per forward of one row: the weight gathers of sharded weights over n ranks (parallel/traffic.py's
    weight_gather_bytes of all the blocks' bytes as held -- what auto mode computes) and the all-reduces of tp=n at
    `tokens` (traffic.tensor_parallel_bytes; None where n does not divide the heads), and what auto mode picks on
    n ranks for a model that does not fit one device (planner.choose_weights)."""
    from parallel_backend.parallel.traffic import tensor_parallel_bytes, weight_gather_bytes

    p = WAN_PRESETS[preset]
    heads, layers, elt = p["dim"] // HEAD_DIM, p["num_layers"], 4 if precision == "fp32" else 2
    blocks = block_weight_bytes(wan_file_header(preset, fmt), wan, precision)
    gather = weight_gather_bytes(blocks, n)
    tp = tensor_parallel_bytes(tokens, p["dim"], layers, n, elt=elt) if heads % n == 0 else None
    # below this many tokens tp=n's all-reduces move fewer bytes than the gathers (TP bytes grow with the tokens)
    even = math.ceil(gather / tensor_parallel_bytes(1, p["dim"], layers, n, elt=elt)) if heads % n == 0 else None
    shard, _ = choose_weights("auto", n, heads, False, 1, FitCosts(blocks, p["dim"], layers, tokens, elt))
    return {"blocks": blocks, "gather": gather, "tp": tp, "break_even": even, "auto_shard": shard,
            "auto_tp": auto_tp(n, heads)}


def fit_and_scale(records: list, measured_blocks: int, tokens_real: int, layers_real: int,
                  ctx_real: int = CONTEXT_LEN) -> dict:
    """From three records [(tokens, ctx, record)] at (S1, C1), (S2, C1), (S1, C2): per-block and
    outside-block bytes fitted as a + b*tokens + c*context, evaluated at the real size; per-block
    bytes times the real layer count."""
    (s1, c1, r1), (s2, _, r2), (_, c2, r3) = records

    def parts(r):
        blk = sum(r["blocks"].values()) / measured_blocks
        return blk, sum(r["total"].values()) - blk * measured_blocks

    def fit(v1, v2, v3):
        b, c = (v2 - v1) / (s2 - s1), (v3 - v1) / (c2 - c1)
        return v1 + b * (tokens_real - s1) + c * (ctx_real - c1)

    (pb1, o1), (pb2, o2), (pb3, o3) = parts(r1), parts(r2), parts(r3)
    pb, o = fit(pb1, pb2, pb3), fit(o1, o2, o3)
    return {"per_block": pb, "outside": o, "total": pb * layers_real + o}


def split_name(name: str) -> tuple:
    """'wan2.1-14b/ulysses2' -> ('wan2.1-14b', 'ulysses', 2)."""
    preset, axcfg = name.split("/")
    axis = axcfg.rstrip("0123456789")
    return preset, axis, int(axcfg[len(axis):])


def measure_points(grids: list, contexts: list) -> list:
    """(S1, C1), (S2, C1), (S1, C2): enough for an affine fit in tokens and context length."""
    return [(grids[0], contexts[0]), (grids[1], contexts[0]), (grids[0], contexts[1])]


# ---- report -------------------------------------------------------------------------------------

LINK_GBIT = (25, 100, 400)


def cross_node_bytes(preset: str, tokens: int, nodes: int, per_node: int, elt: int = 2) -> dict:
    """Bytes crossing the node boundary per forward of one row, summed over a node's ranks, for each placement of
    `nodes` x `per_node` GPUs (Wan, bf16 activations): Ulysses over a node's GPUs x Ring over the nodes; CFG over
    2 nodes (each replica Ulysses inside its node(s)); pp over the nodes; Ulysses across every GPU."""
    p = WAN_PRESETS[preset]
    S, D, L, world = tokens, p["dim"], p["num_layers"], nodes * per_node
    out_latent = S * 16 * math.prod(PATCH) * 4  # the replica's output (fp32 latent) to node 0
    rows = {}
    # ring over the nodes: each rank holds S / world tokens and passes its K and V on (nodes - 1) times per block;
    # every hop crosses to the next node
    rows[f"ulysses{per_node} inside x ring{nodes} across"] = per_node * L * (nodes - 1) * 2 * (S // world) * D * elt
    if nodes == 2:  # cond on node 0, uncond on node 1: only node 1's output comes back
        rows[f"cfg2 across x ulysses{per_node} inside"] = out_latent
    # pp: one activation (S x D) per stage boundary per row, handed on by each rank of the stage
    rows[f"pp{nodes} across x ulysses{per_node} inside"] = (nodes - 1) * S * D * elt
    # ulysses over all GPUs: each all-to-all sends (world - 1) / world of a rank's (S / world, D) tensor, of which
    # the share addressed to other nodes, (world - per_node) / world, crosses
    a2a = 4 * L * (S // world) * D * elt * (world - per_node) / world
    rows[f"ulysses{world} across (no overlap)"] = per_node * a2a
    return rows


def pct(a: float, b: float) -> str:
    if b == 0:
        return "exact" if a == 0 else "inf"
    return f"{100 * (a - b) / b:+.2f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1.3b,14b", help=f"comma list of {list(MODELS)}")
    ap.add_argument("--resolutions", default="480p,720p", help=f"comma list of {list(RESOLUTIONS)}")
    ap.add_argument("--degrees", default="2,4,8", help="degrees for the analytic table")
    ap.add_argument("--measure-degrees", default="2", help="degrees to measure on real ranks ('' = none)")
    ap.add_argument("--no-measure", action="store_true", help="formula only")
    ap.add_argument("--measure-blocks", type=int, default=2)
    ap.add_argument("--measure-grids", default="2x4x4,4x4x4",
                    help="two latent T x H x W to run (their token counts must divide the degrees)")
    ap.add_argument("--measure-contexts", default="8,16",
                    help="two text context lengths to run (the full 512 makes bf16 CPU matmuls slow)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--measure-weights", default="bf16,Q8_0",
                    help="weight formats whose sharded-weights gathers are measured (bf16, or GGUF types converted "
                         "with write_gguf_dit; '' = none)")
    ap.add_argument("--weight-formats", default="bf16,fp8,Q8_0,Q4_K",
                    help="weight formats of the analytic sharded-weights vs TP table")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="ranks' device; auto = cuda when enough GPUs, else cpu/gloo")
    args = ap.parse_args(argv)

    models = [MODELS[m.strip().lower()] for m in args.models.split(",") if m.strip()]
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    degrees = [int(d) for d in args.degrees.split(",") if d.strip()]
    mdegrees = [] if args.no_measure else [int(d) for d in args.measure_degrees.split(",") if d.strip()]
    grids = [tuple(int(v) for v in g.split("x")) for g in args.measure_grids.split(",")]
    mweights = [w.strip() for w in args.measure_weights.split(",") if w.strip()]
    wformats = [w.strip() for w in args.weight_formats.split(",") if w.strip()]
    contexts = [int(c) for c in args.measure_contexts.split(",")]
    if len(grids) != 2 or len(contexts) != 2 or grid_tokens(grids[0]) == grid_tokens(grids[1]) or \
            contexts[0] == contexts[1]:
        ap.error("--measure-grids and --measure-contexts need two different values each")
    elt = 2 if args.precision == "bf16" else 4
    if mdegrees:
        want = max(mdegrees)
        device = args.device if args.device != "auto" else (
            "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= want else "cpu")
    else:
        device = "none"

    header("Communication volume per forward, per parallel axis (Wan DiT)")
    print(f"Convention: bytes SENT BY ONE RANK in one forward of one batch row (cond or uncond), {args.precision} "
          f"activations ({elt} B), GB = 1e9 B; 'all ranks' = x degree. CFG: batch of 2 rows (cond+uncond),")
    print(f"one per replica. Context {CONTEXT_LEN} text tokens. Formulas in this script's docstring.\n")

    # ---- 1. design.md anchors
    s14 = model_shape("wan2.1-14b", grid_tokens(latent_grid(*RESOLUTIONS["720p"])), elt=2)
    rows = []
    for axis, anchors in DESIGN_ANCHORS.items():
        for n, ref in anchors.items():
            lead, full = leading_term(axis, n, s14), total(analytic(axis, n, s14), s14.layers)
            rel = 100 * (lead / 1e9 - ref) / ref
            rows.append([axis, n, f"{ref:.1f}", f"{lead / 1e9:.2f}", f"{full / 1e9:.2f}", f"{rel:+.2f}%",
                         "agree" if abs(rel) < 1.0 else "DISAGREE", f"{n * full / 1e9:.1f}"])
    print(f"[1] design.md anchors: Wan 14B 720p ({s14.tokens} tokens, {s14.layers} blocks, dim {s14.dim}), "
          f"bf16, per rank")
    print(table(rows, ["axis", "n", "design GB", "leading GB", "analytic GB", "lead vs design", "verdict",
                       "all ranks GB"]))
    print("leading = the big per-block collective only (design.md's count); analytic adds qk-norm sums and the "
          "final gather.\n")

    # ---- 2. measurement
    measured, mtime = {}, 0.0
    points = measure_points(grids, contexts)
    if mdegrees:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pdit_bench_comm_") as tmp:
            paths, wpaths = {}, {}
            for preset in models:
                cfg = {**WAN_PRESETS[preset], "num_layers": args.measure_blocks}
                paths[preset] = write_fast_checkpoint(os.path.join(tmp, f"{preset}.safetensors"), wan_shapes(**cfg),
                                                      dtype=torch.bfloat16)
                for fmt in mweights:  # the files sharded weights are measured on
                    if fmt == "bf16":
                        wpaths[preset, fmt] = paths[preset]
                    else:
                        from parallel_backend.testing.gguf_files import write_gguf_dit
                        wpaths[preset, fmt] = os.path.join(tmp, f"{preset}_{fmt}.gguf")
                        write_gguf_dit(paths[preset], wpaths[preset, fmt], fmt)
            for n in mdegrees:
                jobs = []
                for preset in models:
                    small = model_shape(preset, math.lcm(*[grid_tokens(g) for g in grids]), args.measure_blocks)
                    for axis in AXES:
                        if invalid_reason(axis, n, small) is None and not (axis == "cfg" and n > 2):
                            jobs.append(job(f"{preset}/{axis}{n}", paths[preset], axis, n, device, args.precision))
                    if invalid_reason("ulysses", n, small) is None:
                        jobs += [shard_job(preset, fmt, wpaths[preset, fmt], n, device, args.precision)
                                 for fmt in mweights]
                measured.update(measure(jobs, n, points, args.precision, device))
        mtime = time.perf_counter() - t0

        rows, worst = [], 0.0
        for (name, grid, ctx_len), rec in sorted(measured.items()):
            if is_shard(name):
                continue
            preset, axis, n = split_name(name)
            s = model_shape(preset, grid_tokens(grid), args.measure_blocks, elt=elt, ctx_len=ctx_len,
                            batch=2 if axis == "cfg" else 1)
            an = analytic(axis, n, s)
            a_tot, m_tot = total(an, s.layers), sum(rec["total"].values())
            a_blk, m_blk = s.layers * sum(an["per_block"].values()), sum(rec["blocks"].values())
            if a_tot:
                worst = max(worst, abs(m_tot - a_tot) / a_tot)
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(rec["total"].items()) if v) or "-"
            rows.append([preset, axis, n, "x".join(map(str, grid)), s.tokens, ctx_len, a_blk, m_blk, a_tot, m_tot,
                         pct(m_tot, a_tot), kinds, "yes" if rec["finite"] in (True, None) else "NO"])
        print(f"[2] MEASURED at the shape actually run: ShardedModel forward on {device} ranks "
              f"({'nccl' if device == 'cuda' else 'gloo'}), {args.precision}, synthetic checkpoints with the real "
              f"width/heads/ffn and {args.measure_blocks} blocks.\n    Bytes per rank (rank 0; every rank sent the "
              f"same); 'blk' = inside the blocks (counter snapshotted around them).")
        print(table(rows, ["model", "axis", "n", "latent", "tokens", "ctx", "analytic blk B", "measured blk B",
                           "analytic B", "measured B", "diff", "measured by kind", "finite out"],
                    "llrlrrrrrrrll"))
        print(f"worst |measured - analytic| / analytic at the measured shapes: {100 * worst:.4f}%   "
              f"(measurement wall time incl. writing the files and spawning ranks: {mtime:.0f} s)\n")

        rows = []
        for (name, grid, ctx_len), rec in sorted(measured.items()):
            if not is_shard(name):
                continue
            preset, n, fmt = split_shard_name(name)
            got, formula = rec["total"].get("weight_gather", 0), rec["gathered_formula"]
            ideal = weight_gather_bytes(rec["unit_bytes"], n)
            others = ", ".join(f"{k} {v}" for k, v in sorted(rec["total"].items()) if v and k != "weight_gather")
            rows.append([preset, fmt, n, "x".join(map(str, grid)), grid_tokens(grid), ctx_len, rec["unit_bytes"],
                         got, formula, "yes" if got == formula else "NO", int(ideal), pct(got, ideal), others or "-",
                         "yes" if rec["finite"] in (True, None) else "NO"])
        if rows:
            print(f"[2s] MEASURED sharded weights: the same forward with shard_weights=True (ulysses over the same n "
                  f"ranks), {args.measure_blocks}-block files, rank 0. weight_gather =\n     count_bytes()"
                  f"['weight_gather'] (what FSDP's all-gathers moved out of the rank); formula = "
                  f"model.sharded_weights.gathered_bytes() (its padded shard\n     of every block x (n-1)); "
                  f"traffic = weight_gather_bytes(blocks' bytes as held, n) = blocks x (n-1)/n, what auto mode uses.")
            print(table(rows, ["model", "weights", "n", "latent", "tokens", "ctx", "blocks B", "weight_gather B",
                               "formula B", "equal", "traffic B", "vs traffic", "other kinds (ulysses)", "finite out"],
                        "llrlrrrrrlrrll"))
            print("The gathers do not depend on the tokens or the context: the same bytes at every latent.\n")

    # ---- 3. full-size table
    if mdegrees:
        (g1, c1), (g2, _), (_, c2) = points
        print(f"[3] One forward at full size, per rank (GB). MEASURED is SCALED: per-block bytes measured on the "
              f"{args.measure_blocks}-block files at\n    (tokens, context) = ({grid_tokens(g1)}, {c1}), "
              f"({grid_tokens(g2)}, {c1}), ({grid_tokens(g1)}, {c2}) are fitted as a + b x tokens + c x context, "
              f"evaluated at the real\n    token count and {CONTEXT_LEN} context tokens, x the real layer count, "
              f"+ the outside-block bytes (final gather) fitted the same way.")
    else:
        print("[3] One forward at full size, per rank (GB); no measurement requested.")
    for preset in models:
        for res in resolutions:
            grid = latent_grid(*RESOLUTIONS[res])
            s = model_shape(preset, grid_tokens(grid), elt=elt)
            rows = []
            for axis in AXES:
                for n in degrees:
                    if axis == "cfg" and n > 2:
                        continue  # two rows (cond, uncond): a cfg degree above 2 only idles ranks
                    why = invalid_reason(axis, n, s)
                    if why:
                        rows.append([axis, n, "n/a", "", "", "", why])
                        continue
                    a = total(analytic(axis, n, replace(s, batch=2 if axis == "cfg" else 1)), s.layers)
                    m_cell = diff = ""
                    recs = [(grid_tokens(g), c, measured.get((f"{preset}/{axis}{n}", g, c))) for g, c in points]
                    if mdegrees and all(r is not None for *_, r in recs):
                        m = fit_and_scale(recs, args.measure_blocks, s.tokens, s.layers)["total"]
                        m_cell, diff = gb(m), pct(m, a)
                    rows.append([axis, n, gb(a), gb(n * a), m_cell, diff, ""])
            w, h, f = RESOLUTIONS[res]
            print(f"\n{preset} ({s.layers} blocks, dim {s.dim}, {s.heads} heads), {res} {w}x{h} {f} frames -> latent "
                  f"{'x'.join(map(str, grid))} -> {s.tokens} tokens")
            print(table(rows, ["axis", "n", "ANALYTIC", "all ranks", "MEASURED", "meas vs an", "note"], "lrrrrrl"))
    # ---- 4. sharded weights vs TP
    res_tokens = {res: grid_tokens(latent_grid(*RESOLUTIONS[res])) for res in resolutions}
    print("\n[4] Sharded weights vs TP, per rank, one forward of one row (GB). ANALYTIC gather = parallel/traffic."
          "weight_gather_bytes(all blocks' weight bytes as\n    held, n) = blocks x (n-1)/n, independent of the "
          "latent; TP = traffic.tensor_parallel_bytes at tp = n (the leading all-reduce term of [3]'s tp rows).\n"
          "    MEASURED = [2s]'s weight_gather per block x the real block count (sharded weights x n on CPU ranks). "
          "fewer: which moves fewer bytes on the same n ranks;\n    auto: what planner.choose_weights picks on n "
          "ranks for a model that does not fit one device (it weighs the gathers against its own tp degree, "
          "given).")
    for preset in models:
        p = WAN_PRESETS[preset]
        rows = []
        for fmt in wformats:
            for n in degrees:
                if n < 2:
                    continue
                cmp = {res: sharded_vs_tp(preset, fmt, n, res_tokens[res], args.precision) for res in resolutions}
                first = cmp[resolutions[0]]
                m_cell = diff = ""
                recs = [r for (name, _, _), r in measured.items() if name == f"{preset}/shard{n}@{fmt}"]
                if recs:
                    m = recs[0]["total"].get("weight_gather", 0) / recs[0]["layers"] * p["num_layers"]
                    m_cell, diff = gb(m), pct(m, first["gather"])
                row = [fmt, n, gb(first["blocks"]), gb(first["gather"]), m_cell, diff,
                       "" if first["break_even"] is None else first["break_even"]]
                for res in resolutions:
                    c = cmp[res]
                    row.append("n/a" if c["tp"] is None else gb(c["tp"]))
                for res in resolutions:
                    c = cmp[res]
                    row.append("sharded" if c["tp"] is None or c["gather"] <= c["tp"] else "tp")
                for res in resolutions:
                    c = cmp[res]
                    row.append("sharded" if c["auto_shard"] else f"tp{c['auto_tp']}")
                rows.append(row)
        print(f"\n{preset} ({p['num_layers']} blocks, dim {p['dim']}, {p['dim'] // HEAD_DIM} heads), "
              + ", ".join(f"{res} {res_tokens[res]} tokens" for res in resolutions))
        print(table(rows, ["weights", "n", "blocks GB", "GATHER", "MEASURED", "meas vs an", "TP fewer below"]
                    + [f"TP {res}" for res in resolutions] + [f"fewer {res}" for res in resolutions]
                    + [f"auto {res}" for res in resolutions], "lr" + "r" * (5 + len(resolutions)) + "l" * (
                        2 * len(resolutions))))
    print("blocks GB: the transformer blocks' weights as the ranks hold them (weights/reads.held_bytes: fp8 1 byte, "
          "GGUF quantized, the rest at the compute precision;\nfp8 = every 2+-dim weight fp8, GGUF = "
          "write_gguf_dit's per-tensor rule). TP fewer below: the token count under which tp=n's all-reduces "
          "move fewer bytes than the gathers\n(a 480p 81-frame latent has 32760). auto 'tpK': auto mode keeps the "
          "weights replicated and splits them by tp=K.\nA CFG-batched forward (2 rows) doubles TP's bytes, not the "
          "gathers'; Ulysses / Ring bytes of a sequence axis over the same ranks ([3]) come on top of either.")

    # ---- 5. bytes across nodes, per placement
    print("\n[5] Bytes that cross between NODES per forward (one row; GB summed over the node's ranks), by placement, "
          "and the time they take on a link of\n    25 / 100 / 400 Gbit/s (bytes / link rate; Ring's exchanges overlap "
          "the attention they feed, so its time is a ceiling, the others' a floor).")
    for preset in models:
        p = WAN_PRESETS[preset]
        rows = []
        for res in resolutions:
            for nodes, per_node in ((2, 8), (4, 8)):
                for name, bytes_ in cross_node_bytes(preset, res_tokens[res], nodes, per_node).items():
                    rows.append([res, f"{nodes} x {per_node}", name, gb(bytes_)]
                                + [f"{bytes_ * 8 / (rate * 1e9):.2f}" for rate in LINK_GBIT])
        print(f"\n{preset} ({p['num_layers']} blocks, dim {p['dim']})")
        print(table(rows, ["latent", "nodes x GPUs", "placement", "across GB"] + [f"s @ {r} Gbit/s" for r in LINK_GBIT],
                    "lllr" + "r" * len(LINK_GBIT)))
    print("Ulysses inside a node is free across the link; Ring across nodes passes each rank's K / V chunk to the next "
          "node (every rank of a node at once); CFG across\nnodes moves only the replica's output (the latent); "
          "pp across nodes one activation per boundary per row. Ulysses across nodes moves as many bytes or fewer, "
          "but\nits all-to-alls cannot overlap compute and wait for the slowest link, where Ring's passes overlap the "
          "attention they feed: Ulysses inside, Ring / CFG / pp across.")

    print("\nCFG row: batch 2 (cond + uncond) split over the cfg replicas; no collective inside the model. "
          "Ulysses / Ring / TP rows: batch 1;\na CFG-batched forward without a cfg axis carries 2 rows and moves twice "
          "these bytes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
