"""ParallelConfig: the mesh a worker group runs on, and its validation.

world = dp x cfg x pp x ring x ulysses x tp. Validation is pure functions so every rule can be tested without starting
a process; each message names the value the user should change. What the pack chooses for the user (auto degrees,
weights mode, pipeline stages) and the memory limits it checks a plan against live in planner.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

AXES = ("dp", "cfg", "pp", "ring", "ulysses", "tp")  # outermost first: the mesh dim order
DTYPES = ("fp32", "bf16", "fp16")
DEVICE_KINDS = ("cuda", "cpu")
ATTENTION_BACKENDS = ("sdpa", "math", "flash", "sage")  # what each calls: parallel/kernels.py
WEIGHT_MODES = ("auto", "replicated", "sharded")  # Parallel Config's `weights`: planner.choose_weights reads it


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
    _validate_names(cfg)
    _validate_degrees(cfg)
    validate_nodes(cfg)
    _validate_devices(cfg, available_devices)
    _validate_weights_and_stages(cfg)
    _validate_kernels(cfg)


def _validate_names(cfg: ParallelConfig) -> None:
    if cfg.device not in DEVICE_KINDS:
        raise ConfigError(f"device '{cfg.device}' is not one of {DEVICE_KINDS}; pick cuda for GPUs or cpu for testing")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype '{cfg.dtype}' is not one of {DTYPES}")
    if cfg.attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend '{cfg.attention}' is not one of {ATTENTION_BACKENDS}")


def _validate_degrees(cfg: ParallelConfig) -> None:
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


def _validate_devices(cfg: ParallelConfig, available_devices: int | None) -> None:
    """The `devices` list, and the GPUs this machine shows (`available_devices`; None: not checked)."""
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
    if available_devices is None or cfg.device != "cuda":
        return
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


def _validate_weights_and_stages(cfg: ParallelConfig) -> None:
    """Sharded weights, pipeline stages and what they do not combine with."""
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


def _validate_kernels(cfg: ParallelConfig) -> None:
    """The compute dtype and attention kernel on this device kind, and the kernel's package in this Python."""
    if cfg.device == "cpu" and cfg.dtype == "fp16":
        raise ConfigError("fp16 compute on CPU ranks is not supported by torch's CPU kernels: use fp32 or bf16 with device 'cpu'")
    if cfg.device == "cpu" and cfg.attention in ("flash", "sage"):
        raise ConfigError(f"attention '{cfg.attention}' needs CUDA GPUs: use 'sdpa' or 'math' with device 'cpu'")
    from .parallel.kernels import missing_package

    pip = missing_package(cfg.attention)
    if pip:
        raise ConfigError(f"attention '{cfg.attention}' needs a package this Python cannot import: run `{pip}` in "
                          f"ComfyUI's Python environment and restart ComfyUI, or pick attention 'sdpa'")


def per_layer_axes_inside_a_node(cfg) -> bool:
    """Whether Ulysses x TP (an all-to-all / all-reduce in every layer) lies inside a node: the mesh puts them
    innermost, so they must divide a node's ranks."""
    return cfg.nodes == 1 or cfg.local_ranks % (cfg.ulysses * cfg.tp) == 0


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
    try:
        parse_endpoint(cfg.rendezvous)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.secret_file:
        raise ConfigError("several nodes need a secret_file: the same file on every node, made with "
                          "`python -c \"import secrets; print(secrets.token_hex(32))\" > pdit.secret`")
    inner = cfg.ulysses * cfg.tp
    if not per_layer_axes_inside_a_node(cfg):
        raise ConfigError(f"ulysses x tp = {inner} would span nodes ({cfg.local_ranks} ranks per node): their "
                          f"all-to-all / all-reduce runs in every layer and belongs inside a node; use ring, cfg or "
                          f"pp across nodes (e.g. ulysses={math.gcd(inner, cfg.local_ranks)}, ring="
                          f"{cfg.world_size // (math.gcd(inner, cfg.local_ranks) * cfg.replica_degree * cfg.pp)})")
    if cfg.rejoin_timeout <= 0:
        raise ConfigError(f"rejoin_timeout {cfg.rejoin_timeout} must be positive (seconds)")


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


def parse_endpoint(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port): the `rendezvous` field's format (runtime/multinode.py binds it)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous {text!r}: give HOST:PORT (an IPv6 address as [ADDR]:PORT), e.g. 10.0.0.1:29500")
    return host, int(port)


def rank_coords(cfg: ParallelConfig, rank: int) -> dict:
    """Mesh coordinates of a global rank (row-major over AXES, as init_device_mesh lays them out)."""
    out, rest = {}, rank
    for axis in reversed(AXES):
        deg = getattr(cfg, axis)
        out[axis] = rest % deg
        rest //= deg
    return out
