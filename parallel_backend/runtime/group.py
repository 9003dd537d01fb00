"""WorkerGroup: the persistent ranks behind one ParallelConfig, seen from the ComfyUI process.

- spawns `world_size` ranks with torch.multiprocessing (spawn), one duplex Pipe each: the control
  channel is local only, nothing listens on the network; ranks rendezvous through a FileStore;
- every wait watches the pipes *and* the process sentinels, so a rank that dies is reported at
  once (rank, exit code / signal) and the whole group is torn down, never left hanging;
- tensors go through ShmTensorSlot segments; the pipes carry only descriptors;
- groups are cached by config key, so a second prompt reuses warm ranks and loaded weights;
- several nodes (config.nodes > 1): this process is node 0. It hosts torch's c10d store on the rendezvous address
  and admits every rank (multinode.py); its local ranks join through it; the other nodes' ranks (started by
  `python -m parallel_backend.runtime.node` there) get their ops through the store and their inputs over the
  process group, and are watched by heartbeat (remote.py).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from multiprocessing import resource_tracker
from multiprocessing.connection import wait

import torch

from ..config import ParallelConfig, validate_config
from .patch_transfer import PatchSender, PatchTransferError
from .progress import CallWatch, OwnerProgress, cooperative
from .rank import ResidentModels, device_memory
from .remote import NodeFailure, RemoteNodes
from .transport import ShmTensorSlot

REMOTE_OPTIONS_LIMIT = 64 << 20  # bytes of model patches one call may carry through node 0's store
log = logging.getLogger("parallel_dit")


class WorkerGroupError(RuntimeError):
    """A rank failed; the message names the rank, the config and the cause."""


class WorkerGroupInterrupted(RuntimeError):
    pass


def exit_cause(code: int | None) -> str:
    """How a process ended, from its exit code (multiprocessing's: negative = the signal that killed it)."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def available_devices(kind: str) -> int | None:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    return None


@contextlib.contextmanager
def _plain_main_module():
    """Spawn children re-run the parent's __main__ script unless told otherwise. Under ComfyUI that
    is main.py, whose argument parser rejects the child's `--multiprocessing-fork` and whose
    imports would load all of ComfyUI into every rank. While ranks start, show multiprocessing a
    bare __main__ so children import only `parallel_backend.runtime.worker`."""
    real = sys.modules["__main__"]
    stub = types.ModuleType("__main__")
    stub.__spec__ = None
    sys.modules["__main__"] = stub
    try:
        yield
    finally:
        sys.modules["__main__"] = real


class _Replies:
    """One op's replies as they arrive: each rank's result, the errors, the ranks that stopped a cancelled call, and
    who is still to answer (local ranks by pipe, remote ranks by rank number)."""

    def __init__(self, what: str, world_size: int, conns: list, remote_ranks):
        self.what = what
        self.replies = [None] * world_size
        self.pending = dict(enumerate(conns))
        self.remote_pending = set(remote_ranks)
        self.errors, self.cancelled = [], set()

    def waiting(self) -> set:
        return set(self.pending) | self.remote_pending

    def take(self, rank: int, msg: tuple) -> None:
        """One rank's reply: ok (its result), cancelled (it stopped the call where every rank agreed), or error."""
        if msg[0] == "error":
            self.errors.append((msg[1], msg[2]))
            if self.what not in ("load", "vae_load"):  # peers may be blocked in a collective: do not wait for them
                self.pending.clear()
                self.remote_pending.clear()
        elif msg[0] == "cancelled":
            self.cancelled.add(rank)
        else:
            self.replies[rank] = msg[1]


class WorkerGroup:
    start_timeout = 300.0
    load_timeout = 3600.0
    step_timeout = 3600.0

    def __init__(self, config: ParallelConfig):
        validate_config(config, available_devices(config.device))
        self.config = config
        self.procs, self.conns = [], []
        self.pids: list[int] = []
        self.remote_pids: dict = {}  # several nodes: rank -> pid on its own machine
        self.device_memory: list = []
        # every model on the ranks, key -> {"info", "lora_key", "resident", "rank_bytes"}, and the current one
        self.models = ResidentModels()
        self.load_count = 0   # model (re)builds on the ranks
        self.lora_count = 0   # LoRA list changes merged on the ranks
        self._lock = threading.RLock()
        self._tmpdir = None
        self._in = self._out = None
        self.closed = False
        self.nodes: RemoteNodes | None = None  # several nodes: node 0's half (rendezvous, admission, remote ranks)
        self._loads = 0
        self.patch_sender = PatchSender()  # which model patch objects the ranks hold
        self.progress = None   # OwnerProgress: the ranks' block counters and the cancel word (progress.py)
        self.calls = 0         # forwards sent to this group (the ranks number them the same)
        self.timing = None     # (seconds of the longest block, tokens of its call): what a stall is measured against
        self._stop_requested = threading.Event()  # stop() from another thread while a call waits (Unload, exit)
        self.call_memory: list = []  # per local rank, what its device had after the last load (forward's fit check)
        self.activations_done = 0    # the largest rank's activation bytes of a call that ran (CPU ranks keep that heap)
        self._in_call, self._call_thread = False, None
        self.vaes: dict = {}  # VAE key -> what rank 0 reported of it (vae_load)
        # (seconds, latent elements) of the last VAE call: a stall is 10x that, scaled by size (one tile can be the
        # whole call); before any, a guess of 60 s for this call's size (a 10-minute stall limit)
        self.vae_timing = None
        self.links: dict = {}     # what the ranks measured of their links at start (link_probe.probe_links)
        self.measured: dict = {}  # (dim, heads, ffn, text tokens) -> planner.Measured: the links, a block that wide
        self.last_placement = None  # (placement, predicted seconds, one rank's) of the last call a fold was chosen for
        # each call's fold from the measured links (auto mode: the loader sets it); False: fold_for's, every rank busy
        # (a mesh the user set folds as documented)
        self.measured_folds = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, interrupt=None) -> "WorkerGroup":
        """Spawn the ranks and wait until every rank (every node's) reported. `interrupt`: called while waiting;
        whatever it raises (ComfyUI's Cancel) stops the group and propagates - a start waiting for another node to
        join can take up to rejoin_timeout."""
        import torch.multiprocessing as mp

        from . import worker  # noqa: F401  (imported by plain name; see worker.py)

        resource_tracker.ensure_running()  # ranks share this tracker, so shm names stay tracked once
        ctx = mp.get_context("spawn")
        self._tmpdir = tempfile.mkdtemp(prefix="pdit_group_")
        store = os.path.join(self._tmpdir, "store")
        try:
            multinode = None
            if self.config.nodes > 1:
                self.nodes = RemoteNodes(self.config)
                multinode = self.nodes.host()
            self.progress = OwnerProgress(ShmTensorSlot("ctl", 4096), self.config.local_ranks, cooperative(self.config))
            with _plain_main_module():
                for rank in range(self.config.local_ranks):
                    parent, child = ctx.Pipe(duplex=True)
                    p = ctx.Process(target=worker.worker_main, name=f"pdit-rank{rank}",
                                    args=(rank, self.config.to_dict(), store, child, os.getpid(), multinode,
                                          self.progress.ref), daemon=True)
                    p.start()
                    child.close()
                    self.procs.append(p)
                    self.conns.append(parent)
            replies = self._collect(self.start_timeout, "start", interrupt=interrupt)
            self.pids = [r["pid"] for r in replies[:self.config.local_ranks]]  # this machine's
            self.remote_pids = {r: replies[r]["pid"] for r in range(self.config.local_ranks, self.config.world_size)}
            self.device_memory = [r.get("memory") for r in replies]  # per rank, as it started (free / total)
            self.links = replies[0].get("links") or {}  # the same on every rank (the slowest link of each class)
            self._in, self._out = ShmTensorSlot("in"), ShmTensorSlot("out")
        except BaseException:
            self.stop(graceful=False)
            raise
        return self

    def alive(self) -> bool:
        return not self.closed and bool(self.procs) and all(p.is_alive() for p in self.procs)

    def scratch_dir(self, name: str) -> str:
        """A folder for this group's temporary files (a native LoRA loader's tensors): inside the group's own
        directory, removed when the group stops - and by the ranks when the owner dies without stopping it."""
        path = os.path.join(self._tmpdir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def stop(self, graceful: bool = True) -> None:
        """Stop the ranks and remove everything the group made. From another thread while a call waits (Unload,
        exit), that call ends first, raising, and the ranks are not waited for."""
        if self._in_call and self._call_thread != threading.get_ident():
            self._stop_requested.set()
            graceful = False
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if graceful:
                for c in self.conns:
                    try:
                        c.send(("shutdown", None))
                    except (OSError, BrokenPipeError):
                        pass
                if self.nodes is not None:
                    self.nodes.ask_shutdown()
            if self._tmpdir:  # first: nothing needs the group's files now, and ComfyUI killed during this stop (its
                # ranks already gone, so none removes them as a rank does when its owner dies) would leave them
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._end_processes(graceful)
            for c in self.conns:
                c.close()
            for slot in (self._in, self._out):
                if slot is not None:
                    slot.close()
            if self.progress is not None:
                self.progress.close()
            if self.nodes is not None:  # closing the store ends every remote rank's session (they rejoin later)
                self.nodes.close(graceful)
                self.nodes = None
            _forget(self)

    def _end_processes(self, graceful: bool) -> None:
        """The local ranks gone: given 10 s to leave after a shutdown (graceful), then terminated, then killed."""
        if graceful:
            deadline = time.monotonic() + 10
            for p in self.procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGCONT)  # a stopped rank (SIGSTOP) takes its SIGTERM only once continued
        for p in self.procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)

    # ---- control channel -----------------------------------------------------------------------
    def _call(self, op: str, payload, timeout: float, interrupt=None, watch: CallWatch | None = None) -> list:
        with self._lock:
            if not self.alive():
                raise WorkerGroupError("the worker group is not running (it was stopped or a rank died)")
            seq = self.nodes.publish(op, payload) if self.nodes is not None else 0
            for c in self.conns:
                c.send((op, payload))
            self._in_call, self._call_thread = True, threading.get_ident()
            try:
                return self._collect(timeout, op, interrupt=interrupt, seq=seq, watch=watch)
            finally:
                self._in_call = False

    def _collect(self, timeout: float, what: str, interrupt=None, seq: int = 0, watch: CallWatch | None = None) -> list:
        """Wait for one reply per rank; tear down on any failure. Each source has its own failure model: a local rank
        (its pipe's error, its death: _take_local), a remote node (its heartbeat, node 0's store: _take_remote), the
        admission of the other nodes while the group forms (_admission_failure). Several nodes: the other nodes' ranks
        answer through the store (`seq`: the op's number) - except for a forward, where only a remote failure answers
        (rank 0 completes after every remote rank delivered). `interrupt` (ComfyUI's Cancel; not for a forward, whose
        `watch` polls it) stops the group and propagates; `watch` (a forward): Cancel, hung ranks."""
        remote = self.nodes.ranks if self.nodes is not None and what != "forward" else ()
        replies = _Replies(what, self.config.world_size, self.conns, remote)
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        deadline = time.monotonic() + timeout
        while replies.waiting():
            self._check_waiting(what, interrupt, watch, replies.waiting())
            if self.nodes is not None:
                self._take_remote(seq, replies)
            self._take_local(sentinels, replies)
            if time.monotonic() > deadline:
                self.stop(graceful=False)
                raise WorkerGroupError(f"ranks {sorted(replies.waiting())} of {self.config.describe()} did not answer "
                                       f"{what} within {timeout:.0f} s; the group was stopped")
        if replies.errors:
            self._raise_error(replies.errors, what)
        if watch is not None and watch.exc is not None:
            self._end_cancelled(watch, replies.cancelled)
        elif replies.cancelled:  # the ranks stopped a call nobody cancelled: their state is unknown
            self.stop(graceful=False)
            raise WorkerGroupError(f"ranks {sorted(replies.cancelled)} of {self.config.describe()} stopped {what} "
                                   f"unasked; the group was stopped")
        return replies.replies

    def _take_local(self, sentinels: dict, replies: "_Replies") -> None:
        """The local ranks' failure model: each pipe's reply (a result, an error, a cancelled call), and a rank's
        death (its sentinel with nothing left in its pipe, or its pipe closed), which stops the group naming it."""
        pending = replies.pending
        ready = wait(list(pending.values()) + list(sentinels), timeout=0.05) if pending else time.sleep(0.02) or []
        for obj in ready:
            if obj in sentinels:
                rank = sentinels[obj]
                if rank in pending and not pending[rank].poll():
                    raise self._died(rank, replies.what)
                continue
            rank = next((r for r, c in pending.items() if c is obj), None)
            if rank is None:
                continue  # an error earlier in this batch cleared `pending`
            try:
                msg = obj.recv()
            except (EOFError, OSError):  # the rank's end of the pipe closed: it has exited
                raise self._died(rank, replies.what) from None
            del pending[rank]
            replies.take(rank, msg)

    def _take_remote(self, seq: int, replies: "_Replies") -> None:
        """The remote nodes' failure model: their ranks' replies through node 0's store; a node that could not join
        or is lost (its heartbeat, its death notice), or the store failing, stops the group (RemoteNodes says which)."""
        try:
            got = self.nodes.poll(seq, replies.remote_pending, replies.what)
        except NodeFailure as e:
            self.stop(graceful=False)
            raise WorkerGroupError(str(e)) from None
        for rank, msg in got:
            replies.remote_pending.discard(rank)
            replies.take(rank, msg)

    def _admission_failure(self) -> WorkerGroupError | None:
        """The admission's failure model (several nodes, while the group forms): a node missing or refused, as the
        error to raise (the group stopped) - a local rank's join fails at the same moment, so its error or death is
        reported as this. None when the group is one node's or every rank is in."""
        if self.nodes is None or self.nodes.admission is True:
            return None
        failed = self.nodes.admission_failure()
        if failed is None:
            return None
        self.stop(graceful=False)
        return WorkerGroupError(str(failed))

    def _check_waiting(self, what: str, interrupt, watch: CallWatch | None, pending: set) -> None:
        """While the ranks work: the caller's interrupt (a start or a load: stop the group), a stop asked from another
        thread, and for a forward its watch (Cancel, a hung rank)."""
        if self._stop_requested.is_set():
            raise WorkerGroupError(f"the worker group of {self.config.describe()} was stopped (Unload, or ComfyUI "
                                   f"exiting) during {what}")
        if interrupt is not None:
            try:
                interrupt()
            except BaseException:
                self.stop(graceful=False)
                raise
        action = watch.tick(pending) if watch is not None else None
        if action is None:
            return
        kind, text = action
        self.stop(graceful=False)
        if kind == "give_up":  # Cancel: the ranks could not stop the call in time
            log.warning("parallel_dit: Cancel during a model call on %s: %s; the group was stopped (its ranks, shared "
                        "memory and temporary files are gone) and the next prompt starts a fresh one",
                        self.config.describe(), text)
            raise watch.exc
        raise WorkerGroupError(f"{text} on {self.config.describe()}; the group was stopped and the next run starts a "
                               f"fresh one")

    def _end_cancelled(self, watch: CallWatch, cancelled: set) -> None:
        """After Cancel: every rank stopped the call at the same block (the group stays warm), or it finished the
        call anyway; either way the caller's interrupt propagates. A partial stop leaves the ranks unaligned."""
        if cancelled and len(cancelled) != self.config.local_ranks:
            self.stop(graceful=False)
            log.warning("parallel_dit: Cancel: ranks %s of %s stopped the call, the others finished it; the group was "
                        "stopped", sorted(cancelled), self.config.describe())
        elif cancelled:
            log.info("parallel_dit: Cancel: the ranks of %s stopped model call %d at block %d, %.1f s after the "
                     "request; the group stays warm", self.config.describe(), watch.call,
                     max(b for _, b in watch.progress.started()), time.monotonic() - watch.cancelled_at)
        raise watch.exc

    def _raise_error(self, errors: list, what: str) -> None:
        """A rank reported an error. Outside a load its peers may be blocked in a collective, and the error may be the
        echo of another failure: that one is named first (_raise_echoed_failure), and the group stops."""
        rank, text = errors[0]
        if what not in ("load", "vae_load"):
            self._raise_echoed_failure(errors, what)
            self.stop(graceful=False)
        raise WorkerGroupError(f"rank {rank} of {self.config.describe()} failed during {what}:\n{text}")

    def _raise_echoed_failure(self, errors: list, what: str) -> None:
        """What a rank's collective error ("connection closed") may echo, raised when seen: a failed admission, a local
        peer's death (its sentinel can fire after the echo arrives), a lost remote node (seen by its heartbeat)."""
        rank, text = errors[0]
        reporters = {r for r, _ in errors}
        others = {p.sentinel: r for r, p in enumerate(self.procs) if r not in reporters}
        dead = wait(list(others), timeout=0.5) if others else []
        last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "").strip()
        failed = self._admission_failure()
        if failed is not None:
            raise failed
        if dead:
            raise self._died(min(others[s] for s in dead), what, f"; rank {rank} then failed: {last}")
        lost = self.nodes.lost_node(text, what, f"rank {rank} then failed: {last}") if self.nodes is not None else None
        if lost is not None:
            self.stop(graceful=False)
            raise WorkerGroupError(str(lost)) from None

    def _died(self, rank: int, what: str, extra: str = "") -> WorkerGroupError:
        """Stop the group after rank `rank` died; the error names the rank and its exit code / signal."""
        failed = self._admission_failure()
        if failed is not None:
            return failed
        proc = self.procs[rank]
        proc.join(timeout=2.0)  # the sentinel fires as the process closes its fds, a moment before it is reapable
        code = proc.exitcode
        self.stop(graceful=False)
        return WorkerGroupError(
            f"rank {rank} of {self.config.describe()} died during {what} ({exit_cause(code)}){extra}; "
            f"the group was stopped and the next run starts a fresh one")

    # ---- model ---------------------------------------------------------------------------------
    @staticmethod
    def model_key_for(path: str, precision: str) -> tuple:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns, precision)

    def load(self, path: str, precision: str, loras=(), resident: bool = False, names: dict | None = None,
             interrupt=None) -> dict:
        """Load (or keep) a model on every rank, with `loras` ([(lora path, strength), ...]) merged into
        the shards. A no-op when the same file, precision and LoRA list are loaded; a changed LoRA list
        (or strength) re-merges in the running ranks without re-reading the model; a changed file or
        precision rebuilds the model in the same processes after dropping the old weights - unless the
        old model was loaded `resident`: then both stay on the ranks (forward's `model_key` picks).
        resident: 2 models = 2x weights per rank, no reads after the first load; not resident (swap): one
        model's memory, and the file is read again each time the group switches back to it.
        `interrupt` (ComfyUI's Cancel check) stops the group when it raises: a load cannot stop half way."""
        from ..weights.lora import lora_key

        key = self.model_key_for(path, precision)
        lkey = lora_key(loras)
        # Several models per group (Wan 2.2 A14B's experts): using one drops the others unless they were
        # loaded resident (a "load" with the same key and LoRAs only drops them; it reads nothing).
        held = self.models.get(key)
        if held is not None:
            held["resident"] = resident
            if held["lora_key"] == lkey and all(m["resident"] for k, m in self.models.items() if k != key):
                self.models.use(key)
                return held["info"]
        self.models.keep_only({k for k, m in self.models.items() if k != key and m["resident"]})
        self.models.use(None)
        self._loads += 1
        names = {**{os.path.realpath(p): n for p, n in (names or {}).items()}, **(names or {})}
        # several nodes: a LoRA without a models-folder name (a native LoraLoader's tensors, saved by the nodes) is
        # sent to the other nodes over the process group; the model file itself must be on every node
        ship = [lo[0] for lo in lkey if lo[0] not in names] if self.config.nodes > 1 else []
        replies = self._call("load", {"path": path, "precision": precision, "key": key, "loras": lkey,
                                      "keep": list(self.models), "check": f"load{self._loads}", "names": names,
                                      "ship": ship}, self.load_timeout, interrupt=interrupt)
        self.call_memory = [r.get("memory") for r in replies[:self.config.local_ranks]]
        self.models.add(key, {"info": replies[0], "lora_key": lkey, "resident": resident,
                              "rank_bytes": [r.get("param_bytes", 0) for r in replies]})
        if replies[0].get("reloaded", True):
            self.load_count += 1
        if replies[0].get("lora_changed"):
            self.lora_count += 1
        self.rank_load_stats = replies
        return replies[0]

    def resident_bytes(self, path: str, precision: str) -> list:
        """Per rank, the parameter bytes of the other models that stay on the ranks when this one loads (those
        loaded resident): what the devices' start-time free memory no longer has for it."""
        key = self.model_key_for(path, precision)
        out = [0] * self.config.world_size
        for k, m in self.models.items():
            if k != key and m["resident"]:
                for r, n in enumerate(m.get("rank_bytes") or []):
                    out[r] += n
        return out

    def holds_other_models(self, path: str, precision: str) -> bool:
        key = self.model_key_for(path, precision)
        return any(k != key for k in self.models)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, fault=None,
                model_key=None, compile=None, options: dict | None = None, values: dict | None = None,
                interrupt=None, activations: int | None = None, what: str = "", fold: int | None = None,
                **extras) -> torch.Tensor:
        """One model evaluation on the group: inputs and output cross through shared memory.
        `model_key` (model_key_for) picks one of several loaded models; default: the current one.
        `compile`: torch.compile kwargs (backend, mode, ...) the ranks' transformer blocks should run under, or
        None for eager; a change recompiles (or uncompiles) on the ranks before this call.
        `options`: the transformer_options of this call that cross to the ranks (model patches, their per-call
        values), handed to the host model's own code there; each patch object crosses once (patch_transfer.py).
        `values`: keyword inputs that are not tensors (numbers, lists: VACE's strengths), sent with the call;
        tensor `extras` are batched like x and cross through shared memory.
        `interrupt`: called every 50 ms while the ranks work (ComfyUI's Cancel check); what it raises asks the ranks
        to stop the call at the next block they all reach (the group stays warm) and is raised here once they did -
        or, when they cannot stop within a few seconds (a rank hung, or inside one long kernel), once the group was
        stopped. A rank that makes no progress while none computes is named (WorkerGroupError) within
        max(PDIT_STALL_FLOOR_S, 10 x the longest block seen).
        `activations`: the call's activation bytes on one device (the caller's estimate, `what` describes the call):
        a call the ranks cannot hold is refused (planner.CallTooLarge) before anything is sent.
        `fold`: this call's fold, forced (bench/placement.py, tests); None: the one predicted fastest on the links the
        group measured (planner.choose_fold)."""
        key = self.models.key if model_key is None else model_key
        held = self.models.get(key)
        if held is None:
            raise WorkerGroupError("no model is loaded on the worker group" if key is None else
                                   f"{key[0]} is not loaded on the worker group (load it first)")
        self.models.use(key)
        tensors = {"x": x, "timestep": timestep.reshape(-1).expand(x.shape[0]) if timestep.numel() == 1 else timestep,
                   "context": context}
        tensors.update({k: v for k, v in extras.items() if v is not None})
        need = 0 if activations is None else self._check_call(activations, x.shape[0], what)
        fold = self._choose_fold(held["info"], x, context) if fold is None else fold
        with self._lock:
            refs = self._in.write(tensors)
            # a packed latent of several streams (MiniMax H3's [video, audio]) comes back packed alike
            out_shape = tuple(x.shape) if "latent_shapes" in (values or {}) else \
                (x.shape[0], held["info"]["out_channels"], *x.shape[2:])
            out_ref = self._out.layout({"out": (out_shape, torch.float32)})["out"]
            self.calls += 1
            self.progress.clear_cancel()
            watch = CallWatch(self.progress, self.calls, self.pids, x.numel(), interrupt, self.timing,
                              remote=self.nodes is not None)
            payload = {"inputs": refs, "out": out_ref, "fault": fault, "key": key, "compile": compile,
                       "options": self._options_message(options), "values": dict(values or {}), "call": self.calls,
                       "fold": fold}
            self._call("forward", payload, self.step_timeout, watch=watch)
            if watch.longest > 0:  # what the next calls' stall limit and Cancel grace are measured against
                self.timing = (watch.longest, x.numel())
            self.activations_done = max(self.activations_done, need)
            return self._out.read(out_ref)

    def measure(self, info: dict, tokens: int, context: int) -> "object | None":
        """planner.Measured for a model of `info`'s width (ModelShape.to_info): the links from the start, one
        synthetic block timed by the ranks at `tokens` (and `context` text tokens) per sequence share the first time
        (cached per group, width and text length). None for a group of one rank."""
        from ..planner import Measured
        if not self.links:
            return None
        width = (info["num_heads"] * info["head_dim"], info["num_heads"], info["ffn_dim"], context)
        if width not in self.measured:
            shares = [s for s in range(1, self.config.world_size + 1) if self.config.world_size % s == 0]
            ask = {"dim": width[0], "heads": width[1], "ffn": width[2], "tokens": tokens, "context": context,
                   "shares": shares}
            replies = self._call("time_block", ask, self.load_timeout)
            self.measured[width] = Measured(self.links, replies[0]["blocks"], replies[0]["tokens"])
        return self.measured[width]

    def _choose_fold(self, info: dict, x: torch.Tensor, context: torch.Tensor) -> int | None:
        """The fold this call takes (planner.choose_fold on what the group measured); None where the mesh has
        nothing to choose (every replica has a row) or nothing was measured: the ranks use fold_for's."""
        from ..planner import CallShape, choose_fold, fold_choices, latent_tokens, one_rank_seconds
        from ..planner import predict_call_seconds
        rows = x.shape[0]
        if not self.measured_folds or rows >= self.config.replica_degree or not self.links:
            return None
        elt = 4 if self.config.dtype == "fp32" else 2
        call = CallShape(info["num_heads"] * info["head_dim"], info["num_heads"], info["num_layers"],
                         latent_tokens(tuple(x.shape), info["patch_size"]), rows, elt,
                         info["out_channels"] * math.prod(info["patch_size"]))
        measured = self.measure(info, call.tokens, context.shape[1] if context.dim() > 2 else 1)
        fold, seconds = choose_fold(self.config, call, measured)
        chosen = next(p for p in fold_choices(self.config, rows, call.heads) if p.fold == fold)
        self.last_placement = (chosen, seconds if seconds is not None else
                               predict_call_seconds(chosen, call, measured), one_rank_seconds(call, measured))
        return fold

    def _check_call(self, activations: int, rows: int, what: str) -> int:
        """The largest rank's activation bytes for this call; refused (CallTooLarge) when the ranks cannot hold them:
        CPU ranks against the host's available memory now, GPU ranks against what their device had after loading."""
        from ..planner import check_call
        from .rank import device_memory
        memory = self.call_memory
        if self.config.device == "cpu":
            memory = [device_memory(torch.device("cpu"))] * self.config.local_ranks
        return check_call(self.config, activations, rows, memory, self.activations_done, what)

    def _options_message(self, options: dict | None) -> dict | None:
        """A call's transformer_options for the ranks (PatchSender); several nodes: within what the store carries."""
        if not options:
            return None
        message = self.patch_sender.encode(options)
        if self.nodes is not None:
            size = len(message["options"]) + sum(map(len, message["define"].values()))
            if size > REMOTE_OPTIONS_LIMIT:
                self.patch_sender.forget()
                raise PatchTransferError(
                    f"the model patches of this call pickle to {size >> 20} MiB (a patch holding a model), more than "
                    f"node 0's store carries to the other nodes ({REMOTE_OPTIONS_LIMIT >> 20} MiB): run this graph on "
                    f"one node, or remove the patching node")
        return message

    def stats(self) -> list:
        return self._call("stats", None, 60)

    # ---- VAE: whole on every rank, the tiles of a decode / encode dealt over them (models/vae.py) ----------------
    def vae_load(self, path: str, precision: str, interrupt=None) -> tuple:
        """Load ComfyUI's own VAE for `path` on every rank (a no-op when they hold it); returns its key."""
        key = self.model_key_for(path, precision)
        if key not in self.vaes:
            if self.nodes is not None:
                raise WorkerGroupError("the Parallel VAE runs on one machine's ranks: give the VAE loader a Parallel "
                                       "Config with nodes 1")
            replies = self._call("vae_load", {"path": path, "precision": precision, "key": key}, self.load_timeout,
                                 interrupt=interrupt)
            self.vaes[key] = replies[0]
        return key

    def vae_tiles(self, key: tuple, x: torch.Tensor, out_shape: tuple, tiles: dict, encode: bool,
                  interrupt=None) -> torch.Tensor:
        """ComfyUI's tiled decode (or encode, `encode`) of `x` with `tiles` (decode_tiled's / encode_tiled's
        keywords), its tiles dealt over the ranks; `out_shape`: the result's shape, channels first (before the VAE's
        process_output, which the caller applies). `interrupt`: as for forward (Cancel stops at the next tile)."""
        if key not in self.vaes:
            raise WorkerGroupError(f"{key[0]} is not loaded on the worker group as a VAE (load it first)")
        with self._lock:
            refs = self._in.write({"x": x})
            out_ref = self._out.layout({"out": (tuple(out_shape), torch.float32)})["out"]
            self.calls += 1
            self.progress.clear_cancel()
            watch = CallWatch(self.progress, self.calls, self.pids, x.numel(), interrupt,
                              self.vae_timing or (60.0, x.numel()))
            payload = {"inputs": refs, "out": out_ref, "key": key, "tiles": dict(tiles), "encode": encode,
                       "call": self.calls}
            started = time.monotonic()
            self._call("vae_tiles", payload, self.step_timeout, watch=watch)
            self.vae_timing = (time.monotonic() - started, x.numel())
            return self._out.read(out_ref)


