"""Rendezvous across machines: torch's own c10d TCPStore on the address the user gives, a shared-secret admission
before anyone forms the group, then torch's init_process_group on that store (gloo on CPU, NCCL on CUDA).

Who does what:
- node 0's host process (the ComfyUI process later; `python -m parallel_backend.runtime.node --node-rank 0` now)
  runs a `RendezvousServer`: the TCPStore server, listening on a socket this module binds to the given address
  only (TCPStore binds every interface when it creates its socket itself: `*:PORT`, both libuv and the legacy
  backend; handed a bound socket through `master_listen_fd` it listens on that one). It writes a fresh random
  nonce and admits the ranks (`admit`).
- every rank (node 0's own too) connects as a client (`connect_store`) and calls `join_group`: it proves it knows
  the secret (HMAC-SHA256(secret, nonce, rank, node, world)) under its rank's key; node 0 checks every proof and
  answers with its own HMAC (so a rank also knows node 0 holds the secret). Only when every rank of the world was
  admitted does node 0 mark the group formed; one refused rank (wrong secret, wrong world, a rank claimed twice)
  aborts the rendezvous for everyone, before any rank calls init_process_group. The secret never crosses the
  network, only HMACs of fresh nonces.
- gloo (and NCCL's bootstrap) use the interface that holds the address routing to the rendezvous host:
  `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` name it, so their listeners bind that interface's address only.
- once formed, every rank proves the secret again over the group's own connections (an all-gather of HMACs):
  whoever the group's connections reach knows the secret.

The store itself is plain unauthenticated TCP (torch's): a party on the network can still connect to it and read
or write keys. The admission keeps a rank without the secret out of the group; it is no defence against an active
attacker on the wire. Trusted networks only.

`file_fingerprint` / `check_model_file`: each rank's copy of the model file (size + sha256 of the safetensors /
GGUF header bytes) is compared with node 0's through the store before anything is loaded.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import secrets as secrets_mod
import socket
import struct
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import parse_endpoint  # noqa: F401  (the rendezvous field's format: config validates it)

MIN_SECRET_BYTES = 16
POLL_S = 0.05
# node 0's own ranks are processes this machine is starting (importing torch and ComfyUI's model code): they get at
# least this long, however short the rejoin timeout, which is the other nodes' time once node 0's ranks are in
LOCAL_START_S = 120.0
_ROOT = "pdit/rdzv/"  # every key this module writes lives under it


class RendezvousError(RuntimeError):
    """The group could not be formed; the message names the node / rank and the reason."""


class RendezvousRefused(RendezvousError):
    """A rank was refused admission (this rank, or one node 0 refused)."""


class ModelFileMismatch(RuntimeError):
    """A node's copy of the model file is missing or differs from node 0's."""


# ---- addresses, secret --------------------------------------------------------------------------------------------

def resolve_address(host: str) -> str:
    """One numeric address for `host` (an address stays itself; a name is resolved once)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        raise RendezvousError(f"rendezvous host {host!r} does not resolve: {e}") from e


def read_secret(path: str) -> bytes:
    """The shared secret from a file (surrounding whitespace stripped), at least MIN_SECRET_BYTES long."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
        mode = os.stat(path).st_mode
    except OSError as e:
        raise RendezvousError(f"secret file {path}: {e.strerror}") from e
    if len(secret) < MIN_SECRET_BYTES:
        raise RendezvousError(f"secret file {path}: {len(secret)} bytes, need at least {MIN_SECRET_BYTES}; make one "
                              f"with `python -c \"import secrets; print(secrets.token_hex(32))\" > {path}` and copy "
                              f"the same file to every node")
    if mode & 0o077:
        print(f"[pdit] warning: secret file {path} is readable by other users (chmod 600 it)", file=sys.stderr)
    return secret


def _mac(secret: bytes, *parts) -> str:
    msg = b"\0".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


# ---- which interface: the one on the rendezvous subnet -----------------------------------------------------------

def local_address_towards(host: str, port: int = 9) -> str:
    """The local address this machine's routing uses to reach `host` (a UDP connect: nothing is sent)."""
    addr = resolve_address(host)
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, port))
        except OSError as e:
            raise RendezvousError(f"no route from this machine to the rendezvous address {addr}: {e}") from e
        return s.getsockname()[0]


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def _ipv6_interfaces() -> dict:
    out = {}
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr, *_, name = line.split()
                out.setdefault(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))), name)
    except OSError:
        pass
    return out


