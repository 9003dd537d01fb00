"""The worker group across nodes: how node 0 (the ComfyUI process and its local ranks) drives the ranks of the other
nodes, with no listener of the pack's own - only torch's c10d store (node 0's, admission in multinode.py) and the
process group itself.

- Control: node 0 writes each op (`ctl/<seq>`) into the session's store, signed with the shared secret (HMAC over the
  session nonce, the sequence number and the bytes; the store is unauthenticated, so a rank unpickles nothing it
  cannot verify). Remote ranks wait on the next key; their replies (`reply/<seq>/<rank>`) are signed the same way.
  A successful forward needs no remote reply: rank 0 completes only after every remote rank took part in the
  output exchange below; a remote error is posted at once and node 0 stops the group.
- Inputs: rank 0 broadcasts the call's input bytes (the shared-memory block the ComfyUI process wrote, one uint8
  tensor) over a gloo group of rank 0 and every remote rank; each remote rank views its tensors in the received
  copy at the descriptors' offsets, exactly as a local rank views the segment.
- Outputs: every member of that group all-gathers (writes, first row, last row); rank 0 receives each remote
  replica leader's rows straight into the output segment.
- Liveness: each remote node's process bumps `hb/<node>` twice a second and posts `dead/<rank>` with the cause
  when one of its ranks exits; node 0 names the node and rank within HEARTBEAT_STALE_S (+ a poll) when a node is
  killed, its ranks die or its link drops, stops the group, and the next start waits `rejoin_timeout` for it.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import pickle
import tempfile
import threading
import time

import torch
import torch.distributed as dist

HEARTBEAT_S = 0.5
HEARTBEAT_STALE_S = 4.0
CTL_WAIT_S = 600.0  # one idle wait of a remote rank; the server closing ends it at once


class RemoteNodeLost(RuntimeError):
    """A remote node (or one of its ranks) is gone; the message names the node and the rank(s)."""


def _mac(secret: bytes, nonce: str, kind: str, seq: int, rank: int, data: bytes) -> bytes:
    head = f"pdit-{kind}\0{nonce}\0{seq}\0{rank}\0".encode()
    return hmac.new(secret, head + data, hashlib.sha256).digest()


def sign(secret: bytes, nonce: str, kind: str, seq: int, rank: int, obj) -> bytes:
    data = pickle.dumps(obj)
    return _mac(secret, nonce, kind, seq, rank, data) + data


def verify(secret: bytes, nonce: str, kind: str, seq: int, rank: int, blob: bytes):
    """The object in `blob`, after its HMAC checked out (raises otherwise; nothing is unpickled before)."""
    mac, data = blob[:32], blob[32:]
    if not hmac.compare_digest(mac, _mac(secret, nonce, kind, seq, rank, data)):
        raise PermissionError(f"a {kind} message #{seq} in the store is not signed with the shared secret: refused")
    return pickle.loads(data)


def session_config(store, secret: bytes, nonce: str, config_dict: dict | None = None) -> dict:
    """Node 0 publishes the group's config (signed); a remote rank reads and checks it."""
    if config_dict is not None:
        store.set("config", sign(secret, nonce, "config", 0, 0, config_dict))
        return config_dict
    store.wait(["config"], datetime.timedelta(seconds=300))
    return verify(secret, nonce, "config", 0, 0, store.get("config"))


# ---- node 0's side (the ComfyUI process) ---------------------------------------------------------------------------

