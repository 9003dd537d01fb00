"""Bytes communicated per forward, per parallel axis, for Wan models: analytic formula vs measurement.

    python bench/comm_volume.py                      # Wan 1.3B + 14B, 480p + 720p, degrees 2/4/8
    python bench/comm_volume.py --measure-degrees 2,4  # also measure on 4 ranks (slower)
    python bench/comm_volume.py --no-measure         # formula only (instant)
    python bench/comm_volume.py --measure-weights bf16,Q4_K --weight-formats bf16,fp8,Q8_0,Q6_K,Q5_K,Q4_K
    python bench/comm_volume.py --families all      # the other families' layouts beside Wan's formula (below)

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

OTHER FAMILIES (--families ltxv,ltxav,minimax,hunyuan_video,kandinsky5,cosmos,cosmos1 or all; needs the host's
    ComfyUI at $COMFYUI_PATH, families whose class it lacks are skipped) run each family's tiny synthetic file
    (testing.synthetic write_tiny_<family>) on 2 CPU gloo ranks under ulysses2, ring2 and tp2, bf16, one row, at three
    (video tokens S, added tokens E) points, E being what the layout adds beside the split video: the text (whole on
    every rank in HunyuanVideo's joint attention), LTX-2's audio stream (split, with its a2v / v2a K/V gathers),
    MiniMax's text + audio rows (one packed split sequence). Bytes are counted per block (SHARD_UNITS' blocks) and
    outside, and set beside this file's Wan formula at the same width, video tokens and split blocks ([F1]). [F2]
    PROJECTS (does not measure) the in-block bytes to each family's real width, block count and a stated 720p-ish
    latent from the fitted per-token slopes. docs/performance.md has the table.
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


# ---- other families: their attention layouts' bytes beside Wan's formula (--families) ---------------------------

@dataclass(frozen=True)
class Family:
    """One family's tiny measurement and its real sizes. `units`: (block container, preset key of its count, whether
    it runs on the split tokens as Wan's blocks do) in the family's SHARD_UNITS order; `grids`: two latent grids of
    different video token counts and `extras` two lengths of the stream the layout adds (`extra`: the text; LTX-2:
    its audio; MiniMax: text + audio rows, one packed sequence), run as three points; `reals`: (preset, 720p-ish
    latent grid, extra length, what they are) to project to; `attn_width`: (tiny, real) attention widths where they
    are not the widths (MiniMax: heads x head dim)."""
    writer: str
    presets: str
    width: str
    units: tuple
    channels: int
    patch: tuple
    grids: tuple
    extras: tuple
    extra: str
    reals: tuple
    host_file: str
    layout: str
    attn_width: tuple | None = None


_TWO = ((2, 2, 2), (4, 2, 2))  # 8 and 16 video tokens at patch 1 x 1 x 1
_TWO_P2 = ((2, 4, 4), (4, 4, 4))  # 8 and 16 video tokens at patch 1 x 2 x 2
_WAN_LIKE = "video split, text cross-attention whole (as Wan)"
FAMILIES = {
    "ltxv": Family("write_tiny_ltxv", "LTXV_PRESETS", "width", (("transformer_blocks", "num_layers", True),), 128,
                   (1, 1, 1), _TWO, (8, 16), "text",
                   (("ltxv-13b", (16, 22, 40), 128, "1280x704, 121 frames (32x32x8 VAE), 128 T5 tokens"),),
                   "comfy/ldm/lightricks/model.py", _WAN_LIKE),
    "ltxav": Family("write_tiny_ltxav", "LTXAV_PRESETS", "width", (("transformer_blocks", "num_layers", True),), 128,
                    (1, 1, 1), _TWO, (4, 8), "audio",
                    (("ltx-2-19b", (16, 22, 40), 126, "1280x704, 121 frames; 126 audio tokens (5 s x 25 / s)"),),
                    "comfy/ldm/lightricks/av_model.py",
                    "video and audio split; a2v / v2a cross-attention gathers the other stream's K/V whole"),
    "minimax": Family("write_tiny_minimax", "MINIMAX_PRESETS", "hidden", (("blocks", "num_layers", True),), 24,
                      (1, 2, 2), _TWO_P2, (22, 30), "text+audio",
                      (("minimax-h3", (37, 48, 84), 926, "1344x768, 124 frames (16x16, 17k+5 -> 5k+2 VAE); 512 text "
                        "(assumed) + 414 audio rows (5.2 s x 40 / s x 2)"),),
                      "comfy/ldm/minimax/model.py", "one packed sequence [text | audio | video] split whole",
                      attn_width=(384, 7168)),
    "hunyuan_video": Family("write_tiny_hunyuan_video", "HUNYUAN_PRESETS", "hidden",
                            (("double_blocks", "depth", True), ("single_blocks", "single", True)), 65, (1, 1, 1),
                            _TWO, (8, 16), "text",
                            (("hunyuan-video-1.5", (31, 45, 80), 256, "1280x720, 121 frames (16x16x4 VAE), patch 1; "
                              "256 text tokens (assumed) + the tiny's 4 ByT5"),
                             ("hunyuan-video-1.0", (33, 45, 80), 256, "1280x720, 129 frames (8x8x4 VAE), patch 2x2; "
                              "256 text tokens")),
                            "comfy/ldm/hunyuan_video/model.py", "image split, text whole on every rank (joint)"),
    "kandinsky5": Family("write_tiny_kandinsky5", "KANDINSKY5_PRESETS", "model_dim",
                         (("text_transformer_blocks", "text_blocks", False),
                          ("visual_transformer_blocks", "visual_blocks", True)), 33, (1, 2, 2), _TWO_P2, (8, 16),
                         "text", (("kandinsky5-lite-video", (31, 90, 160), 256, "1280x720, 121 frames (8x8x4 VAE); "
                                   "256 text tokens (assumed)"),
                                  ("kandinsky5-pro-video", (31, 90, 160), 256, "the same")),
                         "comfy/ldm/kandinsky5/model.py", "each frame's plane split, text blocks whole"),
    "cosmos": Family("write_tiny_cosmos", "COSMOS_PRESETS", "model_channels", (("blocks", "num_blocks", True),), 16,
                     (1, 2, 2), _TWO_P2, (8, 16), "text",
                     (("cosmos-predict2-14b-t2i", (24, 88, 160), 512, "1280x704, 93 frames (Wan 2.1 VAE); 512 T5"),),
                     "comfy/ldm/cosmos/predict2.py", _WAN_LIKE),
    "cosmos1": Family("write_tiny_cosmos1", "COSMOS1_PRESETS", "model_channels", (("blocks", "num_blocks", True),),
                      16, (1, 2, 2), _TWO_P2, (8, 16), "text",
                      (("cosmos-1.0-14b-t2w", (16, 88, 160), 512, "1280x704, 121 frames (8x8x8 tokenizer); 512 T5"),),
                      "comfy/ldm/cosmos/model.py", _WAN_LIKE),
}
FAMILY_AXES = ("ulysses", "ring", "tp")


def family_preset(name: str, preset: str = "tiny") -> dict:
    from parallel_backend.testing import synthetic

    return getattr(synthetic, FAMILIES[name].presets)[preset]


def family_points(fam: Family) -> list:
    """(S1, E1), (S2, E1), (S1, E2): enough for an affine fit in the video tokens and the added stream."""
    return [(fam.grids[0], fam.extras[0]), (fam.grids[1], fam.extras[0]), (fam.grids[0], fam.extras[1])]


def host_root() -> str | None:
    """The ComfyUI folder the ranks import: $COMFYUI_PATH, else the one already on sys.path (none: None)."""
    import importlib.util

    if os.environ.get("COMFYUI_PATH"):
        return os.environ["COMFYUI_PATH"]
    spec = importlib.util.find_spec("comfy")
    return os.path.dirname(list(spec.submodule_search_locations)[0]) if spec else None


def host_has(name: str) -> bool:
    """Whether that ComfyUI has the family's class (its file, read without importing ComfyUI)."""
    root = host_root()
    return root is not None and os.path.isfile(os.path.join(root, FAMILIES[name].host_file))