def interface_of(address: str) -> str:
    """The name of the local interface that holds `address` (Linux)."""
    address = str(ipaddress.ip_address(address.split("%")[0]))
    if ":" in address:
        name = _ipv6_interfaces().get(address)
    else:
        name = next((n for _, n in socket.if_nameindex() if _ipv4_of(n) == address), None)
    if name is None:
        raise RendezvousError(f"no local interface holds {address}")
    return name


def use_interface_for(host: str) -> tuple[str, str]:
    """Point gloo and NCCL at the interface on the rendezvous subnet (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, read
    when a process group is created): their listeners bind its address, never another interface or loopback.
    Returns (interface, address)."""
    address = local_address_towards(host)
    name = interface_of(address)
    os.environ["GLOO_SOCKET_IFNAME"] = name
    os.environ["NCCL_SOCKET_IFNAME"] = name
    return name, address


# ---- the store ---------------------------------------------------------------------------------------------------

def _listen_socket(address: str, port: int) -> socket.socket:
    """A TCP socket bound to `address` only and listening (TCPStore takes it over through master_listen_fd)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise RendezvousError(f"rendezvous host {address!r}: node 0 needs an address to bind") from None
    if ip.is_unspecified:
        raise RendezvousError(f"rendezvous address {address} means every interface: give the address of the one "
                              f"interface the other nodes reach (the store binds only that)")
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        why = {errno.EADDRNOTAVAIL: "it is not an address of this machine",
               errno.EADDRINUSE: "the port is in use"}.get(e.errno, e.strerror)
        raise RendezvousError(f"node 0 cannot listen on {address}:{port}: {why}") from e
    return sock


def connect_store(host: str, port: int, timeout: float = 300.0) -> dist.TCPStore:
    """A client of node 0's store (retries until node 0 is up, for `timeout` seconds)."""
    try:
        return dist.TCPStore(resolve_address(host), port, None, False, datetime.timedelta(seconds=timeout),
                             wait_for_workers=False)
    except (RuntimeError, dist.DistError) as e:
        raise RendezvousError(f"cannot reach the rendezvous store at {host}:{port} within {timeout:.0f} s: {e}") from e


def _root(store) -> dist.PrefixStore:
    return dist.PrefixStore(_ROOT, store)


def _get(store, key: str, timeout: float) -> bytes:
    store.wait([key], datetime.timedelta(seconds=timeout))
    return store.get(key)


@dataclass(frozen=True)
class World:
    """The group's shape: `nodes` machines x `nproc_per_node` ranks; rank = node * nproc_per_node + local."""
    nodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.nproc_per_node

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.nproc_per_node} rank(s) = {self.world_size}"


