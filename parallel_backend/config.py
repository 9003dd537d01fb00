"""ParallelConfig: the mesh a worker group runs on, and its validation.

world = dp x cfg x pp x ring x ulysses x tp. Validation is one pure function so every rule can be
tested without starting a process; each message names the value the user should change.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

AXES = ("dp", "cfg", "pp", "ring", "ulysses", "tp")  # outermost first: the mesh dim order
DTYPES = ("fp32", "bf16", "fp16")
DEVICE_KINDS = ("cuda", "cpu")
ATTENTION_BACKENDS = ("sdpa", "math", "flash", "sage")  # what each calls: parallel/kernels.py


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class ParallelConfig:
    world_size: int = 2
    dp: int = 1
    cfg: int = 1
    pp: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1
    dtype: str = "bf16"
    device: str = "cuda"
    attention: str = "sdpa"
    # first device index used by rank 0 (ranks take consecutive devices): a shorthand for `devices`
    first_device: int = 0
    # the device index of each rank, e.g. (1, 2, 3) to keep rank 0 off ComfyUI's GPU 0; () = consecutive from
    # first_device
    devices: tuple = ()
    # CPU ranks: torch threads per rank (0 = cores // world)
    threads_per_rank: int = 0
    # every rank keeps 1/world of each block's weights and gathers a block whole just before it runs
    # (parallel/sharded_weights.py): fits a model no rank could hold, moving weight bytes instead of TP's activations
    shard_weights: bool = False
    # pipeline stages: the share of the blocks each stage holds, e.g. (24, 16) (GB per stage's device); () = equal
    stage_split: tuple = ()
    # several machines (runtime/multinode.py): node 0 is the ComfyUI machine and hosts torch's c10d store on
    # `rendezvous` (HOST:PORT, one of its own addresses); the others run `python -m parallel_backend.runtime.node`.
    # rank = node * ranks_per_node + local rank; `devices` / `first_device` are node 0's GPUs (another node's ranks
    # take its GPUs 0..ranks_per_node-1: choose them there with CUDA_VISIBLE_DEVICES).
    nodes: int = 1
    ranks_per_node: int = 0   # 0 = world_size (one node)
    rendezvous: str = ""
    secret_file: str = ""     # the same file (>= 16 bytes) on every node; never sent, only HMACs of it
    rejoin_timeout: float = 120.0  # seconds a group start waits for the other nodes (to join, or to come back)

    @property
    def local_ranks(self) -> int:
        """Ranks on each node (all of them on one node)."""
        return self.ranks_per_node or self.world_size // max(1, self.nodes)

    def node_of(self, rank: int) -> int:
        return rank // self.local_ranks

    def device_index(self, rank: int) -> int:
        """The device (GPU index, on its node) rank `rank` runs on."""
        local = rank % self.local_ranks
        return self.devices[local] if self.devices else self.first_device + local

    def device_indices(self) -> list:
        """The devices of node 0's ranks (this machine's)."""
        return [self.device_index(r) for r in range(self.local_ranks)]

    def degrees(self) -> dict:
        return {a: getattr(self, a) for a in AXES}

    @property
    def sequence_degree(self) -> int:
        return self.ring * self.ulysses

    @property
    def replica_degree(self) -> int:
        return self.dp * self.cfg

    def key(self) -> tuple:
        """Cache key: two configs with the same key can share a warm worker group."""
        return dataclasses.astuple(self)

    def describe(self) -> str:
        parts = [f"{a}={getattr(self, a)}" for a in AXES if getattr(self, a) > 1] or ["single rank"]
        weights = ", sharded weights" if self.shard_weights else ""
        if self.nodes > 1:
            weights += f", {self.nodes} nodes x {self.local_ranks} via {self.rendezvous}"
        return f"{self.world_size} x {self.device} ({', '.join(parts)}{weights}), {self.dtype}, {self.attention}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_config(cfg: ParallelConfig, available_devices: int | None = None) -> None:
    """Refuse a config that cannot run, before any process starts.

    `available_devices` is the number of devices of `cfg.device` kind this machine has
    (None: do not check; CPU ranks are limited only by sanity).
    """
    if cfg.device not in DEVICE_KINDS:
        raise ConfigError(f"device '{cfg.device}' is not one of {DEVICE_KINDS}; pick cuda for GPUs or cpu for testing")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype '{cfg.dtype}' is not one of {DTYPES}")
    if cfg.attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend '{cfg.attention}' is not one of {ATTENTION_BACKENDS}")
    if cfg.world_size < 1:
        raise ConfigError(f"world_size {cfg.world_size} must be at least 1")
    for axis, deg in cfg.degrees().items():
        if deg < 1:
            raise ConfigError(f"{axis} degree {deg} must be at least 1 (use 0 in the node for 'auto')")
    product = math.prod(cfg.degrees().values())
    if product != cfg.world_size:
        detail = " x ".join(f"{a}{d}" for a, d in cfg.degrees().items())
        raise ConfigError(
            f"the degrees multiply to {product} ({detail}) but world_size is {cfg.world_size}: "
            f"set world_size to {product} or change the degrees so they multiply to {cfg.world_size}"
        )
    validate_nodes(cfg)
    if cfg.devices:
        if len(cfg.devices) != cfg.local_ranks:
            per = "rank" if cfg.nodes == 1 else f"rank of a node ({cfg.local_ranks} per node)"
            raise ConfigError(f"devices {','.join(map(str, cfg.devices))} names {len(cfg.devices)} devices but "
                              f"world_size is {cfg.world_size}: name one device per {per}")
        if any(not isinstance(d, int) or d < 0 for d in cfg.devices):
            raise ConfigError(f"devices {cfg.devices} must be GPU indices (0, 1, ...), e.g. 1,2,3")
        if cfg.device == "cuda" and len(set(cfg.devices)) != len(cfg.devices):
            raise ConfigError(f"devices {','.join(map(str, cfg.devices))} names a GPU twice: one rank per GPU (NCCL "
                              f"cannot run two ranks of a group on one GPU)")
    if available_devices is not None and cfg.device == "cuda":
        if available_devices == 0:
            raise ConfigError("device is 'cuda' but no CUDA GPU is visible to this process: "
                              "check the driver / CUDA_VISIBLE_DEVICES, or set device to 'cpu'")
        missing = [d for d in cfg.device_indices() if d >= available_devices]
        if missing and cfg.devices:
            raise ConfigError(f"devices {','.join(map(str, cfg.devices))} include GPU {missing[0]} but only "
                              f"{available_devices} are visible (0..{available_devices - 1}): pick among those")
        needed = cfg.first_device + cfg.local_ranks
        if missing and cfg.nodes > 1:
            raise ConfigError(f"ranks_per_node {cfg.local_ranks} (from device {cfg.first_device}) needs {needed} GPUs "
                              f"on this machine but only {available_devices} are visible: lower ranks_per_node")
        if missing:
            raise ConfigError(
                f"world_size {cfg.world_size} (from device {cfg.first_device}) needs {needed} GPUs but only "
                f"{available_devices} are visible: set world_size to at most {available_devices - cfg.first_device}"
            )
    if cfg.shard_weights and cfg.world_size < 2:
        raise ConfigError("sharded weights need at least 2 ranks to share the blocks: set world_size >= 2 or weights "
                          "to 'replicated'")
    if cfg.stage_split and len(cfg.stage_split) != cfg.pp:
        raise ConfigError(f"stage_split {tuple(cfg.stage_split)} gives {len(cfg.stage_split)} stages but pp is {cfg.pp}: "
                          f"give one number per stage (e.g. the GB of each stage's GPUs) or leave it empty")
    if cfg.stage_split and any(not isinstance(w, (int, float)) or w <= 0 for w in cfg.stage_split):
        raise ConfigError(f"stage_split {tuple(cfg.stage_split)} must be positive numbers (e.g. 24,16)")
    if cfg.shard_weights and cfg.pp > 1:
        raise ConfigError(f"sharded weights and pp={cfg.pp} do not combine (every rank gathers every block, a stage "
                          f"runs only its own): set pp to 1 or weights to 'replicated'")
    if cfg.shard_weights and cfg.tp > 1:
        raise ConfigError(f"sharded weights and tp={cfg.tp} are two ways to fit a model and do not combine: set tp to 1 "
                          f"(sharded weights split every block over all ranks) or weights to 'replicated'")
    if cfg.device == "cpu" and cfg.dtype == "fp16":
        raise ConfigError("fp16 compute on CPU ranks is not supported by torch's CPU kernels: use fp32 or bf16 with device 'cpu'")
    if cfg.device == "cpu" and cfg.attention in ("flash", "sage"):
        raise ConfigError(f"attention '{cfg.attention}' needs CUDA GPUs: use 'sdpa' or 'math' with device 'cpu'")
    from .parallel.kernels import missing_package

    pip = missing_package(cfg.attention)
    if pip:
        raise ConfigError(f"attention '{cfg.attention}' needs a package this Python cannot import: run `{pip}` in "
                          f"ComfyUI's Python environment and restart ComfyUI, or pick attention 'sdpa'")


def validate_nodes(cfg: ParallelConfig) -> None:
    """The multi-node fields: a world that splits evenly into nodes, a rendezvous address and a secret file, and a
    placement that keeps the per-layer all-to-all (Ulysses) and TP inside a node."""
    if cfg.nodes < 1:
        raise ConfigError(f"nodes {cfg.nodes} must be at least 1")
    if cfg.ranks_per_node < 0:
        raise ConfigError(f"ranks_per_node {cfg.ranks_per_node} must be at least 1 (0 = world_size / nodes)")
    if cfg.nodes == 1:
        if cfg.ranks_per_node not in (0, cfg.world_size):
            raise ConfigError(f"ranks_per_node {cfg.ranks_per_node} with one node: it must equal world_size "
                              f"{cfg.world_size} (or 0), or set nodes > 1")
        return
    if cfg.local_ranks * cfg.nodes != cfg.world_size:
        raise ConfigError(f"{cfg.nodes} nodes x {cfg.local_ranks} ranks per node = {cfg.nodes * cfg.local_ranks}, "
                          f"but world_size is {cfg.world_size}: set world_size to {cfg.nodes * cfg.local_ranks}")
    if not cfg.rendezvous:
        raise ConfigError(f"nodes {cfg.nodes} needs a rendezvous address HOST:PORT (an address of this machine the "
                          f"other nodes reach, e.g. 10.0.0.1:29500)")
    from .runtime.multinode import parse_endpoint
    try:
        parse_endpoint(cfg.rendezvous)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.secret_file:
        raise ConfigError("several nodes need a secret_file: the same file on every node, made with "
                          "`python -c \"import secrets; print(secrets.token_hex(32))\" > pdit.secret`")
    inner = cfg.ulysses * cfg.tp
    if cfg.local_ranks % inner:
        raise ConfigError(f"ulysses x tp = {inner} would span nodes ({cfg.local_ranks} ranks per node): their "
                          f"all-to-all / all-reduce runs in every layer and belongs inside a node; use ring, cfg or "
                          f"pp across nodes (e.g. ulysses={math.gcd(inner, cfg.local_ranks)}, ring="
                          f"{cfg.world_size // (math.gcd(inner, cfg.local_ranks) * cfg.replica_degree * cfg.pp)})")
    if cfg.rejoin_timeout <= 0:
        raise ConfigError(f"rejoin_timeout {cfg.rejoin_timeout} must be positive (seconds)")


def placement(cfg: ParallelConfig) -> str:
    """Which axes cross nodes, in words (parallel_plan)."""
    if cfg.nodes == 1:
        return "one node"
    inside, across, span = [], [], cfg.local_ranks
    for a in reversed(AXES):  # innermost first: an axis lies inside a node while the product so far divides it
        d = getattr(cfg, a)
        if d == 1:
            continue
        if span % d == 0:
            inside.append(f"{a}={d}")
            span //= d
        else:
            across.append(f"{a}={d}")
            span = 1
    return (f"{cfg.nodes} nodes x {cfg.local_ranks} ranks: inside a node {' x '.join(inside) or 'nothing'}; "
            f"across nodes {' x '.join(across) or 'nothing'}")


@dataclass(frozen=True)
class ModelShape:
    """What validation needs to know of a model: taken from the checkpoint header."""
    family: str
    num_heads: int
    head_dim: int
    ffn_dim: int
    num_layers: int
    in_channels: int
    out_channels: int
    patch_size: tuple

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def to_info(self) -> dict:
        """The plain dict that crosses the control pipe (and that the MODEL proxy keeps)."""
        return {**dataclasses.asdict(self), "patch_size": tuple(self.patch_size)}

    @classmethod
    def from_info(cls, info: dict) -> "ModelShape":
        return cls(**{f.name: info[f.name] for f in dataclasses.fields(cls)})


def validate_for_model(cfg: ParallelConfig, shape: ModelShape) -> None:
    """Rules that depend on the model: heads and widths must split over the mesh."""
    heads, u, tp = shape.num_heads, cfg.ulysses, cfg.tp
    if heads % (u * tp) != 0:
        ok = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ConfigError(
            f"{shape.family} has {heads} attention heads, which do not divide by ulysses x tp = {u} x {tp} = {u * tp}: "
            f"choose ulysses x tp among {ok}, and use ring for the rest of the sequence split"
        )
    if cfg.pp > shape.num_layers:
        raise ConfigError(f"{shape.family} has {shape.num_layers} blocks, fewer than pp={cfg.pp} pipeline stages: "
                          f"lower pp")
    if shape.ffn_dim % tp != 0:
        raise ConfigError(f"{shape.family} ffn width {shape.ffn_dim} does not divide by tp={tp}: lower tp")
    if shape.dim % tp != 0:
        raise ConfigError(f"{shape.family} width {shape.dim} does not divide by tp={tp}: lower tp")


def validate_latent(shape: ModelShape, latent_shape: tuple) -> None:
    """A latent the model cannot take: wrong rank or channels (spatial sizes are padded)."""
    # a 4-D image latent (e.g. EmptySD3LatentImage) gets its frame axis from ComfyUI before sampling
    # (comfy.sample.fix_empty_latent_channels), so one with the model's latent channels is an image
    if not (len(latent_shape) == 5 or (len(latent_shape) == 4 and latent_shape[1] == shape.out_channels)):
        raise ConfigError(f"{shape.family} takes a 5-D video latent (batch, channels, frames, height, width) or a "
                          f"4-D image latent with {shape.out_channels} channels, got shape {tuple(latent_shape)}: "
                          f"use a latent node for this model (e.g. EmptyHunyuanLatentVideo)")
    if latent_shape[1] > shape.in_channels:
        raise ConfigError(f"latent has {latent_shape[1]} channels but the model takes {shape.in_channels}: "
                          f"use the latent node that matches this model")
    if min(latent_shape) < 1:
        raise ConfigError(f"latent shape {tuple(latent_shape)} is empty")


WEIGHT_MODES = ("auto", "replicated", "sharded")
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


def choose_weights(mode: str, world_size: int, num_heads: int, fits_one_device: bool, fixed_tp: int,
                   costs: FitCosts | None) -> tuple[bool, str]:
    """(shard_weights, why). `auto`: replicated when the model fits one device (nothing to gather) or tp is set;
    otherwise sharded weights when their gathers move fewer bytes per forward than the all-reduces of the TP degree
    auto mode would pick for this latent (parallel/traffic.py), TP otherwise."""
    from .parallel.traffic import tensor_parallel_bytes, weight_gather_bytes

    if mode not in WEIGHT_MODES:
        raise ConfigError(f"weights '{mode}' is not one of {WEIGHT_MODES}")
    if mode != "auto":
        return mode == "sharded", ("sharded weights as set" if mode == "sharded" else "")
    if fits_one_device or fixed_tp > 1 or world_size < 2:
        return False, ""
    tp = next((d for d in (2, 4, 8) if world_size % d == 0 and num_heads % d == 0), None)
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


# ---- does a plan fit the devices? -----------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class ModelBytes:
    """A model's weight bytes as the ranks would hold them: each transformer block's, and everything else."""
    blocks: tuple
    rest: int


def rank_coords(cfg: ParallelConfig, rank: int) -> dict:
    """Mesh coordinates of a global rank (row-major over AXES, as init_device_mesh lays them out)."""
    out, rest = {}, rank
    for axis in reversed(AXES):
        deg = getattr(cfg, axis)
        out[axis] = rest % deg
        rest //= deg
    return out


def weights_per_rank(cfg: ParallelConfig, mb: ModelBytes) -> list:
    """Bytes of weights each rank holds under `cfg`: its pipeline stage's blocks (all of them at pp 1), / tp, or
    with sharded weights 1/world of every block plus GATHERED_BLOCKS whole ones, and everything outside the blocks
    whole."""
    from .parallel.pipeline import stage_ranges

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


def usable_cores() -> int:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
        split = tuple(max(1, round(m["free"] / 2**30)) for m in memory)
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
    from .runtime.mesh import fold_for

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
    split = tuple(max(1, round(t / 2**30)) for t in totals)
    staged = ParallelConfig(world_size=world_size, device=device, pp=world_size, stage_split=split)
    if _overflows(staged, mb, memory, reserve):
        return (), ""
    gb = ", ".join(f"{round(t / 2**30)}" for t in totals)
    return split, (f"pp={world_size} with stage_split {','.join(map(str, split))} because the GPUs differ ({gb} GiB) "
                   f"and no symmetric split fits the smallest (sharded weights need "
                   f"{_gib(max(weights_per_rank(symmetric[1], mb)) + reserve)} per GPU); stages sized by memory hold "
                   f"at most {_gib(max(weights_per_rank(staged, mb)) + reserve)}")


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