# ---- cache of warm groups, one per config -------------------------------------------------------
_groups: dict = {}
_groups_lock = threading.RLock()
starts = 0  # how many groups this process has started (tests assert warm reuse with it)


def _forget(group: WorkerGroup) -> None:
    with _groups_lock:
        for k, g in list(_groups.items()):
            if g is group:
                del _groups[k]


def get_group(config: ParallelConfig, interrupt=None, check=None) -> WorkerGroup:
    """The warm group for `config`, started if there is none (or the old one died). `interrupt`: see start().
    `check`: called before a new group's ranks start, once the other groups gave their devices back (what can be
    known before a process starts: the cores, the memory free now); what it raises leaves nothing started."""
    global starts
    with _groups_lock:
        g = _groups.get(config.key())
        if g is not None and g.alive():
            return g
        if g is not None:
            g.stop(graceful=False)
        # one group at a time holds the devices: a new config replaces the old group
        for other in list(_groups.values()):
            other.stop()
        g = WorkerGroup(config)
        if check is not None:
            check()
        g.start(interrupt)
        _groups[config.key()] = g
        starts += 1
        return g


def stop_all() -> None:
    for g in list(_groups.values()):
        g.stop()


def active_groups() -> list:
    return list(_groups.values())


atexit.register(stop_all)
