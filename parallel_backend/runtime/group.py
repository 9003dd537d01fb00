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
from .transport import ShmTensorSlot

REMOTE_OPTIONS_LIMIT = 64 << 20  # bytes of model patches one call may carry through node 0's store
log = logging.getLogger("parallel_dit")


class WorkerGroupError(RuntimeError):
    """A rank failed; the message names the rank, the config and the cause."""


class WorkerGroupInterrupted(RuntimeError):
    pass


def _exit_cause(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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
        self.model_key = None
        self.lora_key: tuple = ()
        self.model_info: dict | None = None
        # every model on the ranks, key -> {"info", "lora_key", "resident"}; model_key / model_info above
        # are the current one. Loading a model drops the others unless they were loaded resident.
        self.models: dict = {}
        self.load_count = 0   # model (re)builds on the ranks
        self.lora_count = 0   # LoRA list changes merged on the ranks
        self._lock = threading.RLock()
        self._tmpdir = None
        self._in = self._out = None
        self.closed = False
        self.server = self.remote = None  # several nodes: node 0's RendezvousServer and RemoteRanks
        self._admission = None            # the admission thread's outcome: None (pending), True or the error
        self._admit_thread = None
        self._loads = 0
        self.patch_sender = PatchSender()  # which model patch objects the ranks hold
        self.progress = None   # OwnerProgress: the ranks' block counters and the cancel word (progress.py)
        self.calls = 0         # forwards sent to this group (the ranks number them the same)
        self.timing = None     # (seconds of the longest block, tokens of its call): what a stall is measured against
        self._stop_requested = threading.Event()  # stop() from another thread while a call waits (Unload, exit)
        self.call_memory: list = []  # per local rank, what its device had after the last load (forward's fit check)
        self.activations_done = 0    # the largest rank's activation bytes of a call that ran (CPU ranks keep that heap)
        self._in_call, self._call_thread = False, None

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
            multinode = self._host_rendezvous() if self.config.nodes > 1 else None
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
            self._in, self._out = ShmTensorSlot("in"), ShmTensorSlot("out")
        except BaseException:
            self.stop(graceful=False)
            raise
        return self

    def _host_rendezvous(self) -> dict:
        """Node 0: torch's store on the rendezvous address, the group's config published (signed) for the other
        nodes, and the admission of every rank running in a thread while the local ranks start."""
        from .multinode import RendezvousServer, World, parse_endpoint, read_secret, session_store
        from .remote import RemoteRanks, session_config

        c = self.config
        host, port = parse_endpoint(c.rendezvous)
        secret = read_secret(c.secret_file)
        self.server = RendezvousServer(host, port, secret, World(c.nodes, c.local_ranks), timeout=c.rejoin_timeout)
        session = session_store(self.server.store, self.server.nonce)
        session_config(session, secret, self.server.nonce, c.to_dict())
        self.remote = RemoteRanks(session, secret, self.server.nonce, c)

        def admit():
            try:
                self.server.admit()
                self._admission = True
            except Exception as e:  # noqa: BLE001 (reported by _collect, naming the node)
                e.__traceback__ = None  # its frames hold the store: the port must be free when the group stops
                self._admission = e
        self._admit_thread = threading.Thread(target=admit, name="pdit-admission", daemon=True)
        self._admit_thread.start()
        return {"host": host, "port": self.server.port, "secret_file": c.secret_file, "endpoint": self.server.endpoint,
                "timeout": c.rejoin_timeout + 30}

    def _admission_failed(self) -> WorkerGroupError:
        from .multinode import RendezvousRefused
        e, c = self._admission, self.config
        if isinstance(e, RendezvousRefused):
            hint = "fix that node's command (the same --secret-file, --nodes and --nproc-per-node as node 0's config)"
        else:
            missing = sorted({c.node_of(r) for r in range(c.world_size)} - {0} -
                             {c.node_of(r) for r in self.server.admitted})
            hint = (f"start (or restart) `python -m parallel_backend.runtime.node --rendezvous {c.rendezvous} "
                    f"--node-rank N --nodes {c.nodes} --nproc-per-node {c.local_ranks} --secret-file FILE --model-dir "
                    f"DIR` on node{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} and queue the "
                    f"prompt again")
        self.stop(graceful=False)
        return WorkerGroupError(f"the group of {c.describe()} could not form: {e}; {hint}")

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
                if self.remote is not None and self._admission is True:
                    try:
                        self.remote.publish("shutdown", None)
                    except Exception:  # noqa: BLE001 (the store or a node is already gone)
                        pass
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
            if self.server is not None:  # closing the store ends every remote rank's session (they rejoin later)
                if graceful and self.remote is not None and self._admission is True:
                    self._await_remote_shutdown()
                self.server.cancelled = True
                self.remote = None
                if self._admit_thread not in (None, threading.current_thread()):
                    self._admit_thread.join(timeout=2.0)  # it holds the store until it sees the cancel (one poll)
                self.server.close()  # the last reference: the store's socket closes, the port is free
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

    def _await_remote_shutdown(self, timeout: float = 5.0) -> None:
        """Let the remote ranks answer the shutdown before the store closes (they leave either way)."""
        pending, deadline = set(self.remote.ranks), time.monotonic() + timeout
        try:
            while pending and time.monotonic() < deadline:
                pending -= {r for r, _ in self.remote.replies(self.remote.seq, pending)}
                time.sleep(0.02)
        except Exception:  # noqa: BLE001
            pass

    # ---- control channel -----------------------------------------------------------------------
    def _remote_poll(self, seq: int, remote_pending: set, what: str) -> list:
        """Several nodes: the remote ranks' replies to op `seq`, and the checks that name a lost node."""
        from .remote import RemoteNodeLost
        if self._admission is not None and self._admission is not True:
            raise self._admission_failed()
        try:
            got = self.remote.replies(seq, remote_pending) if remote_pending else self.remote.errors(seq)
            if self._admission is True:  # heartbeats count once every node is in
                self.remote.check_alive()
        except RemoteNodeLost as e:
            self.stop(graceful=False)
            raise WorkerGroupError(f"{e} during {what} on {self.config.describe()}; the group was stopped and the "
                                   f"next run waits up to {self.config.rejoin_timeout:.0f} s for the node to rejoin")
        except Exception as e:  # noqa: BLE001  the store itself failed
            self.stop(graceful=False)
            raise WorkerGroupError(f"node 0's rendezvous store failed during {what}: {e}; the group was stopped")
        return got

    def _collect(self, timeout: float, what: str, interrupt=None, seq: int = 0, watch: CallWatch | None = None) -> list:
        """Wait for one reply per rank, watching for dead ranks; tear down on any failure. Several nodes: the other
        nodes' ranks answer through the store (`seq`: the op's number) - except for a forward, where only a remote
        failure answers (rank 0 completes after every remote rank delivered). `interrupt` (ComfyUI's Cancel; not for
        a forward, whose `watch` polls it) stops the group and propagates; `watch` (a forward): Cancel, hung ranks."""
        replies = [None] * self.config.world_size
        pending = dict(enumerate(self.conns))
        remote_pending = set(self.remote.ranks) if self.remote is not None and what != "forward" else set()
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        deadline = time.monotonic() + timeout
        errors, cancelled = [], set()
        while pending or remote_pending:
            self._check_waiting(what, interrupt, watch, set(pending) | remote_pending)
            if self.remote is not None:
                for rank, msg in self._remote_poll(seq, remote_pending, what):
                    remote_pending.discard(rank)
                    self._take(rank, msg, what, replies, errors, cancelled, pending, remote_pending)
            ready = wait(list(pending.values()) + list(sentinels), timeout=0.05) if pending else \
                time.sleep(0.02) or []
            for obj in ready:
                if obj in sentinels:
                    rank = sentinels[obj]
                    if rank in pending and not pending[rank].poll():
                        raise self._died(rank, what)
                    continue
                rank = next((r for r, c in pending.items() if c is obj), None)
                if rank is None:
                    continue  # an error earlier in this batch cleared `pending`
                try:
                    msg = obj.recv()
                except (EOFError, OSError):  # the rank's end of the pipe closed: it has exited
                    raise self._died(rank, what) from None
                del pending[rank]
                self._take(rank, msg, what, replies, errors, cancelled, pending, remote_pending)
            if time.monotonic() > deadline:
                self.stop(graceful=False)
                raise WorkerGroupError(f"ranks {sorted(set(pending) | remote_pending)} of {self.config.describe()} did "
                                       f"not answer {what} within {timeout:.0f} s; the group was stopped")
        if errors:
            self._raise_error(errors, what)
        if watch is not None and watch.exc is not None:
            self._end_cancelled(watch, cancelled)
        elif cancelled:  # the ranks stopped a call nobody cancelled: their state is unknown
            self.stop(graceful=False)
            raise WorkerGroupError(f"ranks {sorted(cancelled)} of {self.config.describe()} stopped {what} unasked; "
                                   f"the group was stopped")
        return replies

    @staticmethod
    def _take(rank, msg, what, replies, errors, cancelled, pending, remote_pending) -> None:
        """One rank's reply: ok (its result), cancelled (it stopped the call where every rank agreed), or error."""
        if msg[0] == "error":
            errors.append((msg[1], msg[2]))
            if what != "load":  # peers may be blocked in a collective: do not wait for them
                pending.clear()
                remote_pending.clear()
        elif msg[0] == "cancelled":
            cancelled.add(rank)
        else:
            replies[rank] = msg[1]

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
        rank, text = errors[0]
        if what != "load":
            # A peer's death shows up on the other ranks as a collective error ("connection closed"),
            # which can arrive before the dead rank's sentinel is seen: name the dead rank, not its echo.
            reporters = {r for r, _ in errors}
            others = {p.sentinel: r for r, p in enumerate(self.procs) if r not in reporters}
            dead = wait(list(others), timeout=0.5) if others else []
            last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "").strip()
            failed = self._admission_outcome() if self.remote is not None and self._admission is not True else None
            if failed is not None:  # a local rank's join fails as the admission does: report the admission
                raise failed
            if dead:
                raise self._died(min(others[s] for s in dead), what, f"; rank {rank} then failed: {last}")
            if self.remote is not None and self._admission is True and _looks_like_a_lost_peer(text):
                from .remote import HEARTBEAT_STALE_S, RemoteNodeLost
                try:  # a remote node's death shows here first as a connection error: name the node
                    self.remote.wait_for_verdict(HEARTBEAT_STALE_S + 1.5)
                except RemoteNodeLost as e:
                    self.stop(graceful=False)
                    raise WorkerGroupError(f"{e} during {what} on {self.config.describe()} (rank {rank} then "
                                           f"failed: {last}); the group was stopped and the next run waits up to "
                                           f"{self.config.rejoin_timeout:.0f} s for the node to rejoin") from None
                except Exception:  # noqa: BLE001
                    pass
            self.stop(graceful=False)
        raise WorkerGroupError(f"rank {rank} of {self.config.describe()} failed during {what}:\n{text}")

    def _admission_outcome(self, wait: float = 2.0) -> WorkerGroupError | None:
        """Several nodes, while the group forms: the admission's failure (a node missing or refused) as the error to
        raise, waiting up to `wait` s for it to be decided - a local rank's join fails at the same moment."""
        until = time.monotonic() + wait
        while self._admission is None and time.monotonic() < until:
            time.sleep(0.05)
        return self._admission_failed() if isinstance(self._admission, Exception) else None

    def _died(self, rank: int, what: str, extra: str = "") -> WorkerGroupError:
        """Stop the group after rank `rank` died; the error names the rank and its exit code / signal."""
        if self.remote is not None and self._admission is not True:
            failed = self._admission_outcome()
            if failed is not None:
                return failed
        proc = self.procs[rank]
        proc.join(timeout=2.0)  # the sentinel fires as the process closes its fds, a moment before it is reapable
        code = proc.exitcode
        self.stop(graceful=False)
        return WorkerGroupError(
            f"rank {rank} of {self.config.describe()} died during {what} ({_exit_cause(code)}){extra}; "
            f"the group was stopped and the next run starts a fresh one")

    def _call(self, op: str, payload, timeout: float, interrupt=None, watch: CallWatch | None = None) -> list:
        with self._lock:
            if not self.alive():
                raise WorkerGroupError("the worker group is not running (it was stopped or a rank died)")
            seq = self.remote.publish(op, payload) if self.remote is not None else 0
            for c in self.conns:
                c.send((op, payload))
            self._in_call, self._call_thread = True, threading.get_ident()
            try:
                return self._collect(timeout, op, interrupt=interrupt, seq=seq, watch=watch)
            finally:
                self._in_call = False

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
                self.model_key, self.lora_key, self.model_info = key, lkey, held["info"]
                return held["info"]
        self.models = {k: m for k, m in self.models.items() if k != key and m["resident"]}
        self.model_key = self.model_info = None
        self._loads += 1
        names = {**{os.path.realpath(p): n for p, n in (names or {}).items()}, **(names or {})}
        # several nodes: a LoRA without a models-folder name (a native LoraLoader's tensors, saved by the nodes) is
        # sent to the other nodes over the process group; the model file itself must be on every node
        ship = [lo[0] for lo in lkey if lo[0] not in names] if self.config.nodes > 1 else []
        replies = self._call("load", {"path": path, "precision": precision, "key": key, "loras": lkey,
                                      "keep": list(self.models), "check": f"load{self._loads}", "names": names,
                                      "ship": ship}, self.load_timeout, interrupt=interrupt)
        self.model_key, self.lora_key, self.model_info = key, lkey, replies[0]
        self.call_memory = [r.get("memory") for r in replies[:self.config.local_ranks]]
        self.models[key] = {"info": replies[0], "lora_key": lkey, "resident": resident,
                            "rank_bytes": [r.get("param_bytes", 0) for r in replies]}
        if replies[0].get("reloaded", True):
            self.load_count += 1
        if replies[0].get("lora_changed"):
            self.lora_count += 1
        self.rank_load_stats = replies
        return self.model_info

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
                interrupt=None, activations: int | None = None, what: str = "", **extras) -> torch.Tensor:
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
        a call the ranks cannot hold is refused (planner.CallTooLarge) before anything is sent."""
        key = self.model_key if model_key is None else model_key
        held = self.models.get(key)
        if held is None:
            raise WorkerGroupError("no model is loaded on the worker group" if key is None else
                                   f"{key[0]} is not loaded on the worker group (load it first)")
        self.model_key, self.lora_key, self.model_info = key, held["lora_key"], held["info"]
        tensors = {"x": x, "timestep": timestep.reshape(-1).expand(x.shape[0]) if timestep.numel() == 1 else timestep,
                   "context": context}
        tensors.update({k: v for k, v in extras.items() if v is not None})
        need = 0 if activations is None else self._check_call(activations, x.shape[0], what)
        with self._lock:
            refs = self._in.write(tensors)
            out_shape = (x.shape[0], self.model_info["out_channels"], *x.shape[2:])
            out_ref = self._out.layout({"out": (out_shape, torch.float32)})["out"]
            self.calls += 1
            self.progress.clear_cancel()
            watch = CallWatch(self.progress, self.calls, self.pids, x.numel(), interrupt, self.timing,
                              remote=self.remote is not None)
            payload = {"inputs": refs, "out": out_ref, "fault": fault, "key": key, "compile": compile,
                       "options": self._options_message(options), "values": dict(values or {}), "call": self.calls}
            self._call("forward", payload, self.step_timeout, watch=watch)
            if watch.longest > 0:  # what the next calls' stall limit and Cancel grace are measured against
                self.timing = (watch.longest, x.numel())
            self.activations_done = max(self.activations_done, need)
            return self._out.read(out_ref)

    def _check_call(self, activations: int, rows: int, what: str) -> int:
        """The largest rank's activation bytes for this call; refused (CallTooLarge) when the ranks cannot hold them:
        CPU ranks against the host's available memory now, GPU ranks against what their device had after loading."""
        from ..planner import check_call
        from .worker import device_memory
        memory = self.call_memory
        if self.config.device == "cpu":
            memory = [device_memory(torch, torch.device("cpu"))] * self.config.local_ranks
        return check_call(self.config, activations, rows, memory, self.activations_done, what)

    def _options_message(self, options: dict | None) -> dict | None:
        """A call's transformer_options for the ranks (PatchSender); several nodes: within what the store carries."""
        if not options:
            return None
        message = self.patch_sender.encode(options)
        if self.remote is not None:
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


def _looks_like_a_lost_peer(text: str) -> bool:
    t = text.lower()
    return any(w in t for w in ("connection", "closed", "reset by peer", "peer", "timed out", "timeout", "nccl",
                                "gloo", "broken pipe", "keyboardinterrupt"))


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
