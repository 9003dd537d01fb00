"""Every choice the pack makes for the user, and the limits it checks a plan against, in one module.

Choices: the weights mode (replicated / sharded), the degrees left at auto, auto pipeline stages sized by each GPU's
memory, the fold of idle replicas into the sequence split, which axes cross nodes. Limits: does a plan's weights fit
the devices (before the ranks start, and as they report their memory), does a call's activations fit the ranks.
The loader node and bench call these by name; config.py is the config and its validation only.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from .config import (AXES, WEIGHT_MODES, ConfigError, ParallelConfig, per_layer_axes_inside_a_node, rank_coords,
                     validate_config, validate_for_model)
from .parallel.pipeline import stage_ranges
from .parallel.traffic import output_gather_bytes, ring_bytes, tensor_parallel_bytes, ulysses_bytes, weight_gather_bytes
from .weights.reads import held_bytes


# ---- what a model holds, from its file header ------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelBytes:
    """A model's weight bytes as the ranks would hold them: each transformer block's, and everything else."""
    blocks: tuple
    rest: int
def block_weight_bytes(header, family, precision: str) -> int:
    """Bytes of the blocks sharded-weights mode would split (the family's SHARD_UNITS), as the ranks hold them:
    fp8 stays 1 byte, GGUF quantized, the rest at `precision`."""
    units = getattr(family, "SHARD_UNITS", ("blocks",))
    # a list's children are numbered (blocks.0.), Cosmos 1's ModuleDict names them (blocks.block0.)
    pattern = re.compile(getattr(family, "BLOCK_PATTERN", None)  # (a family whose blocks' name recurs: its own)
                         or r"(^|\.)(" + "|".join(re.escape(u) for u in units) + r")\.(block)?[0-9]+\.")
    return sum(held_bytes(s, d, precision) for k, (s, d) in header.items() if pattern.search(k))


def model_bytes(header, family, precision: str) -> ModelBytes:
    """ModelBytes of a file as the ranks hold it: each transformer block's bytes (the family's BLOCKS), the rest."""
    pattern = re.compile(getattr(family, "BLOCK_PATTERN", None)
                         or r"(^|\.)" + re.escape(getattr(family, "BLOCKS", "blocks")) + r"\.(?:block)?([0-9]+)\.")
    blocks, rest = {}, 0
    for k, (s, d) in header.items():
        m = pattern.search(k)
        if m:
            blocks[int(m.group(2))] = blocks.get(int(m.group(2)), 0) + held_bytes(s, d, precision)
        else:
            rest += held_bytes(s, d, precision)
    return ModelBytes(tuple(blocks[i] for i in sorted(blocks)), rest)


def latent_tokens(latent_shape, patch) -> int | None:
    """Tokens of a latent (B, C, T, H, W) or (B, C, H, W) after patching; None without one."""
    if not latent_shape:
        return None
    dims = list(latent_shape[2:])
    if len(dims) == 2:
        dims = [1] + dims
    n = 1
    for s, p in zip(dims, patch):
        n *= -(-s // p)
    return n


# ---- the devices a spec names ----------------------------------------------------------------------------------------

def ranks_per_node(spec) -> int:
    """Ranks on each machine (0 when the group is one machine)."""
    n = spec.get("nodes", 1)
    return 0 if n <= 1 else (spec.get("ranks_per_node") or spec["world_size"] // n)


def device_totals(spec) -> list | None:
    """Each rank's GPU memory (bytes) from the driver's properties (no CUDA context in this process); None off
    CUDA."""
    if spec["device"] != "cuda":
        return None
    import torch
    if not torch.cuda.is_available():
        return None
    local = ranks_per_node(spec) or spec["world_size"]  # the other nodes' GPUs are known once their ranks report
    devices = list(spec.get("devices") or range(spec.get("first_device", 0), spec.get("first_device", 0) + local))
    return [torch.cuda.get_device_properties(d).total_memory for d in devices]


def fits_one_device(spec, header, precision: str = "bf16") -> bool:
    """Whether the whole file fits the smallest of the spec's GPUs with room for activations (True off CUDA)."""
    totals = device_totals(spec)
    if not totals:
        return True
    nbytes = sum(held_bytes(s, d, precision) for s, d in header.values())
    return nbytes < 0.7 * min(totals)


def usable_cores() -> int:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---- choices: weights mode, degrees, pipeline stages, folds, placement -----------------------------------------------

# what auto mode sizes the traffic for when no latent is given: Wan 480p, 81 frames (21 x 60 x 104 latent)
DEFAULT_TOKENS = 21 * 30 * 52


@dataclass(frozen=True)
class FitCosts:
    """What auto mode needs to weigh sharded weights against TP: the blocks' weight bytes as loaded, the model's
    width and depth, and the tokens of the latent being sampled (None: DEFAULT_TOKENS)."""
    block_bytes: int
    dim: int
    layers: int
    tokens: int | None = None
    elt: int = 2  # activation bytes (bf16 / fp16; fp32: 4)
def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def auto_tp(world_size: int, num_heads: int) -> int | None:
    """The tp degree auto mode weighs sharded weights against: the smallest of 2 / 4 / 8 dividing the world and the
    heads; None if none does."""
    return next((d for d in (2, 4, 8) if world_size % d == 0 and num_heads % d == 0), None)