class RemoteRanks:
    """Node 0's view of the other nodes' ranks through the session store: publishes ops, reads replies, watches the
    nodes' heartbeats and death notices."""

    def __init__(self, store, secret: bytes, nonce: str, config):
        self.store, self._secret, self.nonce, self.config = store, secret, nonce, config
        self.ranks = list(range(config.local_ranks, config.world_size))
        self.seq = 0
        self._answered: dict[int, int] = {}  # op -> how many replies were seen (the store counts them: one look)
        self._beats: dict[int, tuple[int, float]] = {}  # node -> (last counter seen, when it changed, local clock)
        self._last_check = 0.0

    def nodes_of(self, ranks) -> dict:
        out: dict = {}
        for r in ranks:
            out.setdefault(self.config.node_of(r), []).append(r)
        return out

    def publish(self, op: str, payload) -> int:
        self.seq += 1
        if self.seq > 2:  # the previous op's keys: every rank has read them (each op is answered before the next)
            for key in (f"ctl/{self.seq - 2}",):
                try:
                    self.store.delete_key(key)
                except Exception:
                    pass
        self.store.set(f"ctl/{self.seq}", sign(self._secret, self.nonce, "ctl", self.seq, -1, (op, payload)))
        return self.seq

    def replies(self, seq: int, pending) -> list:
        """(rank, message) for each of `pending` remote ranks that answered op `seq`. Polled while node 0 waits: one
        look at the op's reply counter, the replies themselves only when it moved."""
        answered = int(self.store.add(f"answered/{seq}", 0))
        if answered == self._answered.get(seq, 0):
            return []
        self._answered = {seq: answered}  # older ops are over
        out = []
        for rank in list(pending):
            key = f"reply/{seq}/{rank}"
            if self.store.check([key]):
                out.append((rank, verify(self._secret, self.nonce, "reply", seq, rank, self.store.get(key))))
                self.store.delete_key(key)
        return out

    def errors(self, seq: int) -> list:
        """Error replies to op `seq` from any remote rank (a forward's remote ranks answer only when they fail)."""
        return [(r, m) for r, m in self.replies(seq, self.ranks) if m[0] == "error"]

    def check_alive(self, force: bool = False) -> None:
        """Raise RemoteNodeLost naming the node and rank(s) when a node posted a death, or its heartbeat stopped for
        HEARTBEAT_STALE_S. Looks at the store at most every HEARTBEAT_S unless `force`."""
        now = time.monotonic()
        if not force and now - self._last_check < HEARTBEAT_S:
            return
        self._last_check = now
        for rank in self.ranks:
            if self.store.check([f"dead/{rank}"]):
                cause = self.store.get(f"dead/{rank}").decode(errors="replace")
                node = self.config.node_of(rank)
                raise RemoteNodeLost(f"rank {rank} on node {node} {cause}")
        for node, ranks in self.nodes_of(self.ranks).items():
            count = int(self.store.add(f"hb/{node}", 0))
            last = self._beats.get(node)
            if last is None or count != last[0]:
                self._beats[node] = (count, now)
            elif now - last[1] > HEARTBEAT_STALE_S:
                raise RemoteNodeLost(
                    f"node {node} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}) stopped answering: "
                    f"no heartbeat for {now - last[1]:.1f} s (the machine, its node process or the link to it is gone)")

    def wait_for_verdict(self, seconds: float) -> None:
        """After a communication error on node 0: give a lost node up to `seconds` to show as lost (raises
        RemoteNodeLost naming it); returns when every node still beats."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check_alive(force=True)
            time.sleep(0.1)


class NodeFailure(RuntimeError):
    """Node 0's half of a multi-node group failed: a node could not join or was lost, or the store failed. The message
    names the node and what to do; the group stops itself and raises it as its own error."""


def _looks_like_a_lost_peer(text: str) -> bool:
    t = text.lower()
    return any(w in t for w in ("connection", "closed", "reset by peer", "peer", "timed out", "timeout", "nccl",
                                "gloo", "broken pipe", "keyboardinterrupt"))


class RemoteNodes:
    """Node 0's half of a group that spans nodes, held by the WorkerGroup: hosts the rendezvous (torch's store, the
    group's config signed for the other nodes), admits every rank in a thread while the local ranks start, relays
    each op to the other nodes' ranks (RemoteRanks) and polls their replies and heartbeats, and shuts them down.
    What fails comes back as a NodeFailure saying which node and what to do."""

    def __init__(self, config):
        self.config = config
        self.server = None     # multinode.RendezvousServer
        self.channel = None    # RemoteRanks: ops out and replies in through the session store
        self.admission = None  # the admission thread's outcome: None (pending), True or the error
        self._admit_thread = None

    @property
    def ranks(self) -> list:
        return self.channel.ranks

    def host(self) -> dict:
        """Torch's store on the rendezvous address, the group's config published (signed) for the other nodes, and
        the admission of every rank running in a thread. Returns what node 0's local ranks join with."""
        from .multinode import RendezvousServer, World, parse_endpoint, read_secret, session_store
        c = self.config
        host, port = parse_endpoint(c.rendezvous)
        secret = read_secret(c.secret_file)
        self.server = RendezvousServer(host, port, secret, World(c.nodes, c.local_ranks), timeout=c.rejoin_timeout)
        session = session_store(self.server.store, self.server.nonce)
        session_config(session, secret, self.server.nonce, c.to_dict())
        self.channel = RemoteRanks(session, secret, self.server.nonce, c)
        self._admit_thread = threading.Thread(target=self._admit, name="pdit-admission", daemon=True)
        self._admit_thread.start()
        return {"host": host, "port": self.server.port, "secret_file": c.secret_file, "endpoint": self.server.endpoint,
                "timeout": c.rejoin_timeout + 30}

    def _admit(self) -> None:
        try:
            self.server.admit()
            self.admission = True
        except Exception as e:  # noqa: BLE001 (reported by the group, naming the node)
            e.__traceback__ = None  # its frames hold the store: the port must be free when the group stops
            self.admission = e

    def publish(self, op: str, payload) -> int:
        return self.channel.publish(op, payload)

    # ---- what fails, seen from node 0 ---------------------------------------------------------------------------
    def admission_failure(self, wait: float = 2.0) -> NodeFailure | None:
        """While the group forms: the admission's failure (a node missing or refused), waiting up to `wait` s for it
        to be decided - a local rank's join fails at the same moment. None once every rank is in."""
        until = time.monotonic() + wait
        while self.admission is None and time.monotonic() < until:
            time.sleep(0.05)
        return self._admission_error() if isinstance(self.admission, Exception) else None

    def _admission_error(self) -> NodeFailure:
        from .multinode import RendezvousRefused
        e, c = self.admission, self.config
        if isinstance(e, RendezvousRefused):
            hint = "fix that node's command (the same --secret-file, --nodes and --nproc-per-node as node 0's config)"
        else:
            missing = sorted({c.node_of(r) for r in range(c.world_size)} - {0} -
                             {c.node_of(r) for r in self.server.admitted})
            hint = (f"start (or restart) `python -m parallel_backend.runtime.node --rendezvous {c.rendezvous} "
                    f"--node-rank N --nodes {c.nodes} --nproc-per-node {c.local_ranks} --secret-file FILE --model-dir "
                    f"DIR` on node{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} and queue the "
                    f"prompt again")
        return NodeFailure(f"the group of {c.describe()} could not form: {e}; {hint}")

    def poll(self, seq: int, pending: set, what: str) -> list:
        """The remote ranks' replies to op `seq` (only errors when none is pending: a forward), after the checks that
        name a node that could not join or is lost (its heartbeat, its death notice) or a failed store."""
        if isinstance(self.admission, Exception):
            raise self._admission_error()
        try:
            got = self.channel.replies(seq, pending) if pending else self.channel.errors(seq)
            if self.admission is True:  # heartbeats count once every node is in
                self.channel.check_alive()
        except RemoteNodeLost as e:
            raise self._lost(e, what) from None
        except Exception as e:  # noqa: BLE001  the store itself failed
            raise NodeFailure(f"node 0's rendezvous store failed during {what}: {e}; the group was stopped") from None
        return got

    def lost_node(self, text: str, what: str, echo: str) -> NodeFailure | None:
        """After a local rank failed with `text`: a remote node's death shows there first as a connection error; give
        a lost node the time its heartbeat takes to show (the failure naming it), else None. `echo` says what the
        local rank reported."""
        if self.admission is not True or not _looks_like_a_lost_peer(text):
            return None
        try:
            self.channel.wait_for_verdict(HEARTBEAT_STALE_S + 1.5)
        except RemoteNodeLost as e:
            return self._lost(e, what, f" ({echo})")
        except Exception:  # noqa: BLE001
            pass
        return None

    def _lost(self, e: RemoteNodeLost, what: str, echo: str = "") -> NodeFailure:
        return NodeFailure(f"{e} during {what} on {self.config.describe()}{echo}; the group was stopped and the next "
                           f"run waits up to {self.config.rejoin_timeout:.0f} s for the node to rejoin")

    # ---- shutdown -----------------------------------------------------------------------------------------------
    def ask_shutdown(self) -> None:
        """Tell the remote ranks to leave (a graceful stop), when every one was admitted."""
        if self.channel is not None and self.admission is True:
            try:
                self.channel.publish("shutdown", None)
            except Exception:  # noqa: BLE001 (the store or a node is already gone)
                pass

    def close(self, graceful: bool) -> None:
        """Close the store, which ends every remote rank's session (they rejoin the next group), and free the port.
        Graceful: the remote ranks first get a few seconds to answer the shutdown."""
        if self.server is None:
            return
        if graceful and self.channel is not None and self.admission is True:
            self._await_shutdown()
        self.server.cancelled = True
        self.channel = None
        if self._admit_thread not in (None, threading.current_thread()):
            self._admit_thread.join(timeout=2.0)  # it holds the store until it sees the cancel (one poll)
        self.server.close()  # the last reference: the store's socket closes, the port is free

    def _await_shutdown(self, timeout: float = 5.0) -> None:
        """Let the remote ranks answer the shutdown before the store closes (they leave either way)."""
        pending, deadline = set(self.channel.ranks), time.monotonic() + timeout
        try:
            while pending and time.monotonic() < deadline:
                pending -= {r for r, _ in self.channel.replies(self.channel.seq, pending)}
                time.sleep(0.02)
        except Exception:  # noqa: BLE001
            pass


