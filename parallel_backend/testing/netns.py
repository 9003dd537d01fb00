"""Two "machines" on one: two Linux network namespaces joined by a veth pair, each with its own address, for the
multi-node tests (node 0 in one, node 1 in the other).

    with two_node_netns() as net:
        p0 = net.popen(0, [sys.executable, "-m", ...])   # runs inside namespace 0 (`ip netns exec`)
        net.addresses                                     # ("10.213.X.1", "10.213.X.2")

Each namespace has only its loopback and its end of the veth: nothing started in it can reach an address outside
this machine. Everything is removed on exit, also when the body raises: processes still inside the namespaces
(started by the body) are killed, then the namespaces go (and the veth with them). Needs root and iproute2's `ip`;
without them `two_node_netns` raises NetnsError saying which is missing (tests fail loudly, they do not skip).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass


class NetnsError(RuntimeError):
    """Network namespaces cannot be set up here; the message says why."""


def _ip(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def preflight() -> None:
    """Raise NetnsError unless this process can create network namespaces (Linux, root, `ip` present)."""
    if not sys.platform.startswith("linux"):
        raise NetnsError(f"network namespaces need Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        raise NetnsError(f"creating network namespaces needs root (running as uid {os.geteuid()}); run the "
                         f"multi-node tests as root, e.g. in a container with CAP_SYS_ADMIN and CAP_NET_ADMIN")
    if shutil.which("ip") is None:
        raise NetnsError("iproute2's `ip` is not on PATH (apt-get install iproute2)")


@dataclass
class TwoNodes:
    names: tuple[str, str]        # the namespaces
    interfaces: tuple[str, str]   # each namespace's veth end
    addresses: tuple[str, str]    # each veth end's address (one /24)
    prefix_len: int = 24

    def command(self, node: int, argv: list) -> list:
        return ["ip", "netns", "exec", self.names[node], *map(str, argv)]

    def popen(self, node: int, argv: list, **kwargs) -> subprocess.Popen:
        """Start `argv` inside namespace `node` (the environment passes through `ip netns exec`)."""
        return subprocess.Popen(self.command(node, argv), **kwargs)

    def run(self, node: int, argv: list, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(node, argv), **kwargs)

    def pids(self, node: int) -> list[int]:
        r = _ip("netns", "pids", self.names[node], check=False)
        return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def _teardown(names, errors: list) -> None:
    existing = set(_ip("netns", "list", check=False).stdout.split())
    for name in names:
        if name not in existing:
            continue
        # processes the body started in the namespace (and their children): ours, by their pid - asked to end
        # first (a resource tracker unlinks what its process left), killed after a grace period
        pids = [int(x) for x in _ip("netns", "pids", name, check=False).stdout.split()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 3.0
            while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.05)
        r = _ip("netns", "del", name, check=False)
        if r.returncode != 0:
            errors.append(f"`ip netns del {name}`: {r.stderr.strip()}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def remove_stale() -> list[str]:
    """Remove namespaces an earlier run of this helper left behind when it was killed (named `pdit<pid>...` with
    that pid gone). Returns their names."""
    gone = []
    for name in _ip("netns", "list", check=False).stdout.split():
        m = re.match(r"^pdit(\d+)(-\w+)?n[01]$", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _teardown([name], [])
            gone.append(name)
    return gone


@contextmanager
def two_node_netns(tag: str | None = None):
    """Create two namespaces joined by a veth pair (10.213.X.1/24 and .2/24, X from the pid), yield a TwoNodes,
    remove everything afterwards. Names are unique per process (`pdit<pid>[-tag]n0/n1`)."""
    preflight()
    remove_stale()
    pid = os.getpid()
    base = f"pdit{pid}" + (f"-{tag}" if tag else "")
    names = (f"{base}n0", f"{base}n1")
    ifs = (f"pd{pid % 10**9}a", f"pd{pid % 10**9}b")  # interface names: at most 15 characters
    x = pid % 250 + 1
    net = TwoNodes(names, ifs, (f"10.213.{x}.1", f"10.213.{x}.2"))
    errors: list = []
    try:
        for name in names:
            _ip("netns", "add", name)
        _ip("link", "add", ifs[0], "netns", names[0], "type", "veth", "peer", "name", ifs[1], "netns", names[1])
        for i in (0, 1):
            ns = ("-n", names[i])
            _ip(*ns, "addr", "add", f"{net.addresses[i]}/{net.prefix_len}", "dev", ifs[i])
            _ip(*ns, "link", "set", ifs[i], "up")
            _ip(*ns, "link", "set", "lo", "up")
        yield net
    finally:
        _teardown(names, errors)
        if errors:  # loud, but never hides the body's own exception
            print("netns teardown: " + "; ".join(errors), file=sys.stderr)
            if sys.exc_info()[0] is None:
                raise NetnsError("could not remove the test's namespaces: " + "; ".join(errors))


def shape_link(net: TwoNodes, rate_mbit: int, delay_ms: float) -> str:
    """Slow the veth between the namespaces on purpose, on both ends (each direction): tc netem's rate and delay, or
    where this kernel has no netem qdisc, tc tbf's rate alone. Returns which ("netem" / "tbf"). Needs iproute2's
    `tc`; raises NetnsError when it is missing or both fail."""
    if shutil.which("tc") is None:
        raise NetnsError("iproute2's `tc` is not on PATH (apt-get install iproute2)")
    burst = max(16 << 10, rate_mbit * 125_000 // 500)  # bytes: 2 ms at the rate (a larger burst hides the rate)
    for kind, args in (("netem", ["netem", "rate", f"{rate_mbit}mbit", "delay", f"{delay_ms}ms"]),
                       ("tbf", ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"])):
        errors = []
        for i in (0, 1):
            r = subprocess.run(["ip", "netns", "exec", net.names[i], "tc", "qdisc", "replace", "dev",
                                net.interfaces[i], "root", *args], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(r.stderr.strip() or r.stdout.strip())
        if not errors:
            return kind
    raise NetnsError(f"tc could not shape {net.interfaces}: {'; '.join(errors)}")