def choose_weights(mode: str, world_size: int, num_heads: int, fits_one_device: bool, fixed_tp: int,
                   costs: FitCosts | None) -> tuple[bool, str]:
    """(shard_weights, why). `auto`: replicated when the model fits one device (nothing to gather) or tp is set;
    otherwise sharded weights when their gathers move fewer bytes per forward than the all-reduces of the TP degree
    auto mode would pick for this latent (parallel/traffic.py), TP otherwise."""
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"weights '{mode}' is not one of {WEIGHT_MODES}")
    if mode != "auto":
        return mode == "sharded", ("sharded weights as set" if mode == "sharded" else "")
    if fits_one_device or fixed_tp > 1 or world_size < 2:
        return False, ""
    tp = auto_tp(world_size, num_heads)
    if costs is None:
        return tp is None, ("sharded weights because the model does not fit one device and no tp degree divides "
                            f"its {num_heads} heads" if tp is None else "")
    tokens = costs.tokens or DEFAULT_TOKENS
    latent = f"{tokens} tokens" + ("" if costs.tokens else " (a 480p 81-frame latent: none was given)")
    gather = weight_gather_bytes(costs.block_bytes, world_size)
    if tp is None:
        return True, (f"sharded weights because the model does not fit one device and no tp degree divides its "
                      f"{num_heads} heads (gathers {_gb(gather)} per forward)")
    reduce = tensor_parallel_bytes(tokens, costs.dim, costs.layers, tp, elt=costs.elt)
    if gather <= reduce:
        return True, (f"sharded weights because the model does not fit one device and their gathers move "
                      f"{_gb(gather)} per forward, tp={tp}'s all-reduces {_gb(reduce)} at {latent}")
    return False, (f"tp rather than sharded weights: at {latent} its all-reduces move {_gb(reduce)} per forward, "
                   f"the weight gathers {_gb(gather)}")


def auto_degrees(world_size: int, num_heads: int, uses_cfg: bool = True, fits_one_device: bool = True,
                 fixed: dict | None = None, ranks_per_node: int = 0) -> tuple[dict, str]:
    """Pick degrees for axes left at 0, following the measured communication ranking:
    CFG outermost (no traffic until the end), then Ulysses (all-to-all, least bytes) while heads
    divide, then Ring for what remains, TP only when the model would not fit one device.
    Several nodes (`ranks_per_node` < world_size): TP and Ulysses stay inside a node (their collectives run in every
    layer); Ring, CFG and dp take what crosses nodes.

    Returns (degrees, explanation).
    """
    fixed = {a: d for a, d in (fixed or {}).items() if d}
    deg = {a: fixed.get(a, 1) for a in AXES}
    fixed_product = math.prod(deg.values())
    if world_size % fixed_product != 0:
        raise ConfigError(f"the fixed degrees {fixed} multiply to {fixed_product}, which does not divide world_size "
                          f"{world_size}: change them or world_size")
    left = world_size // fixed_product
    node = ranks_per_node if 0 < ranks_per_node < world_size else world_size
    why = []
    if not fits_one_device and "tp" not in fixed:
        # Smallest tp that divides heads and what is left; 2 halves the weights.
        for d in (2, 4, 8):
            if left % d == 0 and num_heads % d == 0 and node % d == 0:
                deg["tp"], left = d, left // d
                why.append(f"tp={d} because the model does not fit one device")
                break
    if uses_cfg and "cfg" not in fixed and left % 2 == 0:
        deg["cfg"], left = 2, left // 2
        why.append("cfg=2 (cond/uncond on separate ranks: no traffic inside the model; a call with one row, as at "
                   "cfg 1.0, folds the idle replica into the sequence split, so no rank idles)")
    if "ulysses" not in fixed:
        u = 1
        for d in range(left, 0, -1):
            if left % d == 0 and num_heads % (d * deg["tp"]) == 0 and node % (d * deg["tp"]) == 0:
                u = d
                break
        deg["ulysses"], left = u, left // u
        if u > 1:
            why.append(f"ulysses={u} (all-to-all: least bytes per forward)")
    if left > 1 and "ring" not in fixed:
        deg["ring"], left = left, 1
        why.append(f"ring={deg['ring']} across nodes" if node < world_size else
                   f"ring={deg['ring']} because {num_heads} heads do not split further")
    if left > 1:
        if "dp" in fixed:  # a fixed degree is never changed: nothing can take the rest
            raise ConfigError(f"the fixed degrees {fixed} leave a factor {left} of world_size {world_size} to no "
                              f"axis: set ring or dp to 0 (auto), or change world_size")
        deg["dp"] *= left
        why.append(f"dp={deg['dp']} for the rest")
    return deg, "; ".join(why) or "single rank"


def split_by_memory(nbytes: list) -> tuple:
    """A stage_split from each stage's memory in bytes: whole GiB, at least 1 (stage_ranges weighs blocks by it)."""
    return tuple(max(1, round(n / 2**30)) for n in nbytes)


