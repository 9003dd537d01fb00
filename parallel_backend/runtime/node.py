"""One machine's share of a multi-node group: spawn its local ranks, each joining node 0's rendezvous.

    python -m parallel_backend.runtime.node --rendezvous HOST:PORT --node-rank K --nodes N --nproc-per-node P \\
        --secret-file FILE --model-dir DIR [--device cpu|cuda] [--once] [--target MODULE:FUNCTION] [--target-args JSON]

Rank `K * P + local` runs on local device `local`. Node 0 is the ComfyUI machine: its Parallel Config (nodes,
ranks_per_node, rendezvous, secret_file) makes the ComfyUI process host the store on HOST:PORT and start its local
ranks. Every other node runs this command; it serves node 0's worker groups one after another: it waits for node
0's store, joins (admission by the shared secret), serves the group's ops (worker.serve_remote) until node 0 stops
the group or goes away, and then waits for the next one - so a group stopped by a fault, a config change or a
restart of ComfyUI finds the node again. `--once` serves one group and exits (0 when every rank returned, 1 when the
rendezvous failed or a rank raised).

While a group runs, this process bumps the node's heartbeat in node 0's store twice a second and, when one of its
ranks exits, posts which rank and why (remote.py), then stops the others: node 0 names the node and rank at once.

`--target MODULE:FUNCTION` runs that function in every rank instead (tests; `--node-rank 0` then also hosts the
store itself, the way the ComfyUI process does).
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

from .multinode import (
    RendezvousError,
    RendezvousServer,
    World,
    connect_store,
    join_group,
    parse_endpoint,
    read_secret,
    session_store,
)
from .group import exit_cause
from .rendezvous import pick_device

DEFAULT_TARGET = "parallel_backend.runtime.worker:serve_remote"
CHECK_TARGET = "parallel_backend.runtime.node:check_group"
RETRY_S = 1.0


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
    once: bool = False

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
    secret_file: str = ""
    nonce: str = ""


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
        device = pick_device(spec.device, local_rank)
        secret = read_secret(spec.secret_file)
        store = connect_store(spec.host, spec.port, spec.timeout)
        member = join_group(store, secret, rank, spec.world, device, spec.host, spec.endpoint, spec.timeout)
        del secret
        try:
            target = resolve_target(spec.target)
            target(RankContext(rank, local_rank, spec.node_rank, spec.world, device, member.store, member.interface,
                               member.address, spec.model_dir, spec.target_args, spec.secret_file, member.nonce))
        finally:
            if dist.is_initialized():  # the serving loop destroys it itself when node 0 ends the group
                dist.destroy_process_group()
    except RendezvousError as e:
        print(f"{tag} {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    except BaseException as e:
        print(f"{tag} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise


def host_comfyui() -> str | None:
    """The ComfyUI folder the ranks import the model classes from: $COMFYUI_PATH, else the ComfyUI this pack is
    installed in (ComfyUI/custom_nodes/<pack>); None when neither is there. Sets $COMFYUI_PATH for the ranks."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pack = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        up = os.path.dirname(os.path.dirname(pack))
        if os.path.basename(os.path.dirname(pack)) == "custom_nodes" and os.path.isdir(os.path.join(up, "comfy")):
            path = up
    if path and os.path.isdir(os.path.join(path, "comfy")):
        os.environ["COMFYUI_PATH"] = path
        return path
    return None


def parse_args(argv=None) -> NodeSpec:
    p = argparse.ArgumentParser(prog="python -m parallel_backend.runtime.node", description=__doc__.split("\n\n")[0])
    p.add_argument("--rendezvous", required=True, help="HOST:PORT of node 0's store (node 0 binds exactly this)")
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--secret-file", required=True, help="the same secret file on every node (>= 16 bytes)")
    p.add_argument("--model-dir", default=None, help="this machine's ComfyUI models folder (diffusion_models/, unet/, "
                   "loras/ under it; node 0 names files relative to it); default: the models folder of the ComfyUI "
                   "this pack is installed in")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--target", default=DEFAULT_TARGET, help="MODULE:FUNCTION every rank runs (gets a RankContext)")
    p.add_argument("--target-args", default="{}", help="JSON object handed to the target as ctx.args")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for node 0 / the other ranks")
    p.add_argument("--once", action="store_true", help="serve one group, then exit (default: serve node 0's groups "
                   "one after another until stopped)")
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
    if a.target == DEFAULT_TARGET:
        comfy = host_comfyui()
        if comfy is None:
            p.error("the ranks build ComfyUI's own model classes: install this pack in ComfyUI/custom_nodes on this "
                    "machine too, or set COMFYUI_PATH to a ComfyUI folder")
        if a.model_dir is None:
            a.model_dir = os.path.join(comfy, "models")
    if a.node_rank == 0 and a.target == DEFAULT_TARGET:
        p.error("node 0 is the ComfyUI machine: its Parallel Config (nodes, rendezvous, secret_file) hosts the store "
                "and starts its ranks; run this command on the other nodes (--node-rank 1 ...)")
    once = a.once or a.target != DEFAULT_TARGET
    return NodeSpec(host, port, a.node_rank, World(a.nodes, a.nproc_per_node), os.path.abspath(a.secret_file),
                    a.device, a.model_dir and os.path.abspath(a.model_dir), a.target, json.loads(a.target_args),
                    a.timeout, once)


