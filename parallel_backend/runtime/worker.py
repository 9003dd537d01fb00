"""The worker rank's process: join the mesh, hold the shard, serve the control pipe.

Started by WorkerGroup with torch.multiprocessing (spawn). Imported by its plain module name
(`parallel_backend.runtime.worker`) so a spawn child can find it even when ComfyUI imported the pack
under its folder path.
"""
from __future__ import annotations

import collections
import gc
import os
import shutil
import signal
import threading
import time
import traceback

TOKEN_LOG = 4096  # per-forward token counts kept for the group's stats


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


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    """VmHWM of this process (ru_maxrss would start at the spawning parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def device_memory(torch, device) -> dict:
    """What this rank's device has, when the group starts: a GPU's free and total bytes (cudaMemGetInfo: what every
    process on it, ComfyUI's included, leaves), or the host's available memory for a CPU rank (shared by all)."""
    if device.type == "cuda":  # (what torch's allocator holds unused is free to this rank too)
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return {"device": f"cuda:{device.index}", "free": int(free), "total": int(total), "shared": False}
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return {"device": "cpu", "free": info.get("MemAvailable", 0), "total": info.get("MemTotal", 0), "shared": True}


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _release_memory(torch, device) -> None:
    """Give the memory of dropped weights back: collect, empty the CUDA cache, trim the C heap (freed
    small blocks would otherwise stay in this process's resident set)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        mesh = build_mesh(config, rank, device)
        if multinode:
            from .remote import NodeIO
            io = NodeIO(config, rank)
            files = FileCheck(config, rank, session, None, io)
    except BaseException:
        conn.send(("error", rank, traceback.format_exc()))
        return
    conn.send(("ok", {"rank": rank, "pid": os.getpid(), "coord": mesh.coord, "memory": device_memory(torch, device)}))
    owner_gone = serve(conn, rank, config, mesh, device, io, files, progress_ref)
    if owner_gone:
        shutil.rmtree(store_dir, ignore_errors=True)


def _join_nodes(config, rank: int, spec: dict):
    """Node 0's local rank joins the multi-node group through node 0's store (the ComfyUI process hosts it)."""
    import torch

    from .multinode import World, connect_store, join_group, read_secret
    if config.device == "cuda":
        device = torch.device("cuda", config.device_index(rank))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    store = connect_store(spec["host"], spec["port"], spec["timeout"])
    member = join_group(store, read_secret(spec["secret_file"]), rank, World(config.nodes, config.local_ranks),
                        device, spec["host"], spec.get("endpoint", "node 0"), spec["timeout"])
    return device, member.store


class FileCheck:
    """Multi-node loads: this node's copy of the model (and LoRA) files, checked on every rank against node 0's
    (size + header sha256, through the store) before anything is read. LoRA files only node 0 has (those a native
    LoraLoader produced) are sent to the other nodes over the process group instead."""

    def __init__(self, config, rank: int, store, model_dir: str | None, io=None):
        import tempfile

        from .multinode import World
        self.config, self.rank, self.store, self.model_dir, self.io = config, rank, store, model_dir, io
        self.world = World(config.nodes, config.local_ranks)
        self.shipped = os.path.join(tempfile.gettempdir(), f"pdit_shipped_{os.getpid()}")

    def __call__(self, payload: dict) -> tuple:
        from .multinode import ModelFileMismatch, check_model_file
        from .remote import load_paths
        tag = payload.get("check", "load")
        try:
            path, loras = load_paths(payload, self.model_dir, self.config.node_of(self.rank))
        except ModelFileMismatch as e:  # every rank hears why (none waits for this one's fingerprint)
            check_model_file(self.store, self.rank, self.world, None, tag=f"{tag}/model", error=str(e))
            raise
        check_model_file(self.store, self.rank, self.world, path, tag=f"{tag}/model")
        ship = list(payload.get("ship") or ())
        for i, lo in enumerate(loras):
            if lo[0] in ship or payload["loras"][i][0] in ship:
                loras[i] = (self.io.share_file(payload["loras"][i][0], self.shipped), *lo[1:])
            else:
                check_model_file(self.store, self.rank, self.world, lo[0], tag=f"{tag}/lora{i}")
        return path, loras


def serve(conn, rank: int, config, mesh, device, io=None, files=None, progress_ref=None) -> bool:
    """The rank's serving loop: ops from `conn` (a local rank's pipe, or a remote rank's StoreChannel) until
    shutdown. `io` (NodeIO) moves inputs and outputs between nodes; `files` resolves and checks a load's files on
    this node; `progress_ref` (a local rank) the owner's control block. Returns True when the owner went away (its
    end of the channel closed)."""
    import torch
    import torch.distributed as dist

    from .patch_transfer import PatchReceiver
    from .progress import CallCancelled, RankProgress
    from .sharded_model import ShardedModel, compiled_graphs
    from .transport import ShmReader

    reader = ShmReader()
    patch_objects = PatchReceiver(device)  # the model patches this group's calls carried, kept by their sender's id
    progress = None if progress_ref is None else RankProgress(reader.view(progress_ref).numpy(), rank,
                                                              config.local_ranks)
    token_log = collections.deque(maxlen=TOKEN_LOG)
    fold_log = collections.deque(maxlen=TOKEN_LOG)  # "none", or e.g. "2xulysses": how each call was spread
    graph_log = collections.deque(maxlen=TOKEN_LOG)  # graphs torch.compile has built in this rank, after each call
    forwards = 0
    model: ShardedModel | None = None
    held: dict = {}  # key -> ShardedModel kept besides `model`: those the owner loaded resident ("keep")
    loads = 0
    owner_gone = False
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, OSError):
            owner_gone = True  # the owner died (or is tearing the group down): leave
            break
        try:
            if op == "shutdown":
                conn.send(("ok", None))
                break
            elif op == "load":
                # A new file or precision (payload "key") rebuilds the model in this process after the old
                # weights are dropped; the same one keeps the model and only changes the merged LoRA list.
                key = payload.get("key")
                # Several models (Wan 2.2 A14B's experts): the owner lists those to keep resident ("keep").
                keep = set(payload.get("keep", ()))
                freed = False
                if getattr(model, "key", None) != key:
                    if model is not None and model.key in keep:
                        held[model.key] = model  # park the current model: it stays resident
                    freed = model is not None and model.key not in keep
                    model = held.pop(key, None)
                for k in [k for k in held if k not in keep]:
                    del held[k]
                    freed = True
                if freed:
                    _release_memory(torch, device)
                reloaded = model is None or key is None or getattr(model, "key", None) != key
                if reloaded:
                    model = None
                    _release_memory(torch, device)
                    _reset_peak_rss()
                    rss_before = _rss_bytes()
                    path, loras = files(payload) if files else (payload["path"], payload.get("loras") or ())
                    model = ShardedModel(mesh, path, payload["precision"])
                    model.key = key
                    if progress is not None:  # each block start is this rank's progress, and where Cancel can stop
                        progress.watch(getattr(model.model, model.family.BLOCKS))
                    model.load_mem = {"load_rss_before": rss_before, "load_peak_rss": _peak_rss_bytes()}
                    loads += 1
                if not reloaded and files:
                    path, loras = files(payload)
                elif not reloaded:
                    loras = payload.get("loras") or ()
                lora_info = model.set_loras(loras)
                if lora_info.get("lora_changed"):
                    _release_memory(torch, device)
                conn.send(("ok", {**model.info(), **model.load_mem, **lora_info, "reloaded": reloaded,
                                  "loads": loads, "rss": _rss_bytes(), "peak_rss": _peak_rss_bytes(),
                                  "memory": device_memory(torch, device)}))
            elif op == "forward":
                key = payload.get("key")
                if key is not None and getattr(model, "key", None) != key and key in held:
                    if model is not None:
                        held[model.key] = model
                    model = held.pop(key)  # switch between resident models (no copy, no load)
                if model is None or (key is not None and model.key != key):
                    raise RuntimeError("no model loaded on this worker group" if model is None else
                                       f"{key[0]} is not loaded on this worker group")
                refs, out_ref = payload["inputs"], payload["out"]
                fault = payload.get("fault")
                if fault and fault.get("rank") == rank:
                    _inject_fault(fault)
                inputs = io.inputs(refs, reader) if io else {k: reader.view(r) for k, r in refs.items()}
                x, t, ctx = inputs.pop("x"), inputs.pop("timestep"), inputs.pop("context")
                extras = inputs
                extras.update(payload.get("values") or {})  # keyword inputs that are not tensors
                batch = x.shape[0]
                model.set_compile(payload.get("compile"))
                options = patch_objects.decode(payload.get("options"))  # transformer_options: model patches, ...
                if progress is not None:
                    progress.begin_call(payload.get("call", 0))
                try:
                    out = model.forward_rows(x, t, ctx, transformer_options=options, **extras)
                finally:
                    del x, t, ctx, extras, options
                    if progress is not None:
                        progress.end_call()
                token_log.append(model.last_tokens)
                fold_log.append(model.last_fold)
                graph_log.append(compiled_graphs())
                forwards += 1
                writes = out is not None and model.is_leader(batch)
                if writes and not (io and io.remote):
                    reader.view(out_ref)[model.rows(batch)].copy_(out.to("cpu"))
                if io:
                    io.outputs(out, model.rows(batch) if writes else None, out_ref, reader)
                del out
                if io and io.remote:
                    continue  # a remote rank answers a forward only when it fails
                conn.send(("ok", None))
            elif op == "stats":
                cuda = {}
                if device.type == "cuda":  # the allocator's peak since the last stats (what a call's activations took)
                    cuda = {"cuda_allocated": torch.cuda.memory_allocated(device),
                            "cuda_peak": torch.cuda.max_memory_allocated(device)}
                    torch.cuda.reset_peak_memory_stats(device)
                conn.send(("ok", {"rank": rank, "pid": os.getpid(), "rss": _rss_bytes(), "loads": loads, **cuda,
                                  "peak_rss": _peak_rss_bytes(), "forwards": forwards,
                                  # tokens this rank computed per forward (last TOKEN_LOG of them): 0 = it idled
                                  "tokens_per_forward": list(token_log), "fold_per_forward": list(fold_log),
                                  "compiled_graphs_per_forward": list(graph_log),
                                  "compile": None if model is None else model.compile_spec,
                                  "param_bytes": 0 if model is None else model.load_stats["param_bytes"],
                                  "models": (model is not None) + len(held),
                                  "param_bytes_all": sum(m.load_stats["param_bytes"] for m in
                                                         ([model] if model is not None else []) + list(held.values())),
                                  **({} if model is None else model.info())}))
            else:
                raise ValueError(f"unknown op {op!r}")
        except CallCancelled as e:  # every local rank stopped this call at the same block: the group stays usable
            conn.send(("cancelled", rank, str(e)))
        except KeyboardInterrupt as e:
            if io is not None and io.remote:
                # torch's spawn sends a remote rank SIGINT when its node process dies: the node is going, and its
                # heartbeat (not this rank's echo) tells node 0 so
                raise
            conn.send(("error", rank, _describe(e, config)))
        except BaseException as e:
            conn.send(("error", rank, _describe(e, config)))
    reader.close()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    return owner_gone


def serve_remote(ctx) -> None:
    """The target a remote node's ranks run (`python -m parallel_backend.runtime.node`): the group is formed (ctx);
    take node 0's config from the store, build the mesh with every rank, serve node 0's ops until it shuts the
    group down or goes away."""
    import torch

    from ..config import ParallelConfig
    from .mesh import build_mesh
    from .multinode import read_secret
    from .remote import NodeIO, StoreChannel, session_config

    secret = read_secret(ctx.secret_file)
    config = ParallelConfig(**session_config(ctx.store, secret, ctx.nonce))
    if config.world_size != ctx.world.world_size or config.local_ranks != ctx.world.nproc_per_node:
        raise RuntimeError(f"node {ctx.node_rank}: node 0's group is {config.nodes} x {config.local_ranks} ranks, this "
                           f"node was started for {ctx.world.describe()}")
    if config.device == "cpu" and config.threads_per_rank:
        torch.set_num_threads(config.threads_per_rank)
    channel = StoreChannel(ctx.store, secret, ctx.nonce, ctx.rank)
    try:
        mesh = build_mesh(config, ctx.rank, ctx.device)
        io = NodeIO(config, ctx.rank)
        files = FileCheck(config, ctx.rank, ctx.store, ctx.model_dir, io)
    except BaseException:
        channel.send(("error", ctx.rank, traceback.format_exc()))
        raise
    channel.send(("ok", {"rank": ctx.rank, "pid": os.getpid(), "coord": mesh.coord, "node": ctx.node_rank,
                         "memory": device_memory(torch, ctx.device)}))
    try:
        serve(channel, ctx.rank, config, mesh, ctx.device, io, files)
    finally:
        shutil.rmtree(files.shipped, ignore_errors=True)


def _describe(e: BaseException, config) -> str:
    from ..parallel.patch_points import PatchRefused
    if isinstance(e, PatchRefused):  # a refusal says what to change; its traceback says nothing more
        return f"{type(e).__name__}: {e}"
    text = "".join(traceback.format_exception(e))
    msg = str(e).lower()
    if "out of memory" in msg:
        text += (f"\nHint: rank ran out of memory with {config.describe()}; raise tp (splits the weights) or "
                 f"ulysses/ring (splits the activations), or lower the resolution / frame count.")
    return text


def _inject_fault(fault: dict) -> None:
    """Test hook: simulate a failing rank (only reachable through the group's test API)."""
    kind = fault.get("kind")
    if kind == "raise":
        raise RuntimeError(fault.get("message", "injected fault"))
    if kind == "exit":
        os._exit(fault.get("code", 17))
    if kind == "sleep":
        time.sleep(fault.get("seconds", 1.0))