def choose_pipeline(world_size: int, totals: list, mb: ModelBytes, reserve: int | None = None,
                    device: str = "cuda") -> tuple:
    """Auto pp for devices of different memory (`totals`, bytes per rank): when no symmetric plan (every rank the
    same share: replicated, sharded weights) fits the smallest device but stages sized by each device's memory
    do, ((stage_split), why); otherwise ((), "")."""
    reserve = FIT_RESERVE.get(device, 0) if reserve is None else reserve
    if world_size < 2 or len(totals) != world_size or len(set(totals)) == 1 or len(mb.blocks) < world_size:
        return (), ""
    memory = [{"device": f"{device}:{i}", "free": t, "total": t} for i, t in enumerate(totals)]
    symmetric = [ParallelConfig(world_size=world_size, device=device, ulysses=world_size),
                 ParallelConfig(world_size=world_size, device=device, ulysses=world_size, shard_weights=True)]
    if any(not _overflows(c, mb, memory, reserve) for c in symmetric):
        return (), ""
    split = split_by_memory(totals)
    staged = ParallelConfig(world_size=world_size, device=device, pp=world_size, stage_split=split)
    if _overflows(staged, mb, memory, reserve):
        return (), ""
    gb = ", ".join(f"{round(t / 2**30)}" for t in totals)
    return split, (f"pp={world_size} with stage_split {','.join(map(str, split))} because the GPUs differ ({gb} GiB) "
                   f"and no symmetric split fits the smallest (sharded weights need "
                   f"{_gib(max(weights_per_rank(symmetric[1], mb)) + reserve)} per GPU); stages sized by memory hold "
                   f"at most {_gib(max(weights_per_rank(staged, mb)) + reserve)}")