class _Heartbeat:
    """Bumps `hb/<node>` in the session's store every HEARTBEAT_S; `lost` is set when the store cannot be reached
    (node 0 stopped the group or is gone)."""

    def __init__(self, session, node: int):
        from .remote import HEARTBEAT_S
        self.session, self.node, self.lost, self._stop = session, node, None, threading.Event()

        def loop():
            while not self._stop.is_set():
                try:
                    self.session.add(f"hb/{node}", 1)
                except Exception as e:  # noqa: BLE001
                    self.lost = str(e).splitlines()[0] if str(e) else type(e).__name__
                    return
                self._stop.wait(HEARTBEAT_S)
        self.thread = threading.Thread(target=loop, name="pdit-heartbeat", daemon=True)
        self.thread.start()

    def stop(self):
        self._stop.set()


def _serve_session(spec: NodeSpec) -> int:
    """One group of node 0's: wait for its store, start the ranks, beat, report a rank's exit, end with the group.
    Returns 0 when the ranks returned (node 0 shut the group down or closed it), 1 otherwise."""
    from .multinode import _get, _root
    tag = f"[pdit node {spec.node_rank}]"
    store = connect_store(spec.host, spec.port, spec.timeout)
    root = _root(store)
    nonce = _get(root, "nonce", spec.timeout).decode()
    if root.check(["group"]):  # this store's group formed (or failed) without us: wait for node 0's next one
        raise RendezvousError(f"node 0's group at {spec.endpoint} is already formed or aborted")
    session = session_store(store, nonce)
    ctx = mp.start_processes(_rank_main, args=(spec, os.getpid()), nprocs=spec.world.nproc_per_node, join=False,
                             start_method="spawn")
    beat = _Heartbeat(session, spec.node_rank)
    print(f"{tag} joining node 0's group at {spec.endpoint} with {spec.world.nproc_per_node} rank(s)", flush=True)
    status = 0
    try:
        while True:
            try:
                if ctx.join(timeout=0.2):
                    break
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                rank = spec.node_rank * spec.world.nproc_per_node + e.error_index
                cause = ("raised an error (its traceback is above)" if isinstance(e, mp.ProcessRaisedException)
                         else exit_cause(e.exit_code))
                print(f"{tag} rank {rank} {cause}; its peers on this node were stopped", file=sys.stderr, flush=True)
                try:
                    session.set(f"dead/{rank}", cause)
                except Exception:  # noqa: BLE001 (node 0 is gone already)
                    pass
                status = 1
                break
            if beat.lost is not None:  # node 0's store is gone: the group is over, the ranks must not linger
                print(f"{tag} node 0's store at {spec.endpoint} went away ({beat.lost}); stopping this node's ranks",
                      file=sys.stderr, flush=True)
                break
    finally:
        beat.stop()
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
    return status


def serve_node(spec: NodeSpec) -> int:
    """A node other than 0: serve node 0's groups one after another (or one, with --once)."""
    tag = f"[pdit node {spec.node_rank}]"
    try:
        read_secret(spec.secret_file)  # a missing / short secret fails here, before anything connects
    except RendezvousError as e:
        print(f"{tag} {e}", file=sys.stderr, flush=True)
        return 1
    while True:
        try:
            status = _serve_session(spec)
        except (RendezvousError, RuntimeError) as e:
            if spec.once:
                print(f"{tag} {e}", file=sys.stderr, flush=True)
                return 1
            status = None
        if spec.once:
            return status
        time.sleep(RETRY_S)


def run_node(spec: NodeSpec) -> int:
    """Host the store (node 0), spawn the local ranks, admit them (node 0), wait for them. Returns the exit status."""
    if spec.node_rank > 0 and spec.target == DEFAULT_TARGET:
        return serve_node(spec)
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
