"""One machine's share of a multi-node group: spawn its local ranks, each joining node 0's rendezvous.

    python -m parallel_backend.runtime.node --rendezvous HOST:PORT --node-rank K --nodes N --nproc-per-node P \\
        --secret-file FILE [--model-dir DIR] [--device cpu|cuda] [--target MODULE:FUNCTION] [--target-args JSON]

Rank `K * P + local` runs on local device `local`. Node 0 (`--node-rank 0`) also hosts the store on HOST:PORT (HOST
is one of its own addresses; nothing binds another interface) and admits the ranks; the other nodes connect to it
(and wait for it, up to --timeout). Every rank runs `target(RankContext)` once the group is formed: the default only
checks the group and returns (the worker's serving loop plugs in here later). Exit status 0 when every rank
returned, 1 when the rendezvous failed or a rank raised (its reason is printed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .multinode import RendezvousError, RendezvousServer, World, connect_store, join_group, parse_endpoint, read_secret

DEFAULT_TARGET = "parallel_backend.runtime.node:check_group"


@dataclass(frozen=True)
class NodeSpec:
    """Everything a local rank needs (pickled into each spawned rank; the secret stays in its file)."""
    host: str
    port: int
    node_rank: int
    world: World
    secret_file: str
    device: str = "cpu"
    model_dir: str | None = None
    target: str = DEFAULT_TARGET
    target_args: dict = field(default_factory=dict)
    timeout: float = 300.0

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class RankContext:
    """What a target gets: its ranks, device, the group's store for later checks, and the node's settings."""
    rank: int
    local_rank: int
    node_rank: int
    world: World
    device: torch.device
    store: dist.Store
    interface: str
    address: str
    model_dir: str | None
    args: dict


def check_group(ctx: RankContext) -> None:
    """The default target until the worker loop is plugged in: one all-reduce over the whole group."""
    t = torch.ones(1, device=ctx.device)
    dist.all_reduce(t)
    if int(t.item()) != ctx.world.world_size:
        raise RuntimeError(f"rank {ctx.rank}: all-reduce gave {t.item()}, expected {ctx.world.world_size}")
    if ctx.rank == 0:
        print(f"[pdit] group of {ctx.world.describe()} formed over {ctx.interface}", flush=True)


def resolve_target(spec: str):
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--target {spec!r}: give MODULE:FUNCTION")
    return getattr(importlib.import_module(module), name)


def _exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """A rank never outlives its node process (killed or not, it would hold the group's sockets)."""
    def loop():
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(3)
    threading.Thread(target=loop, name="pdit-node-watch", daemon=True).start()


def _rank_main(local_rank: int, spec: NodeSpec, parent_pid: int) -> None:
    rank = spec.node_rank * spec.world.nproc_per_node + local_rank
    tag = f"[pdit node {spec.node_rank} rank {rank}]"
    _exit_with_parent(parent_pid)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world.nproc_per_node))
        if spec.device == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        secret = read_secret(spec.secret_file)
        store = connect_store(spec.host, spec.port, spec.timeout)
        member = join_group(store, secret, rank, spec.world, device, spec.host, spec.endpoint, spec.timeout)
        del secret
        try:
            target = resolve_target(spec.target)
            target(RankContext(rank, local_rank, spec.node_rank, spec.world, device, member.store, member.interface,
                               member.address, spec.model_dir, spec.target_args))
        finally:
            dist.destroy_process_group()
    except RendezvousError as e:
        print(f"{tag} {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    except BaseException as e:
        print(f"{tag} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise


def parse_args(argv=None) -> NodeSpec:
    p = argparse.ArgumentParser(prog="python -m parallel_backend.runtime.node", description=__doc__.split("\n\n")[0])
    p.add_argument("--rendezvous", required=True, help="HOST:PORT of node 0's store (node 0 binds exactly this)")
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--secret-file", required=True, help="the same secret file on every node (>= 16 bytes)")
    p.add_argument("--model-dir", default=None, help="where this node keeps the model files node 0 names")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--target", default=DEFAULT_TARGET, help="MODULE:FUNCTION every rank runs (gets a RankContext)")
    p.add_argument("--target-args", default="{}", help="JSON object handed to the target as ctx.args")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for node 0 / the other ranks")
    a = p.parse_args(argv)
    if a.nodes < 1 or a.nproc_per_node < 1 or not 0 <= a.node_rank < a.nodes:
        p.error(f"need --nodes >= 1, --nproc-per-node >= 1 and 0 <= --node-rank < --nodes (got {a.node_rank} of "
                f"{a.nodes})")
    if a.device == "cuda" and torch.cuda.device_count() < a.nproc_per_node:
        p.error(f"--nproc-per-node {a.nproc_per_node} but this machine has {torch.cuda.device_count()} CUDA devices")
    try:
        host, port = parse_endpoint(a.rendezvous)
    except ValueError as e:
        p.error(str(e))
    return NodeSpec(host, port, a.node_rank, World(a.nodes, a.nproc_per_node), os.path.abspath(a.secret_file),
                    a.device, a.model_dir, a.target, json.loads(a.target_args), a.timeout)


def run_node(spec: NodeSpec) -> int:
    """Host the store (node 0), spawn the local ranks, admit them (node 0), wait for them. Returns the exit status."""
    tag = f"[pdit node {spec.node_rank}]"
    server = None
    try:
        if spec.node_rank == 0:
            server = RendezvousServer(spec.host, spec.port, read_secret(spec.secret_file), spec.world, spec.timeout)
            print(f"{tag} rendezvous store listening on {server.endpoint} for {spec.world.describe()} ranks",
                  flush=True)
        else:
            read_secret(spec.secret_file)  # a missing / short secret fails here, before any rank starts
    except RendezvousError as e:
        print(f"{tag} {e}", file=sys.stderr, flush=True)
        return 1
    ctx = mp.start_processes(_rank_main, args=(spec, os.getpid()), nprocs=spec.world.nproc_per_node, join=False,
                             start_method="spawn")
    status = 0
    if server is not None:
        try:
            server.admit()
            print(f"{tag} admitted every rank of {spec.world.describe()}", flush=True)
        except RendezvousError as e:
            print(f"{tag} {e}", file=sys.stderr, flush=True)
            status = 1
    try:
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as e:  # the rank printed its reason
        rank = spec.node_rank * spec.world.nproc_per_node + e.error_index
        print(f"{tag} local rank {e.error_index} (rank {rank}) failed; its reason is above", file=sys.stderr,
              flush=True)
        status = 1
    except mp.ProcessExitedException as e:
        rank = spec.node_rank * spec.world.nproc_per_node + e.error_index
        print(f"{tag} local rank {e.error_index} (rank {rank}) exited with code {e.exit_code}", file=sys.stderr,
              flush=True)
        status = 1
    finally:
        if server is not None:
            server.close()
    return status


def main(argv=None) -> int:
    return run_node(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