def family_inputs(name: str, grid: tuple, extra: int, g):
    """(x, timestep, context, conds) of one row as the family's native parity test builds it (inside a rank: LTX-2
    and MiniMax pack their two latents with ComfyUI's own pack_latents)."""
    fam = FAMILIES[name]
    x = torch.randn(1, fam.channels, *grid, generator=g)
    text = {"text": extra, "text+audio": extra - 14}.get(fam.extra, 12)  # MiniMax: 14 audio rows below
    if name in ("ltxav", "minimax"):
        import comfy.utils

        audio = torch.randn(1, 8, extra, 16, generator=g) if name == "ltxav" else torch.randn(1, 32, 2, 7, generator=g)
        x, shapes = comfy.utils.pack_latents([x, audio])
        shapes = [tuple(s) for s in shapes]
    if name == "ltxav":
        t = torch.tensor([0.7])
        return x, t, torch.randn(1, text, 64, generator=g), {"a_timestep": t, "latent_shapes": shapes,
                                                             "frame_rate": 24}
    if name == "minimax":
        return x, torch.tensor([700.0]), torch.randn(1, text, 96, generator=g), {
            "latent_shapes": shapes, "minimax_payload": {"seed": 3, "audio_scale": 1.0}}
    ctx_width, t = {"ltxv": (4096, 0.7), "hunyuan_video": (64, 0.7), "kandinsky5": (3584, 700.0),
                    "cosmos": (1024, 0.8), "cosmos1": (1024, 0.6)}[name]
    ctx = torch.randn(1, text, ctx_width, generator=g)
    conds = {"ltxv": lambda: {"frame_rate": 24},
             "hunyuan_video": lambda: {"txt_byt5": torch.randn(1, 4, 1472, generator=g)},  # joins the text: 4 more
             "kandinsky5": lambda: {"y": torch.randn(1, 768, generator=g)}}.get(name, dict)()
    return x, torch.tensor([t]), ctx, conds


