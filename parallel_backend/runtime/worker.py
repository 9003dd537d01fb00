"""The worker rank's process: join the mesh, then let a Rank (rank.py) serve the owner's ops; never outlive the owner.

Started by WorkerGroup with torch.multiprocessing (spawn). Imported by its plain module name
(`parallel_backend.runtime.worker`) so a spawn child can find it even when ComfyUI imported the pack
under its folder path. Its entry points import torch (and the Rank) only once the parent watch runs: a rank whose
owner dies during that slow import still exits.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import traceback


def _watch_parent(parent_pid: int, store_dir: str | None = None, interval: float = 0.5) -> None:
    """Exit when the ComfyUI process is gone: a rank must never outlive its owner. The owner can no
    longer remove the group's rendezvous directory then, so the ranks do."""
    def loop():
        while True:
            if os.getppid() != parent_pid:
                if store_dir:
                    shutil.rmtree(store_dir, ignore_errors=True)
                os._exit(3)
            time.sleep(interval)
    threading.Thread(target=loop, name="pdit-parent-watch", daemon=True).start()


def worker_main(rank: int, config_dict: dict, store_path: str, conn, parent_pid: int,
                multinode: dict | None = None, progress_ref=None) -> None:
    """A rank spawned by the ComfyUI process (node 0's ranks when the group spans nodes: `multinode` holds the
    rendezvous host, port, secret file and timeout; the group then forms through node 0's c10d store).
    `progress_ref`: the owner's control block (progress.py), where this rank reports its blocks and reads Cancel."""
    store_dir = os.path.dirname(store_path)
    _watch_parent(parent_pid, store_dir)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the ComfyUI terminal is the owner's to handle
    import torch

    from ..config import ParallelConfig
    from .link_probe import probe_links
    from .mesh import build_mesh
    from .rendezvous import init_process_group

    config = ParallelConfig(**config_dict)
    io = files = None
    try:
        if config.device == "cpu":
            n = config.threads_per_rank or max(1, (os.cpu_count() or 1) // config.local_ranks)
            torch.set_num_threads(n)
        if multinode:
            device, session = _join_nodes(config, rank, multinode)
        else:
            device = init_process_group(config, rank, store_path)
        links = probe_links(config.world_size, config.local_ranks, device)  # before the mesh's groups exist
        mesh = build_mesh(config, rank, device)
        if multinode:
            from .remote import FileCheck, NodeIO
            io = NodeIO(config, rank)
            files = FileCheck(config, rank, session, None, io)
    except BaseException:
        conn.send(("error", rank, traceback.format_exc()))
        return
    from .rank import Rank, device_memory  # once joined: the rendezvous waits for no import
    conn.send(("ok", {"rank": rank, "pid": os.getpid(), "coord": mesh.coord, "memory": device_memory(device),
                      "links": links}))
    owner_gone = Rank(rank, config, mesh, device, io, files, progress_ref).serve(conn)
    if owner_gone:
        shutil.rmtree(store_dir, ignore_errors=True)


def _join_nodes(config, rank: int, spec: dict):
    """Node 0's local rank joins the multi-node group through node 0's store (the ComfyUI process hosts it)."""
    from .multinode import World, connect_store, join_group, read_secret
    from .rendezvous import pick_device
    device = pick_device(config.device, config.device_index(rank))
    store = connect_store(spec["host"], spec["port"], spec["timeout"])
    member = join_group(store, read_secret(spec["secret_file"]), rank, World(config.nodes, config.local_ranks),
                        device, spec["host"], spec.get("endpoint", "node 0"), spec["timeout"])
    return device, member.store


def serve_remote(ctx) -> None:
    """The target a remote node's ranks run (`python -m parallel_backend.runtime.node`): the group is formed (ctx);
    take node 0's config from the store, build the mesh with every rank, serve node 0's ops until it shuts the
    group down or goes away."""
    import torch

    from ..config import ParallelConfig
    from .link_probe import probe_links
    from .mesh import build_mesh
    from .multinode import read_secret
    from .rank import Rank, device_memory
    from .remote import FileCheck, NodeIO, StoreChannel, session_config

    secret = read_secret(ctx.secret_file)
    config = ParallelConfig(**session_config(ctx.store, secret, ctx.nonce))
    if config.world_size != ctx.world.world_size or config.local_ranks != ctx.world.nproc_per_node:
        raise RuntimeError(f"node {ctx.node_rank}: node 0's group is {config.nodes} x {config.local_ranks} ranks, this "
                           f"node was started for {ctx.world.describe()}")
    if config.device == "cpu" and config.threads_per_rank:
        torch.set_num_threads(config.threads_per_rank)
    channel = StoreChannel(ctx.store, secret, ctx.nonce, ctx.rank)
    try:
        links = probe_links(config.world_size, config.local_ranks, ctx.device)  # node 0's ranks probe alike
        mesh = build_mesh(config, ctx.rank, ctx.device)
        io = NodeIO(config, ctx.rank)
        files = FileCheck(config, ctx.rank, ctx.store, ctx.model_dir, io)
    except BaseException:
        channel.send(("error", ctx.rank, traceback.format_exc()))
        raise
    channel.send(("ok", {"rank": ctx.rank, "pid": os.getpid(), "coord": mesh.coord, "node": ctx.node_rank,
                         "memory": device_memory(ctx.device), "links": links}))
    try:
        Rank(ctx.rank, config, mesh, ctx.device, io, files).serve(channel)
    finally:
        shutil.rmtree(files.shipped, ignore_errors=True)