class RendezvousServer:
    """Node 0's store, bound to `address:port` only, and the admission of every rank. Keep it alive as long as the
    group lives (the group's later subgroups rendezvous through it too)."""

    def __init__(self, address: str, port: int, secret: bytes, world: World, timeout: float = 300.0):
        self.address, self.world, self.timeout = resolve_address(address), world, timeout
        self._secret = secret
        sock = _listen_socket(self.address, port)
        self.port = sock.getsockname()[1]
        # TCPStore owns the descriptor from here on (it closes it with the server)
        self.store = dist.TCPStore(self.address, self.port, None, True, datetime.timedelta(seconds=timeout),
                                   wait_for_workers=False, master_listen_fd=sock.detach())
        self.nonce = secrets_mod.token_hex(16)
        root = _root(self.store)
        root.set("nonce", self.nonce)
        root.set("world", json.dumps({"nodes": world.nodes, "nproc_per_node": world.nproc_per_node}))
        self.admitted: dict[int, dict] = {}
        self.cancelled = False  # set by the owner to end a pending `admit` (the group is being stopped)

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    def _check_claim(self, rank: int, claim: dict) -> str | None:
        """Why `claim` is refused, or None."""
        w = self.world
        theirs = World(int(claim.get("nodes", 0)), int(claim.get("nproc_per_node", 0)))
        if theirs != w:
            return (f"it was started for {theirs.describe()} ranks, node 0 for {w.describe()} (--nodes / "
                    f"--nproc-per-node must be the same on every node)")
        if int(claim.get("node", -1)) != w.node_of(rank):
            return f"rank {rank} belongs to node {w.node_of(rank)}, it says node {claim.get('node')}"
        expect = _mac(self._secret, "pdit-join", self.nonce, rank, claim["node"], theirs.nodes, theirs.nproc_per_node)
        if not hmac.compare_digest(str(claim.get("proof", "")), expect):
            return "its proof of the shared secret does not match node 0's secret (wrong --secret-file?)"
        return None

    def admit(self, timeout: float | None = None) -> dict:
        """Wait for every rank's claim, check each, and mark the group formed (returns rank -> claim). The first
        refusal (or the deadline) aborts the rendezvous for every rank and raises, naming the rank and node."""
        root, w = _root(self.store), self.world
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait  # the other nodes' (pushed back until node 0's ranks are in)
        local_deadline = time.monotonic() + max(wait, LOCAL_START_S)
        pending = set(range(w.world_size)) - set(self.admitted)
        local = {r for r in pending if w.node_of(r) == 0}
        while pending:
            if self.cancelled:
                self._abort("node 0 stopped the group")
                raise RendezvousError("the rendezvous was cancelled: node 0 stopped the group")
            for rank in sorted(pending):
                if not root.check([f"join/{rank}"]):
                    continue
                claim = json.loads(root.get(f"join/{rank}"))
                why = self._check_claim(rank, claim)
                node = claim.get("node", "?")
                who = f"rank {rank} (node {node}, {claim.get('address', '?')})"
                if why is not None:
                    root.set(f"verdict/{rank}", json.dumps({"ok": False, "reason": why}))
                    msg = f"node 0 refused {who}: {why}; the group was not formed"
                    self._abort(msg)
                    raise RendezvousRefused(msg)
                root.set(f"verdict/{rank}", json.dumps(
                    {"ok": True, "mac": _mac(self._secret, "pdit-admit", self.nonce, rank, claim["proof"])}))
                self.admitted[rank] = claim
                pending.discard(rank)
                if local and rank in local and not (local & pending):  # node 0 is in: the others' time starts now
                    deadline = max(deadline, time.monotonic() + wait)
            waiting_on_node0 = bool(local & pending)
            if pending and time.monotonic() > (local_deadline if waiting_on_node0 else deadline):
                missing = sorted(pending)
                nodes = sorted({w.node_of(r) for r in missing})
                msg = (f"rank(s) {missing} (node(s) {nodes}) did not join {self.endpoint} within "
                       f"{max(wait, LOCAL_START_S) if waiting_on_node0 else wait:.0f} s; the group was not formed")
                self._abort(msg)
                raise RendezvousError(msg)
            if pending:
                time.sleep(POLL_S)
        root.set("group", json.dumps({"formed": _mac(self._secret, "pdit-formed", self.nonce)}))
        return dict(self.admitted)

    def _abort(self, reason: str) -> None:
        _root(self.store).set("group", json.dumps({"aborted": reason}))

    def close(self) -> None:
        self.store = None  # the server stops with its last reference


@dataclass
class Membership:
    """What `join_group` leaves a rank with: its store for later checks (a PrefixStore of the group's own), the
    interface gloo / NCCL use, and the session's nonce."""
    store: dist.Store
    interface: str
    address: str
    nonce: str