def _unit_hooks(model, units: tuple, live: dict, acc: dict) -> list:
    """Hooks that add the bytes each block of each unit sent to acc[unit] (counter snapshotted around each block)."""
    hooks = []
    for unit in units:
        for block in model.get_submodule(unit).children():
            def pre(*_):
                live["snap"] = sum(live["c"].values())

            def post(*_, unit=unit):
                acc[unit] = acc.get(unit, 0) + sum(live["c"].values()) - live["snap"]
            hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return hooks


def _rank_families(mesh0, jobs: list, precision: str) -> list:
    """On every rank: for each job (family file x axis) one forward per (grid, extra) point under count_bytes();
    the bytes by kind in all and per block unit."""
    from parallel_backend.parallel.collectives import count_bytes
    from parallel_backend.runtime.mesh import build_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    results = []
    for job in jobs:
        mesh = build_mesh(ParallelConfig(**job["config"]), mesh0.rank, mesh0.device)
        model = ShardedModel(mesh, job["path"], precision)
        units = [u for u, _, _ in FAMILIES[job["family"]].units]
        live, acc = {}, {}
        hooks = _unit_hooks(model.model, units, live, acc)
        for grid, extra in family_points(FAMILIES[job["family"]]):
            x, t, ctx, conds = family_inputs(job["family"], grid, extra, torch.Generator().manual_seed(0))
            acc.clear()
            with count_bytes() as counted:
                live["c"] = counted
                out = model.forward_rows(x, t, ctx, **conds)
            results.append({"name": job["name"], "grid": grid, "extra": extra, "total": dict(counted),
                            "units": dict(acc), "finite": None if out is None else bool(torch.isfinite(out).all())})
        for h in hooks:
            h.remove()
        del model
        gc.collect()
    return results


def family_jobs(tmp: str, names: list, axes=FAMILY_AXES, precision: str = "bf16") -> list:
    """Write each family's tiny file, one job per axis at degree 2 (every tiny model's heads divide by 2)."""
    from parallel_backend.testing import synthetic

    jobs = []
    for name in names:
        fam = FAMILIES[name]
        path = getattr(synthetic, fam.writer)(os.path.join(tmp, f"tiny_{name}.safetensors"))
        jobs += [{"name": f"{name}/{axis}2", "family": name, "path": path,
                  "config": dict(world_size=2, device="cpu", dtype=precision, **{axis: 2})} for axis in axes]
    return jobs


def measure_families(jobs: list, precision: str = "bf16") -> dict:
    """-> {(job name, grid, extra): rank-0 record}; raises where the two ranks sent different bytes."""
    from parallel_backend.testing.spmd import run_on_ranks

    base = ParallelConfig(world_size=2, ulysses=2, device="cpu", dtype=precision)
    per_rank = run_on_ranks(_rank_families, base, jobs, precision, timeout=1800)
    out = {}
    for rec, other in zip(*per_rank):
        if (rec["total"], rec["units"]) != (other["total"], other["units"]):
            raise AssertionError(f"ranks sent different bytes for {rec['name']}: {rec} vs {other}")
        out[(rec["name"], rec["grid"], rec["extra"])] = rec
    return out