# ---- a remote rank's side ------------------------------------------------------------------------------------------

class StoreChannel:
    """A remote rank's control channel: the same recv / send a local rank has on its pipe, through the store."""

    def __init__(self, store, secret: bytes, nonce: str, rank: int):
        self.store, self._secret, self.nonce, self.rank = store, secret, nonce, rank
        self.seq = 0  # the start reply is #0; ops count from 1

    def recv(self):
        key = f"ctl/{self.seq + 1}"
        try:
            while True:
                try:
                    self.store.wait([key], datetime.timedelta(seconds=CTL_WAIT_S))
                    break
                except dist.DistStoreError:  # only the wait's timeout: an idle group; a closed store raises otherwise
                    continue
            blob = self.store.get(key)
        except dist.DistNetworkError as e:  # node 0 closed the store: the group is over
            raise EOFError(f"node 0's store closed: {e}") from None
        self.seq += 1
        return verify(self._secret, self.nonce, "ctl", self.seq, -1, blob)

    def send(self, msg) -> None:
        self.store.set(f"reply/{self.seq}/{self.rank}", sign(self._secret, self.nonce, "reply", self.seq, self.rank,
                                                             msg))
        self.store.add(f"answered/{self.seq}", 1)  # after the reply: node 0 looks at this counter only