def _claim(root, secret: bytes, rank: int, node: int, world: World, nonce: str, address: str) -> None:
    proof = _mac(secret, "pdit-join", nonce, rank, node, world.nodes, world.nproc_per_node)
    claim = json.dumps({"node": node, "nodes": world.nodes, "nproc_per_node": world.nproc_per_node,
                        "address": address, "proof": proof, "pid": os.getpid(),
                        "claimant": secrets_mod.token_hex(8)})
    got = root.compare_set(f"join/{rank}", "", claim)
    if (got.decode() if isinstance(got, bytes) else got) != claim:
        raise RendezvousRefused(f"rank {rank} (node {node}): another process already joined as rank {rank} (is a "
                                f"second node running with --node-rank {node}?)")


def _await_admission(root, secret: bytes, rank: int, node: int, nonce: str, endpoint: str, timeout: float) -> None:
    who = f"rank {rank} (node {node})"
    deadline = time.monotonic() + timeout
    verdict = None
    while True:
        group_set = root.check(["group"])  # looked at before the verdict: an abort is written after the verdicts
        if verdict is None and root.check([f"verdict/{rank}"]):
            verdict = json.loads(root.get(f"verdict/{rank}"))
            if not verdict.get("ok"):
                raise RendezvousRefused(f"{who} was refused by node 0 at {endpoint}: {verdict.get('reason')}")
            claim = json.loads(root.get(f"join/{rank}"))
            if not hmac.compare_digest(str(verdict.get("mac", "")),
                                       _mac(secret, "pdit-admit", nonce, rank, claim["proof"])):
                raise RendezvousRefused(f"{who}: the store at {endpoint} admitted it without proof that it holds the "
                                        f"shared secret: not node 0 with this secret")
        if group_set:
            state = json.loads(root.get("group"))
            if "aborted" in state:
                raise RendezvousError(f"{who}: the rendezvous at {endpoint} was aborted: {state['aborted']}")
            if verdict is not None:
                if not hmac.compare_digest(str(state.get("formed", "")), _mac(secret, "pdit-formed", nonce)):
                    raise RendezvousRefused(f"{who}: the group at {endpoint} was marked formed without proof of the "
                                            f"shared secret")
                return
        if time.monotonic() > deadline:
            raise RendezvousError(f"{who}: node 0 at {endpoint} did not admit every rank within {timeout:.0f} s")
        time.sleep(POLL_S)


def request_admission(store: dist.Store, secret: bytes, rank: int, world: World, address: str = "?",
                      endpoint: str = "node 0", timeout: float = 300.0) -> str:
    """Claim `rank` with a proof of the secret and wait until node 0 admitted it and formed the group (every rank
    admitted). Returns the session's nonce; raises RendezvousRefused / RendezvousError naming the reason."""
    root = _root(store)
    nonce = _get(root, "nonce", timeout).decode()
    _claim(root, secret, rank, world.node_of(rank), world, nonce, address)
    _await_admission(root, secret, rank, world.node_of(rank), nonce, endpoint, timeout)
    return nonce


def join_group(store: dist.Store, secret: bytes, rank: int, world: World, device: torch.device,
               rendezvous_host: str, endpoint: str = "node 0", timeout: float = 300.0) -> Membership:
    """Admission, then torch's init_process_group over node 0's store (gloo on CPU, NCCL on CUDA), then a check that
    every member of the formed group holds the secret. Raises RendezvousError / RendezvousRefused naming this rank,
    its node and the reason; nothing is initialised then."""
    node = world.node_of(rank)
    interface, address = use_interface_for(rendezvous_host)
    nonce = request_admission(store, secret, rank, world, address, endpoint, timeout)
    # the process group's keys, under this session's nonce
    group_store = dist.PrefixStore(f"{_ROOT}group/{nonce}", store)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=group_store, rank=rank, world_size=world.world_size,
                            timeout=datetime.timedelta(seconds=timeout), **kwargs)
    try:
        if backend == "gloo":  # names the ranks that did not arrive
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
        tags = [None] * world.world_size
        dist.all_gather_object(tags, _mac(secret, "pdit-member", nonce, rank))
        bad = [r for r, t in enumerate(tags) if not hmac.compare_digest(str(t), _mac(secret, "pdit-member", nonce, r))]
        if bad:
            raise RendezvousRefused(f"rank {rank} (node {node}): group member(s) {bad} (node(s) "
                                    f"{sorted({world.node_of(r) for r in bad})}) do not hold the shared secret")
    except BaseException:
        dist.destroy_process_group()
        raise
    return Membership(session_store(store, nonce), interface, address, nonce)