def fold_for(batch: int, replicas: int) -> int:
    """Fold factor for a call of `batch` rows on `replicas` replicas: the smallest divisor f of `replicas` with
    replicas / f <= batch (1 when every replica has a row). runtime/mesh.py builds the fold groups this picks."""
    if batch >= replicas:
        return 1
    return min(f for f in range(1, replicas + 1) if replicas % f == 0 and replicas // f <= max(batch, 1))


def fold_fits_a_node(config: ParallelConfig, fold: int) -> bool:
    """Whether `fold` neighbouring replicas lie on one node: only then may they join the Ulysses all-to-all (it runs
    in every layer); replicas on different nodes fold into the Ring instead. A replica is a contiguous block of
    world / replicas ranks, and fold f joins f neighbouring blocks."""
    return config.local_ranks % (config.world_size // config.replica_degree * fold) == 0


def fold_kind(config: ParallelConfig, fold: int, heads: int) -> str:
    """The sequence axis `fold` folded replicas join (runtime/mesh.py's FOLD_KINDS): Ulysses when the heads still
    divide and the replicas share a node, Ring otherwise."""
    return "ulysses" if heads % (config.ulysses * fold * config.tp) == 0 and fold_fits_a_node(config, fold) else "ring"


def axes_across_nodes(degrees: dict, local_ranks: int) -> set:
    """The axes whose groups span nodes: the mesh is laid out outermost first (AXES) over ranks numbered node by
    node, so innermost first an axis lies inside a node while the product so far divides the node's ranks."""
    across, span = set(), local_ranks
    for a in reversed(AXES):
        d = degrees.get(a, 1)
        if d == 1:
            continue
        if span % d == 0:
            span //= d
        else:
            across.add(a)
            span = 1
    return across


def placement(cfg: ParallelConfig) -> str:
    """Which axes cross nodes, in words (parallel_plan)."""
    if cfg.nodes == 1:
        return "one node"
    degrees = cfg.degrees()
    across = axes_across_nodes(degrees, cfg.local_ranks)
    inside = [f"{a}={degrees[a]}" for a in reversed(AXES) if degrees[a] > 1 and a not in across]
    outside = [f"{a}={degrees[a]}" for a in reversed(AXES) if a in across]
    return (f"{cfg.nodes} nodes x {cfg.local_ranks} ranks: inside a node {' x '.join(inside) or 'nothing'}; "
            f"across nodes {' x '.join(outside) or 'nothing'}")


# ---- limits: do the weights and a call's activations fit the ranks? --------------------------------------------------

# a rank's own memory beyond its weights and a call's activations: a GPU rank's CUDA context, kernels' workspaces and
# allocator slack; a CPU rank's process (interpreter, torch, ComfyUI's code: measured 400 MiB unique per rank after
# loading a tiny Wan on 0.3.75, torch 2.14)
FIT_RESERVE = {"cuda": 2 << 30, "cpu": 512 << 20}
# what of it the devices' free memory does not show yet when the ranks measure it at start: a CPU rank imports ComfyUI
# only when it loads (measured +115 MiB); a GPU rank's context exists by then, its workspaces do not
RESERVE_AFTER_START = {"cuda": 2 << 30, "cpu": 128 << 20}
# CPU ranks (for testing) beyond this many per core only take turns on the cores, each with its runtime's memory
CPU_RANKS_PER_CORE = 2
# sharded weights hold this many blocks whole during a forward: the running one, the prefetched next, and the
# previous one's gather buffer, which torch's FSDP2 frees only at the next block's copy-out (bench/memory.py measures
# 4 on CPU ranks, where gloo gathers through one more temporary copy)
GATHERED_BLOCKS = 3


def weights_per_rank(cfg: ParallelConfig, mb: ModelBytes) -> list:
    """Bytes of weights each rank holds under `cfg`: its pipeline stage's blocks (all of them at pp 1), / tp, or
    with sharded weights 1/world of every block plus GATHERED_BLOCKS whole ones, and everything outside the blocks
    whole."""
    blocks, n = list(mb.blocks), len(mb.blocks)
    ranges = stage_ranges(n, cfg.pp, cfg.stage_split) if cfg.pp > 1 and n else [(0, n)] * max(cfg.pp, 1)
    out = []
    for rank in range(cfg.world_size):
        a, b = ranges[rank_coords(cfg, rank)["pp"]]
        if cfg.shard_weights:
            held = sum(blocks) / cfg.world_size + GATHERED_BLOCKS * max(blocks, default=0)
        else:
            held = sum(blocks[a:b]) / cfg.tp
        out.append(int(held) + mb.rest)
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _overflows(cfg: ParallelConfig, mb: ModelBytes, memory: list, reserve: int, held: list | None = None) -> list:
    """[(device, needed, free)] for each device the plan does not fit (`held`: bytes per rank already taken by
    models that stay, not counted in the start-time free memory; `reserve`: per rank, its runtime and activations)."""
    need = [n + (held[r] if held else 0) for r, n in enumerate(weights_per_rank(cfg, mb))][:len(memory)]
    if memory[0].get("shared"):  # CPU ranks share the host's memory
        total = sum(need) + reserve * len(need)
        return [] if total <= memory[0]["free"] else [(f"{memory[0]['device']} (all {len(need)} ranks)", total,
                                                       memory[0]["free"])]
    return [(m["device"], n + reserve, m["free"]) for n, m in zip(need, memory) if n + reserve > m["free"]]


def check_fit(cfg: ParallelConfig, mb: ModelBytes, memory: list, reserve: int | None = None,
              held: list | None = None, activations: int = 0) -> None:
    """Refuse a plan whose weights do not fit the devices' free memory (as the ranks found it when the group
    started, less `held`: per rank, what resident models already take), naming the device, the bytes needed and
    free, and suggesting a plan that would fit. `reserve` (per rank; default what a rank still takes after its start,
    RESERVE_AFTER_START) and `activations` (the largest rank's, for the latent Parallel Config declares) count too."""
    if not memory or any(m is None for m in memory):
        return
    reserve = RESERVE_AFTER_START.get(cfg.device, 0) if reserve is None else reserve
    over = _overflows(cfg, mb, memory, reserve + activations, held)
    if not over:
        return
    device, needed, free = over[0]
    more = "".join(f"; {d} would need {_gib(n)} and has {_gib(f)} free" for d, n, f in over[1:])
    parts = _need_parts(cfg, mb, held, reserve, activations)
    raise ConfigError(f"the model does not fit: {device} would need {_gib(needed)} ({parts}) but has {_gib(free)} "
                      f"free{more}; {suggest_fit(cfg, mb, memory, reserve + activations, held)}")


def _need_parts(cfg: ParallelConfig, mb: ModelBytes, held: list | None, reserve: int, activations: int) -> str:
    """What a rank needs, in words: its weights under the plan, resident models, activations, its runtime."""
    weights = max(weights_per_rank(cfg, mb))
    parts = [f"weights {_gib(weights)} under {cfg.describe()}"]
    if held and any(held):
        parts.append(f"{_gib(max(held))} of resident models")
    none = "" if activations else " (no latent declared on Parallel Config)"
    parts.append(f"activations {_gib(activations)}{none}")
    parts.append(f"runtime reserve {_gib(reserve)}")
    per = " per rank" if cfg.world_size > 1 else ""
    return " + ".join(parts) + per


def check_start(cfg: ParallelConfig, mb: ModelBytes, memory: list | None, activations: int = 0,
                cores: int | None = None) -> None:
    """Before any rank process starts: CPU ranks against the cores, and every rank's weights + activations (the
    largest rank's, for the declared latent) + FIT_RESERVE against the devices' free memory now (`memory`: as
    WorkerGroup.start reports it; CPU: the host's, shared by all ranks; None where it cannot be known without
    starting something, e.g. a GPU's free memory without NVML)."""
    if cfg.device == "cpu":
        cores = cores or usable_cores()
        if cfg.local_ranks > CPU_RANKS_PER_CORE * cores:
            raise ConfigError(
                f"world_size {cfg.world_size} on device cpu starts {cfg.local_ranks} rank processes on this machine's "
                f"{cores} CPU cores: beyond {CPU_RANKS_PER_CORE} per core they only take turns, each with its own "
                f"{_gib(FIT_RESERVE['cpu'])} runtime; set world_size to at most {CPU_RANKS_PER_CORE * cores} "
                f"(CPU ranks are for testing), or use device cuda")
    if memory:
        check_fit(cfg, mb, memory, reserve=FIT_RESERVE.get(cfg.device, 0), activations=activations)


def suggest_fit(cfg: ParallelConfig, mb: ModelBytes, memory: list, reserve: int, held: list | None = None) -> str:
    """The first of sharded weights, tensor parallelism, pipeline stages sized by each device's free memory that
    would fit, as a sentence; else a smaller file."""
    world, candidates = cfg.world_size, []
    seq = cfg.ulysses * cfg.tp * cfg.pp
    if world > 1:
        candidates.append((dataclasses.replace(cfg, shard_weights=True, tp=1, pp=1, stage_split=(), ulysses=seq),
                           "weights 'sharded' (every rank 1/N of each block)"))
    for d in (2, 4, 8):
        if d <= seq and seq % d == 0 and d != cfg.tp:
            candidates.append((dataclasses.replace(cfg, shard_weights=False, tp=d, pp=1, stage_split=(),
                                                   ulysses=seq // d), f"tp={d}"))
    if world > 1 and not memory[0].get("shared") and len(mb.blocks) >= world:
        split = split_by_memory([m["free"] for m in memory])
        candidates.append((dataclasses.replace(cfg, shard_weights=False, pp=world, tp=1, ulysses=1, ring=1, cfg=1,
                                               dp=1, stage_split=split),
                           f"pp={world} with stage_split {','.join(map(str, split))} (blocks by each GPU's free GB)"))
    if memory[0].get("shared"):  # CPU ranks share the host: fewer of them (each holds a runtime) may fit
        candidates += [(dataclasses.replace(cfg, world_size=w, dp=1, cfg=1, pp=1, ring=1, tp=1, ulysses=w,
                                            shard_weights=False, stage_split=(), ranks_per_node=0, nodes=1),
                        f"world_size {w}") for w in range(world - 1, 0, -1)]
    for c, text in candidates:
        try:
            validate_config(c)
        except ConfigError:
            continue
        if not _overflows(c, mb, memory, reserve, held):
            if memory[0].get("shared"):
                return f"{text} would fit ({_gib(sum(weights_per_rank(c, mb)) + reserve * c.world_size)} in all)"
            return f"{text} would fit ({_gib(max(weights_per_rank(c, mb)) + reserve)} on the fullest device)"
    hint = " or load the other models with residency 'swap'" if held and any(held) else ""
    return ("no split of these devices fits it: use a smaller file (fp8 halves the blocks of a bf16 file, GGUF Q8_0 "
            f"about halves, Q4_K about quarters them) or more devices{hint}")


class CallTooLarge(ConfigError):
    """A model call whose activations cannot fit the ranks' memory: refused before it is sent."""


def rank_share(cfg: ParallelConfig, rows: int) -> float:
    """The largest rank's share of a call of `rows` rows (activations scale with rows x tokens): its replica's rows
    over the sequence split; a call with fewer rows than replicas folds the spare ones into the split
    (runtime/mesh.py). Tensor parallelism is not counted: it splits heads and ffn, not the residual stream."""
    R, S = cfg.replica_degree, cfg.sequence_degree
    fold = fold_for(rows, R)
    return -(-rows // (R // fold)) / max(rows, 1) / (S * fold)


def check_call(cfg: ParallelConfig, call_bytes: int, rows: int, memory: list, done: int = 0, what: str = "") -> int:
    """Refuse a call whose activations the ranks cannot hold, before it is sent; returns the largest rank's bytes.
    `call_bytes`: the call's activations on one device (ComfyUI's own estimate for the model class); `memory`: per
    local rank what it has for them (CPU: the host's available memory now, shared; GPU: free after the last load);
    `done`: the largest rank's bytes of a call that already ran (a CPU rank keeps that heap, so only more counts)."""
    need = int(call_bytes * rank_share(cfg, rows))
    if not memory or any(m is None for m in memory):
        return need
    if memory[0].get("shared"):
        ranks = f"{len(memory)} CPU rank{'s' if len(memory) > 1 else ''}"
        short = [(f"the host ({ranks})", len(memory) * max(0, need - done), memory[0]["free"])]
    else:
        short = [(m["device"], need, m["free"]) for m in memory]
    over = [(d, n, f) for d, n, f in short if n > f]
    if not over:
        return need
    device, needed, free = over[0]
    fits = max(0.0, free / max(needed, 1))
    fix = f"lower the resolution or frame count to about {fits:.0%} of these tokens"
    fix += (" (more CPU ranks would not help: they share the host's memory)" if memory[0].get("shared") else
            ", or add ranks to the sequence split (ulysses / ring): each then holds a smaller share")
    raise CallTooLarge(f"this model call is too large for the ranks: {what or f'{rows} rows'} needs about "
                       f"{_gib(need)} of activations on the largest rank under {cfg.describe()} ({_gib(call_bytes)} "
                       f"on one device, ComfyUI's own estimate for this model), {device} needs {_gib(needed)} more "
                       f"and has {_gib(free)}; {fix}. Nothing was sent to the ranks; the group stays ready")


# ---- the whole plan: Parallel Config's spec -> ParallelConfig, and why -----------------------------------------------

NODE_FIELDS = ("nodes", "ranks_per_node", "rendezvous", "secret_file", "rejoin_timeout")


def resolve_config(spec: dict, shape, header, family=None, precision: str = "bf16",
                   available_devices: int | None = None) -> tuple:
    """ParallelConfig from the Config node's spec, filling auto (0) degrees and the weights mode for this model,
    validated (`available_devices`: the GPUs this machine shows; None: not checked); returns (config, why)."""
    fixed = {a: spec.get(a, 1 if a == "pp" else 0) for a in AXES}  # (pp: specs from before it existed)
    fits = fits_one_device(spec, header, precision)
    costs = FitCosts(block_bytes=block_weight_bytes(header, family, precision), dim=shape.dim,
                     layers=shape.num_layers, tokens=latent_tokens(spec.get("latent_shape"), shape.patch_size),
                     elt=4 if spec["dtype"] == "fp32" else 2)
    shard, why_weights = choose_weights(spec.get("weights", "auto"), spec["world_size"], shape.num_heads, fits,
                                        fixed["tp"], costs)
    fixed, stage_split, why_pp, staged = _auto_pipeline(spec, fixed, model_bytes(header, family, precision))
    if staged:
        shard, why_weights = False, ""
    if all(fixed.values()):
        picked, why = fixed, why_pp or "as set"
    else:  # sharded weights make the model fit without tp
        picked, why = auto_degrees(spec["world_size"], shape.num_heads, uses_cfg=True, fits_one_device=fits or shard,
                                   fixed=fixed, ranks_per_node=ranks_per_node(spec))
    if picked.get("pp", 1) > 1 and not stage_split:  # stages follow each GPU's memory unless the user split them
        stage_split, why_split = _stages_by_memory(spec, picked)
        why += why_split
    why = "; ".join(w for w in (why_weights, why) if w and w != "single rank") or why
    config = ParallelConfig(world_size=spec["world_size"], dtype=spec["dtype"], device=spec["device"],
                            attention=spec["attention"], first_device=spec.get("first_device", 0),
                            devices=tuple(spec.get("devices", ())), stage_split=stage_split, shard_weights=shard,
                            **{k: spec[k] for k in NODE_FIELDS if k in spec}, **picked)
    validate_config(config, available_devices)
    validate_for_model(config, shape)
    if config.nodes > 1:
        why += f"; {placement(config)}"
    return config, why


def _auto_pipeline(spec: dict, fixed: dict, mb: ModelBytes) -> tuple:
    """pp left at auto (0): stages only for GPUs of different memory no symmetric split fits, and only when the other
    axes are auto too. Returns (fixed degrees, stage_split, why, whether auto pp staged the model)."""
    stage_split, why = tuple(spec.get("stage_split", ())), ""
    others_auto = all(fixed[a] in (0, 1) for a in AXES if a != "pp")
    if fixed["pp"] == 0 and spec.get("nodes", 1) > 1:  # auto pp weighs every GPU's memory: this machine sees its own
        fixed = {**fixed, "pp": 1}
        why = "pp=1 (auto stages need every node's GPU sizes: set pp and stage_split yourself)"
    if fixed["pp"] == 0 and others_auto:
        split, why = choose_pipeline(spec["world_size"], device_totals(spec) or [], mb, device=spec["device"])
        if split:
            return {**{a: 1 for a in AXES}, "pp": spec["world_size"]}, split, why, True
    return {**fixed, "pp": fixed["pp"] or 1}, stage_split, why, False


def _stages_by_memory(spec: dict, picked: dict) -> tuple:
    """(stage_split, why) for pp > 1 without a user split: each stage sized by its smallest GPU's memory (GiB);
    ((), "") when the GPUs are equal or unknown."""
    totals = device_totals(spec)
    if not totals or len(set(totals)) == 1:
        return (), ""
    shape_only = ParallelConfig(world_size=spec["world_size"], device="cpu", **picked)
    stages = [min(t for r, t in enumerate(totals) if rank_coords(shape_only, r)["pp"] == s)
              for s in range(picked["pp"])]  # a stage is as big as its smallest GPU
    split = split_by_memory(stages)
    return split, f"; stage_split {','.join(map(str, split))} from each stage's GPU memory (GiB)"


# ---- placement from what the group measured (runtime/link_probe.py) -------------------------------------------------

@dataclass(frozen=True)
class Measured:
    """What a group measured: its links (link_probe.probe_links: all_to_all / p2p / p2p_across, each {"bandwidth":
    bytes per second one rank sends, "latency": seconds per message}) and one row through a synthetic block of the
    model's width at `tokens`, per sequence share ({share: (projection seconds, attention seconds)})."""
    links: dict
    blocks: dict
    tokens: int


@dataclass(frozen=True)
class CallShape:
    """One model call as the cost model sees it."""
    dim: int
    heads: int
    layers: int
    tokens: int
    rows: int
    elt: int = 2
    out_per_token: int = 0  # output values per token (out channels x patch volume): the split's final gather


@dataclass(frozen=True)
class Placement:
    """How a call is spread: the mesh's degrees and the call's fold (1: none) into `kind`."""
    degrees: dict
    fold: int = 1
    kind: str = "none"

    def describe(self, rows: int) -> str:
        busy = self.ranks(rows)
        if busy == 1:
            return "one rank"
        d = self.degrees
        parts = [f"{a}={d[a]}" for a in AXES if d.get(a, 1) > 1]
        fold = f", folded {self.fold}x into {self.kind}" if self.fold > 1 else ""
        world = math.prod(d.get(a, 1) for a in AXES)
        idle = f", {world - busy} of {world} ranks idle" if busy < world else ""
        return f"{' x '.join(parts)}{fold}{idle}"

    def ranks(self, rows: int) -> int:
        """Ranks that compute a call of `rows` rows."""
        d = self.degrees
        replicas = d.get("cfg", 1) * d.get("dp", 1)
        active = min(replicas // self.fold, max(rows, 1))
        return active * self.fold * math.prod(d.get(a, 1) for a in ("pp", "ring", "ulysses", "tp"))


def block_seconds(measured: Measured, tokens: int, share: int) -> float:
    """One row through one block on a rank holding 1 / `share` of `tokens`: the nearest measured share at or below
    it, scaled (projections by the tokens, attention by their square, both by the share)."""
    near = max((s for s in measured.blocks if s <= share), default=min(measured.blocks))
    proj, attn = measured.blocks[near]
    ratio = tokens / measured.tokens
    return (proj * ratio + attn * ratio ** 2) * near / share


def _link(measured: Measured, kind: str, across: bool) -> tuple:
    link = measured.links.get("p2p_across" if across and "p2p_across" in measured.links else kind) or \
        measured.links["all_to_all"]
    return link["bandwidth"], link["latency"]


def crossing_axes(p: Placement, ranks_per_node: int | None) -> set:
    """The axes of `p` (and "fold", when its folded replicas lie on different nodes) whose groups span nodes; none on
    one node (`ranks_per_node` None). The rule is axes_across_nodes', the fold's fold_fits_a_node's."""
    if not ranks_per_node:
        return set()
    out = axes_across_nodes(p.degrees, ranks_per_node)
    replica_ranks = math.prod(p.degrees.get(a, 1) for a in ("pp", "ring", "ulysses", "tp"))
    if p.fold > 1 and ranks_per_node % (replica_ranks * p.fold):
        out.add("fold")
    return out


def predict_call_seconds(p: Placement, call: CallShape, measured: Measured, ranks_per_node: int | None = None) -> float:
    """Seconds of one call under placement `p`: compute / shares + traffic / measured bandwidth + messages x
    latency. Compute is the synthetic block's measured time at the rank's share; traffic is parallel/traffic.py's
    bytes per forward of each axis, priced at the link between nodes for an axis whose groups span nodes
    (crossing_axes; `ranks_per_node` None: one node); a pipeline runs rows as micro-batches and sends each stage's
    activation on."""
    d = p.degrees
    active = d.get("cfg", 1) * d.get("dp", 1) // p.fold
    rows = -(-call.rows // active)
    u = d.get("ulysses", 1) * (p.fold if p.kind == "ulysses" else 1)
    r = d.get("ring", 1) * (p.fold if p.kind == "ring" else 1)
    tp, pp = d.get("tp", 1), d.get("pp", 1)
    share = u * r * tp
    row = call.layers * block_seconds(measured, call.tokens, share)
    seconds = (rows + pp - 1) * row / pp
    across = crossing_axes(p, ranks_per_node)
    folded_across = "fold" in across
    a2a_bw, a2a_lat = _link(measured, "all_to_all", bool(across & {"ulysses", "tp"}) or
                            (folded_across and p.kind == "ulysses"))
    p2p_bw, p2p_lat = _link(measured, "p2p", bool(across & {"ring", "pp"}) or (folded_across and p.kind == "ring"))
    tokens = call.tokens / max(r, 1)  # a ring's ranks each run Ulysses over their share of the sequence
    if u > 1:
        seconds += ulysses_bytes(tokens, call.dim, call.layers, u, rows, call.elt) / a2a_bw + 4 * call.layers * a2a_lat
    if r > 1:
        seconds += ring_bytes(call.tokens / u, call.dim, call.layers, r, rows, call.elt) / p2p_bw + \
            call.layers * (r - 1) * p2p_lat
    if tp > 1:
        seconds += tensor_parallel_bytes(call.tokens / share * tp, call.dim, call.layers, tp, rows, call.elt) / \
            a2a_bw + 3 * call.layers * a2a_lat
    if u * r > 1:  # the sequence split's output, gathered once per forward
        seconds += output_gather_bytes(call.tokens, call.out_per_token, u * r, rows, call.elt) / a2a_bw + a2a_lat
    if pp > 1:
        sent = call.tokens / (u * r) * call.dim * call.elt
        seconds += (pp - 1) * rows * (sent / p2p_bw + p2p_lat)
    return seconds


def _per_node(config: ParallelConfig) -> int | None:
    """Ranks per node where the group spans nodes, else None."""
    return config.local_ranks if config.nodes > 1 else None


def one_rank_seconds(call: CallShape, measured: Measured) -> float:
    """The same call on one rank of this group: every row through every block, no traffic."""
    return call.rows * call.layers * block_seconds(measured, call.tokens, 1)


def fold_choices(config: ParallelConfig, rows: int, heads: int) -> list:
    """The placements a call of `rows` rows can take on `config`'s mesh: fold_for's (every rank busy) and, where no
    rank must take part in every call (sharded weights gather from all), smaller folds down to none, leaving the
    replicas without a row idle. runtime/mesh.py builds every fold's groups with the mesh."""
    degrees, replicas = config.degrees(), config.replica_degree
    widest = fold_for(rows, replicas)
    folds = [widest] if config.shard_weights else [f for f in range(1, widest + 1) if replicas % f == 0]
    return [Placement(degrees, f, "none" if f == 1 else fold_kind(config, f, heads)) for f in folds]


def choose_fold(config: ParallelConfig, call: CallShape, measured: Measured | None) -> tuple:
    """(fold, predicted seconds or None) for one call: the fold predicted fastest on the measured links (fold_for's
    when nothing was measured, or on a tie: every rank busy)."""
    choices = fold_choices(config, call.rows, call.heads)
    if measured is None or len(choices) == 1:
        return choices[-1].fold, None
    timed = [(predict_call_seconds(p, call, measured, _per_node(config)), -p.fold, p) for p in choices]
    seconds, _, best = min(timed, key=lambda t: (t[0], t[1]))
    return best.fold, seconds


PREFERENCE_MARGIN = 0.1


def mesh_candidates(world: int, heads: int) -> list:
    """Degree sets auto mode weighs on one node with replicated weights: cfg 2 (when world is even) or not, the rest
    split between Ulysses (while the heads divide), Ring and dp, and a pipeline over every rank."""
    out = []
    for cfg in ((2, 1) if world % 2 == 0 else (1,)):
        rest = world // cfg
        for u in (d for d in range(1, rest + 1) if rest % d == 0 and heads % d == 0):
            for r in (d for d in range(1, rest // u + 1) if (rest // u) % d == 0):
                out.append({**{a: 1 for a in AXES}, "cfg": cfg, "ulysses": u, "ring": r, "dp": rest // (u * r)})
    if world > 1:
        out.append({**{a: 1 for a in AXES}, "pp": world})
    return out


def best_call(config: ParallelConfig, call: CallShape, measured: Measured) -> tuple:
    """(placement, seconds) of `config`'s mesh for this call, with its best fold."""
    fold, seconds = choose_fold(config, call, measured)
    p = next(p for p in fold_choices(config, call.rows, call.heads) if p.fold == fold)
    return p, (seconds if seconds is not None else predict_call_seconds(p, call, measured, _per_node(config)))


def choose_placement(config: ParallelConfig, call: CallShape, measured: Measured, layers_total: int) -> tuple:
    """(degrees, why) for auto mode with replicated weights: the mesh_candidates' mesh whose call is predicted
    fastest (each with its best fold; on several nodes the axes whose groups span nodes priced at the link between
    them), never one predicted slower than one rank - a pipeline or a mesh whose replicas idle stands in then.
    `layers_total`: the model's blocks (a pipeline needs one per stage; 0: no pipeline)."""
    one = one_rank_seconds(call, measured)
    timed = []
    for degrees in mesh_candidates(config.world_size, call.heads):
        candidate = dataclasses.replace(config, **degrees)
        if (degrees["pp"] == 1 or degrees["pp"] <= layers_total) and per_layer_axes_inside_a_node(candidate):
            timed.append(best_call(candidate, call, measured))
    fastest = min(seconds for _, seconds in timed)
    # within PREFERENCE_MARGIN of the fastest, the analytic ranking's order decides (the cost model does not see
    # ring attention's merge steps or kernels' launch costs): cfg, then Ulysses, then Ring, then dp
    near = [(p, s) for p, s in timed if s <= min(fastest * (1 + PREFERENCE_MARGIN), one)] or \
        [min(timed, key=lambda t: t[1])]
    best, seconds = min(near, key=lambda t: (-t[0].degrees["cfg"], -t[0].degrees["ulysses"], t[0].degrees["pp"],
                                            -t[0].degrees["ring"]))
    why = (f"{explain_links(measured, call)}; {best.describe(call.rows)} predicted {seconds:.3g} s per call vs "
           f"{one:.3g} s on one rank")
    return best.degrees, why


def explain_links(measured: Measured, call: CallShape) -> str:
    """What the group measured, in words."""
    parts = []
    for name, label in (("all_to_all", "all-to-all"), ("p2p", "send/recv"), ("p2p_across", "across nodes")):
        link = measured.links.get(name)
        if link:
            parts.append(f"{label} {link['bandwidth'] / 1e9:.3g} GB/s, {link['latency'] * 1e6:.0f} us")
    block = block_seconds(measured, call.tokens, 1)
    return (f"measured {', '.join(parts) or 'one rank'}; a block {block * 1e3:.3g} ms at {call.tokens} tokens "
            f"({call.rows} row{'s' if call.rows > 1 else ''} a call)")


def check_placement(config: ParallelConfig, call: CallShape, measured: Measured) -> str:
    """parallel_plan's line for a mesh the user set (or auto could not weigh): its prediction against one rank, a
    warning when it is slower."""
    p, seconds = best_call(config, call, measured)
    one = one_rank_seconds(call, measured)
    line = f"{explain_links(measured, call)}; {p.describe(call.rows)} predicted {seconds:.3g} s per call"
    if seconds > one:
        return (f"{line}: WARNING slower than one rank ({one:.3g} s): the links are too slow for this split; set the "
                f"degrees to 0 (auto) or use fewer ranks")
    return f"{line} vs {one:.3g} s on one rank"