# ---- the process group's part: inputs out, outputs back ------------------------------------------------------------

class NodeIO:
    """Inputs from rank 0 to the remote ranks and outputs back, over a gloo group of rank 0 and every remote rank
    (built collectively by every rank, local or not: `dist.new_group` is collective)."""

    def __init__(self, config, rank: int):
        self.rank = rank
        self.members = [0] + list(range(config.local_ranks, config.world_size))
        self.group = dist.new_group(self.members, backend="gloo")
        self.member = rank in self.members
        self.remote = rank >= config.local_ranks
        self._buf = torch.empty(0, dtype=torch.uint8)

    def inputs(self, refs: dict, reader) -> dict:
        """The call's input tensors on this rank: views of the shared memory (node 0) or of the broadcast copy."""
        if not self.member:
            return {k: reader.view(r) for k, r in refs.items()}
        end = max((r.offset + r.nbytes for r in refs.values()), default=0)
        if self.rank == 0:
            first = next(iter(refs.values()))
            raw = reader.view(type(first)(first.segment, 0, (end,), "torch.uint8"))
        else:
            if self._buf.numel() < end:
                self._buf = torch.empty(end, dtype=torch.uint8)
            raw = self._buf[:end]
        dist.broadcast(raw, src=0, group=self.group)
        if self.rank == 0:
            return {k: reader.view(r) for k, r in refs.items()}
        from .transport import _DTYPES
        return {k: raw[r.offset:r.offset + r.nbytes].view(_DTYPES[r.dtype]).view(r.shape) for k, r in refs.items()}

    def outputs(self, out, rows: slice | None, out_ref, reader) -> None:
        """Bring the remote replica leaders' rows to rank 0's output segment (local leaders wrote theirs)."""
        if not self.member:
            return
        mine = torch.tensor([1 if (self.remote and rows is not None) else 0,
                             rows.start if rows is not None else 0, rows.stop if rows is not None else 0])
        table = [torch.zeros(3, dtype=torch.int64) for _ in self.members]
        dist.all_gather(table, mine, group=self.group)
        if self.rank == 0:
            target = reader.view(out_ref)
            for member, (writes, start, stop) in zip(self.members, (t.tolist() for t in table)):
                if writes:
                    dist.recv(target[start:stop], src=member, group=self.group)
        elif rows is not None:
            dist.send(out.to("cpu", torch.float32).contiguous(), dst=0, group=self.group)


    def share_file(self, path: str, folder: str) -> str:
        """A file only node 0 has (a LoRA a native loader made): rank 0 broadcasts its bytes, each remote rank
        writes them under `folder` and gets that path; node 0's ranks keep `path`."""
        if not self.member:
            return path
        size = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            size[0] = data.numel()
        dist.broadcast(size, src=0, group=self.group)
        if self.rank != 0:
            data = torch.empty(int(size[0]), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.group)
        if self.rank == 0:
            return path
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, os.path.basename(path))
        with open(local + ".part", "wb") as f:
            f.write(data.numpy().tobytes())
        os.replace(local + ".part", local)
        return local