def session_store(store, nonce: str) -> dist.PrefixStore:
    """The keys of one formed group (its checks, its control messages, its nodes' heartbeats), under its nonce."""
    return dist.PrefixStore(f"{_ROOT}checks/{nonce}", store)


# ---- the model file on every node --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fingerprint:
    """A model file's size and the sha256 of its header bytes (safetensors: length + JSON; GGUF: up to the data)."""
    size: int
    header_sha256: str

    def differences(self, other: "Fingerprint") -> list[str]:
        out = []
        if self.size != other.size:
            out.append(f"size {self.size} bytes vs {other.size}")
        if self.header_sha256 != other.header_sha256:
            out.append(f"header sha256 {self.header_sha256[:16]}... vs {other.header_sha256[:16]}...")
        return out


def _header_length(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        from ..weights.gguf import open_reader
        return int(open_reader(path).data_offset)
    if path.endswith((".safetensors", ".sft")) and len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if 0 < n and 8 + n <= os.path.getsize(path):
            return 8 + n
        raise ModelFileMismatch(f"{path}: not a safetensors file (bad header length {n})")
    raise ModelFileMismatch(f"{path}: neither a safetensors nor a GGUF file")


def file_fingerprint(path: str) -> Fingerprint:
    """(size, sha256 of the header bytes) of a safetensors / GGUF file: cheap (the header only), and any change in
    the tensors' names, shapes, dtypes or offsets changes it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    n = _header_length(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return Fingerprint(os.path.getsize(path), h.hexdigest())


def resolve_model(model_dir: str, name: str) -> str:
    """`name` (a path relative to the model folder, as node 0 names it) under this node's `model_dir`."""
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ModelFileMismatch(f"model name {name!r} must be relative to the model folder")
    return os.path.join(model_dir, name)


def check_model_file(store: dist.Store, rank: int, world: World, path: str | None, tag: str = "model",
                     timeout: float = 300.0, error: str | None = None) -> Fingerprint:
    """Every rank fingerprints its node's copy of the model file and publishes it; every rank compares all of them
    with node 0's (rank 0's) and raises the same ModelFileMismatch naming each node that differs and how. Call it on
    every rank with the same `tag` (a fresh one per check) before loading. `error`: this rank could not even name its
    copy (why); it is published like a missing file, so no rank waits for it."""
    node = world.node_of(rank)
    try:
        if error is not None:
            raise ModelFileMismatch(error)
        fp = file_fingerprint(path)
        mine = {"node": node, "path": path, "size": fp.size, "sha": fp.header_sha256}
    except (OSError, ModelFileMismatch) as e:
        fp, mine = None, {"node": node, "path": path, "error": str(e)}
    checks = dist.PrefixStore(f"fingerprint/{tag}", store)
    checks.set(str(rank), json.dumps(mine))
    keys = [str(r) for r in range(world.world_size)]
    checks.wait(keys, datetime.timedelta(seconds=timeout))
    entries = [json.loads(checks.get(k)) for k in keys]
    ref = entries[0]
    problems = {}
    for r, e in enumerate(entries):
        n = e["node"]
        if "error" in e:
            problems.setdefault(n, f"{e['error']}")
        elif r > 0 and "error" not in ref:
            diffs = Fingerprint(e["size"], e["sha"]).differences(Fingerprint(ref["size"], ref["sha"]))
            if diffs:
                problems.setdefault(n, f"{e['path']} differs from node 0's {ref['path']}: " + ", ".join(diffs))
    if problems:
        lines = "; ".join(f"node {n}: {why}" for n, why in sorted(problems.items()))
        raise ModelFileMismatch(f"model file check ({tag}) failed on rank {rank} (node {node}): {lines}; copy node "
                                f"0's file to every node under the same name before loading")
    return fp