def family_split_tokens(name: str, grid: tuple) -> int:
    return math.prod(-(-g // p) for g, p in zip(grid, FAMILIES[name].patch))


def _affine(name: str, values: list) -> tuple:
    """(v at the first point, slope per video token, slope per extra token) from the three family_points values."""
    fam = FAMILIES[name]
    (g1, e1), (g2, _), (_, e2) = family_points(fam)
    s1, s2 = family_split_tokens(name, g1), family_split_tokens(name, g2)
    v1, v2, v3 = values
    return v1, (v2 - v1) / (s2 - s1), (v3 - v1) / (e2 - e1)


def family_blocks_real(name: str, recs: list, axis: str, real: tuple) -> float:
    """PROJECTED in-block bytes of one forward at a real size `real` (a Family.reals entry): per block of each unit
    fitted a + b*S + c*E on the tiny records, evaluated at the real video tokens and extra length, times the real
    width ratio (the attention width for Ulysses / Ring where it differs: every collective of these blocks moves
    activations of that width) and the real block count."""
    fam, tiny, big = FAMILIES[name], family_preset(name), family_preset(name, real[0])
    g1, e1 = family_points(fam)[0]
    ds, de = family_split_tokens(name, real[1]) - family_split_tokens(name, g1), real[2] - e1
    scale = big[fam.width] / tiny[fam.width]
    if fam.attn_width and axis != "tp":
        scale = fam.attn_width[1] / fam.attn_width[0]
    out = 0.0
    for unit, key, _ in fam.units:
        v1, bs, be = _affine(name, [r["units"].get(unit, 0) / tiny[key] for r in recs])
        out += (v1 + bs * ds + be * de) * scale * big[key]
    return out


def wan_blocks(name: str, axis: str, grid: tuple, extra: int, preset: str = "tiny") -> int:
    """Wan's analytic in-block bytes at the family's width, video tokens and split block count (one row, bf16, the
    family's text as Wan's context; where E is more than the text (LTX-2, MiniMax) 12 tokens at the tiny size and Wan's
    512 at the real one: only TP's qk-norm sums read it)."""
    fam, p = FAMILIES[name], family_preset(name, preset)
    layers = sum(p[key] for _, key, split in fam.units if split)
    ctx_len = extra if fam.extra == "text" else (12 if preset == "tiny" else CONTEXT_LEN)
    s = Shape(p[fam.width], max(1, p[fam.width] // HEAD_DIM), 4 * p[fam.width], layers,
              family_split_tokens(name, grid), ctx_len=ctx_len)
    return layers * sum(analytic(axis, 2, s)["per_block"].values())


def family_records(measured: dict, name: str, axis: str) -> list | None:
    recs = [measured.get((f"{name}/{axis}2", g, e)) for g, e in family_points(FAMILIES[name])]
    return None if any(r is None for r in recs) else recs


def family_tiny_rows(measured: dict, names: list) -> list:
    """Per family x axis at the first point: measured in-block and outside bytes, Wan's formula, the slopes."""
    rows = []
    for name in names:
        fam = FAMILIES[name]
        g1, e1 = family_points(fam)[0]
        for axis in FAMILY_AXES:
            recs = family_records(measured, name, axis)
            if recs is None:
                continue
            blk, bs, be = _affine(name, [sum(r["units"].values()) for r in recs])
            wan, ws, we = _affine(name, [wan_blocks(name, axis, g, e) for g, e in family_points(fam)])
            out = sum(recs[0]["total"].values()) - blk
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(recs[0]["total"].items()) if v)
            rows.append([name, f"{axis}2", family_split_tokens(name, g1), f"{fam.extra} {e1}", blk, wan,
                         f"{blk / wan:.2f}" if wan else "-", f"{bs:g}", f"{ws:g}", f"{be:g}", f"{we:g}", out, kinds])
    return rows


def family_real_rows(measured: dict, names: list) -> list:
    """Per family x real preset: Wan's formula and the projected bytes of each axis (GB) with their ratio to Wan."""
    rows = []
    for name in names:
        fam = FAMILIES[name]
        for real in fam.reals:
            p = family_preset(name, real[0])
            row = [name, real[0], p[fam.width], "+".join(str(p[k]) for _, k, _ in fam.units),
                   family_split_tokens(name, real[1]), f"{fam.extra} {real[2]}"]
            for axis in FAMILY_AXES:
                recs = family_records(measured, name, axis)
                wan = wan_blocks(name, axis, real[1], real[2], real[0])
                proj = None if recs is None else family_blocks_real(name, recs, axis, real)
                row += [gb(wan), "-" if proj is None else gb(proj), "-" if proj is None else f"{proj / wan:.2f}"]
            rows.append(row)
    return rows


def host_version() -> str:
    import re

    try:
        with open(os.path.join(host_root() or "", "comfyui_version.py")) as f:
            return re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read()).group(1)
    except (OSError, AttributeError):
        return "unknown"


def families_main(names: list, axes: tuple = FAMILY_AXES) -> int:
    """--families: measure each family's tiny file on 2 CPU gloo ranks, print it beside Wan's formula."""
    have = [n for n in names if host_has(n)]
    skipped = sorted(set(names) - set(have))
    header("Communication volume per forward, other families' layouts beside Wan's formula (2 CPU gloo ranks)")
    print(f"ComfyUI {host_version()} at {host_root()}; skipped (class not in this host): {', '.join(skipped) or '-'}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pdit_bench_comm_fam_") as tmp:
        measured = measure_families(family_jobs(tmp, have, axes))
    print(f"measured in {time.perf_counter() - t0:.0f} s (writing the files, spawning 2 ranks, {len(measured)} "
          f"forwards); both ranks sent the same bytes in every forward (checked)\n")
    for name in have:
        print(f"  {name:14s} {FAMILIES[name].layout}")
    print("\n[F1] MEASURED, tiny synthetic files (testing.synthetic presets 'tiny'), bf16, one forward of one row, "
          "bytes SENT BY ONE RANK. blk = inside the\n     transformer blocks (counter snapshotted around each block), "
          "out = outside them (the final gather). Wan = this script's analytic() per block x the\n     family's split "
          "blocks, at the family's width and VIDEO tokens S (its text as Wan's context). /S, /E: bytes per block-set "
          "per video token and per\n     token of the stream the layout adds (E: text, LTX-2: audio), from the three "
          "runs (S1,E1) (S2,E1) (S1,E2).")
    print(table(family_tiny_rows(measured, have),
                ["family", "axis", "S", "E", "blk B", "Wan blk B", "ratio", "/S", "Wan /S", "/E", "Wan /E", "out B",
                 "measured by kind"], "llrlrrrrrrrrl"))
    print("\n[F2] PROJECTED (not measured) in-block GB per forward, per rank, at each family's real width, block count "
          "and a 720p-ish latent: the tiny per-block bytes\n     fitted a + b*S + c*E, evaluated at the real S and E, "
          "x real width / tiny width (MiniMax's Ulysses / Ring: attention width 56 x 128), x the real block count.\n"
          "     Wan = analytic() at the same width, S and split blocks; x Wan = PROJECTED / Wan. TP rows also scale "
          "LTXV's per-token fp32 qk-norm sums\n     with the width (they do not grow with it: < 1 % too high). "
          "The final gathers (outside the blocks, < 1 %) are left out. Real sizes:")
    for name in have:
        for real in FAMILIES[name].reals:
            print(f"       {real[0]}: {real[3]}")
    cols = [c for a in FAMILY_AXES for c in (f"Wan {a}2", f"{a}2 PROJ", "x Wan")]
    print(table(family_real_rows(measured, have), ["family", "real preset", "width", "blocks", "S", "E"] + cols,
                "llrlrl" + "r" * len(cols)))
    return 0


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
    ap.add_argument("--families", default=None, metavar="LIST",
                    help=f"instead of Wan: measure these families' tiny files on 2 CPU ranks beside Wan's formula "
                         f"('all' = {','.join(FAMILIES)}; needs $COMFYUI_PATH)")
    ap.add_argument("--family-axes", default=",".join(FAMILY_AXES), help="axes of --families (degree 2 each)")
    args = ap.parse_args(argv)
    if args.families:
        names = list(FAMILIES) if args.families == "all" else [n.strip() for n in args.families.split(",")]
        unknown = [n for n in names if n not in FAMILIES]
        if unknown:
            ap.error(f"--families: unknown {unknown}; known: {list(FAMILIES)}")
        return families_main(names, tuple(a.strip() for a in args.family_axes.split(",") if a.strip()))

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