def load_paths(payload: dict, model_dir: str | None, node: int) -> tuple[str, list]:
    """This node's model file and LoRA files for a load op. Node 0 uses its own paths; the other nodes look up the
    names node 0 gives (relative to ComfyUI's models folder, e.g. diffusion_models/x.safetensors) under their
    --model-dir. LoRAs node 0 ships (payload "ship": files only it has) keep node 0's path here; NodeIO.share_file
    brings them."""
    loras = list(payload.get("loras") or ())
    if node == 0:
        return payload["path"], loras
    from .multinode import ModelFileMismatch, resolve_model
    names = payload.get("names") or {}
    if not model_dir:
        raise ModelFileMismatch(f"node {node} was started without --model-dir: give it the folder that holds the "
                                f"models under the same names as node 0's ComfyUI models folder")
    ship = set(payload.get("ship") or ())
    missing = [p for p in [payload["path"], *(lo[0] for lo in loras)] if p not in names and p not in ship]
    if missing:
        raise ModelFileMismatch(f"{missing[0]} has no name relative to a ComfyUI models folder, so node {node} cannot "
                                f"find its copy: load it from models/diffusion_models (or unet, loras)")
    path = resolve_model(model_dir, names[payload["path"]])
    loras = [lo if lo[0] in ship else (resolve_model(model_dir, names[lo[0]]), *lo[1:]) for lo in loras]
    return path, loras


def describe_nodes(config) -> str:
    return json.dumps({"nodes": config.nodes, "ranks_per_node": config.local_ranks})


class FileCheck:
    """Multi-node loads: this node's copy of the model (and LoRA) files, checked on every rank against node 0's
    (size + header sha256, through the store) before anything is read. LoRA files only node 0 has (those a native
    LoraLoader produced) are sent to the other nodes over the process group instead."""

    def __init__(self, config, rank: int, store, model_dir: str | None, io=None):
        from .multinode import World
        self.config, self.rank, self.store, self.model_dir, self.io = config, rank, store, model_dir, io
        self.world = World(config.nodes, config.local_ranks)
        self.shipped = os.path.join(tempfile.gettempdir(), f"pdit_shipped_{os.getpid()}")

    def __call__(self, payload: dict) -> tuple:
        from .multinode import ModelFileMismatch, check_model_file
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
