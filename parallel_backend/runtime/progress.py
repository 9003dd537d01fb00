"""Progress and cancel of one model call, through a small shared-memory block the owner and its local ranks share.

Layout (int64 words): [0] the number of the call to cancel (0: none), [1] 1 when the ranks may stop a call
between blocks (the mesh allows it, below); then per local rank r: [2 + 2r] `started`, the call number and the
block the rank last started (call << CALL_SHIFT | block, block 1 = the first), and [3 + 2r] `checked`, the same
value shifted once more with the cancel flag the rank read at that block start in the lowest bit.

Each rank bumps `started` in a forward pre-hook of every transformer block: the owner sees a rank's progress per
block (a hung rank is one whose counter stops while it is not computing), and a cancel ends a call between blocks
without stopping the warm group. Ranks run collectives inside every block (Ulysses / Ring all-to-all, TP
all-reduces), so they must all stop at the same block or the ones that go on wait forever. The rule: a rank that
reads the flag at the start of block b stops there only when no rank has started a later block and every rank that
started b read the flag there too; otherwise it runs on and asks again at the next block. Every rank then stops at
the same block, because the flag, once set, stays set for the call. Only on a mesh whose ranks all run the same
blocks in the same order, on one machine (no pipeline stages, no sharded weights' prefetched gathers, no remote
ranks): elsewhere a cancel stops the group.
"""
from __future__ import annotations

import time

import torch

CALL_SHIFT = 20  # blocks per call < 2**20
_CANCEL, _COOPERATIVE, _HEAD = 0, 1, 2


class CallCancelled(Exception):
    """Raised in a rank at the block where every rank agreed to stop the call."""


def words(local_ranks: int) -> int:
    return _HEAD + 2 * local_ranks


def cooperative(config) -> bool:
    """Whether the ranks of `config` can stop a call between blocks (see the module's docstring)."""
    return config.nodes == 1 and config.pp == 1 and not config.shard_weights


class RankProgress:
    """A rank's side: bumps its counter at every block start and stops the call where every rank agrees."""

    def __init__(self, words_view, rank: int, local_ranks: int):
        self.w, self.rank, self.n = words_view, rank, local_ranks
        self.call = self.block = 0

    def begin_call(self, call: int) -> None:
        self.call, self.block = call, 0
        self.w[_HEAD + 2 * self.rank] = call << CALL_SHIFT

    def end_call(self) -> None:
        self.call = 0  # (the counters keep the last block: the owner reads where a call ended)

    def block_started(self) -> None:
        if not self.call:  # a block run outside a call (none today): nothing to report
            return
        self.block += 1
        mine = self.call << CALL_SHIFT | self.block
        self.w[_HEAD + 2 * self.rank] = mine
        flag = int(self.w[_CANCEL] == self.call and self.w[_COOPERATIVE] == 1)
        self.w[_HEAD + 2 * self.rank + 1] = mine << 1 | flag  # one word: the block and what was read there
        if flag and self._all_stop_at(mine):
            raise CallCancelled(f"call {self.call} cancelled at block {self.block}")

    def _all_stop_at(self, mine: int, patience: float = 5.0) -> bool:
        """True when no rank started a later block and every rank at this block read the flag."""
        for r in range(self.n):
            if self.w[_HEAD + 2 * r] > mine:
                return False
            if self.w[_HEAD + 2 * r] < mine:
                continue  # behind: it reaches this block, reads the flag and stops here too
            deadline = time.monotonic() + patience
            while self.w[_HEAD + 2 * r + 1] >> 1 < mine:  # it wrote `started`, not yet `checked` (no wait between)
                if time.monotonic() > deadline:
                    return False
                time.sleep(0)
            checked = int(self.w[_HEAD + 2 * r + 1])
            if checked >> 1 > mine or not checked & 1:
                return False
        return True

    def watch(self, blocks) -> list:
        """Pre-hooks on each transformer block (a ModuleList or ModuleDict); returns their handles."""
        hook = torch.compiler.disable(lambda module, args: self.block_started())  # outside a compiled block's graph
        modules = blocks.values() if isinstance(blocks, torch.nn.ModuleDict) else blocks
        return [m.register_forward_pre_hook(hook, prepend=True) for m in modules]


class OwnerProgress:
    """The owner's side: the block itself (in a ShmTensorSlot the caller owns), read and the cancel written."""

    def __init__(self, slot, local_ranks: int, cooperative_mesh: bool):
        self.slot, self.n = slot, local_ranks
        self.ref = slot.write({"words": torch.zeros(words(local_ranks), dtype=torch.int64)})["words"]
        self.w = slot.read(self.ref, copy=False).numpy()
        self.w[_COOPERATIVE] = int(cooperative_mesh)

    @property
    def cooperative(self) -> bool:
        return bool(self.w[_COOPERATIVE])

    def request_cancel(self, call: int) -> None:
        self.w[_CANCEL] = call

    def clear_cancel(self) -> None:
        self.w[_CANCEL] = 0

    def started(self) -> list:
        """Per local rank: (call, block) it last started."""
        return [(int(v) >> CALL_SHIFT, int(v) & ((1 << CALL_SHIFT) - 1))
                for v in (self.w[_HEAD + 2 * r] for r in range(self.n))]

    def close(self) -> None:
        self.w = None
        self.slot.close()


# ---- the owner watching one call -----------------------------------------------------------------------------------

def _env_seconds(name: str, default: float) -> float:
    import os
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


STALL_FACTOR = 10   # a rank is hung after this many times the longest block seen (times the call's tokens over
#                     that call's: attention grows faster, but a computing rank is never called hung: below) ...
STALL_FLOOR_S = 30  # ... and never before this (PDIT_STALL_FLOOR_S overrides it)
CANCEL_FLOOR_S = 5  # Cancel waits this long (or two blocks, up to CANCEL_MAX_S) for the ranks to stop the call
CANCEL_MAX_S = 10   # (PDIT_CANCEL_GRACE_S / PDIT_CANCEL_MAX_S override them); then the group is stopped
BUSY_SHARE = 0.2    # a rank using more than this share of a core is computing, not waiting


def proc_state(pid: int) -> tuple:
    """(state letter, CPU seconds) of a local process from /proc; ("?", 0.0) when it cannot be read."""
    import os
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return "?", 0.0


_STATES = {"T": "stopped (SIGSTOP, or a debugger holds it)", "t": "stopped by a debugger", "D": "in uninterruptible "
           "I/O (swapping?)", "Z": "exited", "S": "waiting", "R": "running"}


class CallWatch:
    """The owner's view of one forward: polls the caller's interrupt (ComfyUI's Cancel) and the ranks' progress.
    `tick` returns None, or ("stall" | "give_up", message) for the group to act on (stop itself, raise)."""

    def __init__(self, progress: OwnerProgress, call: int, pids: list, tokens: int, interrupt=None, timing=None,
                 remote: bool = False):
        self.progress, self.call, self.pids, self.interrupt = progress, call, pids, interrupt
        self.remote = remote  # other nodes' ranks take part: local ranks may wait for them while they compute
        now = time.monotonic()
        self.t0, self.last = now, [now] * len(pids)
        self.seen = [(call, 0)] * len(pids)
        self.longest = 0.0  # the longest time between two block starts of one rank in this call
        seconds, measured_tokens = timing or (0.0, 0)
        expected = seconds * max(1.0, tokens / measured_tokens) if measured_tokens else 0.0  # (the longest block)
        self.stall_limit = max(_env_seconds("PDIT_STALL_FLOOR_S", STALL_FLOOR_S), STALL_FACTOR * expected)
        floor = _env_seconds("PDIT_CANCEL_GRACE_S", CANCEL_FLOOR_S)
        self.grace = min(max(floor, 2 * expected), max(floor, _env_seconds("PDIT_CANCEL_MAX_S", CANCEL_MAX_S)))
        self.cancelled_at = None
        self.exc = None       # what the interrupt raised: re-raised when the call ends (stopped or not)
        self.cpu = [proc_state(p)[1] for p in pids]
        self.cpu_at = now

    def tick(self, pending: set):
        now = time.monotonic()
        if self.exc is None and self.interrupt is not None:
            try:
                self.interrupt()
            except BaseException as e:  # noqa: BLE001  (ComfyUI's interrupt; re-raised by the group)
                self.exc, self.cancelled_at = e, now
                if not self.progress.cooperative:
                    return "give_up", "this mesh cannot stop a call between blocks"
                self.progress.request_cancel(self.call)
        for r, seen in enumerate(self.progress.started()):
            if seen != self.seen[r] and seen[0] == self.call:
                self.longest = max(self.longest, now - self.last[r])
                self.seen[r], self.last[r] = seen, now
        if self.cancelled_at is not None and now - self.cancelled_at > self.grace:
            return "give_up", f"the ranks did not stop the call within {self.grace:.0f} s ({self.where(pending)})"
        if now - self.cpu_at >= 1.0:
            return self._stalled(now, pending)
        return None

    def _stalled(self, now: float, pending: set):
        """("stall", message) when every pending local rank made no progress for stall_limit s and none computes."""
        states = [proc_state(p) for p in self.pids]
        busy = [(c - c0) / (now - self.cpu_at) > BUSY_SHARE for (_, c), c0 in zip(states, self.cpu)]
        self.cpu, self.cpu_at = [c for _, c in states], now
        local = [r for r in pending if r < len(self.pids)]
        if not local or any(now - self.last[r] < self.stall_limit for r in local):
            return None
        stopped = [r for r in local if states[r][0] in "Tt"]
        if not stopped and (any(busy[r] for r in local) or self.remote):
            return None  # computing (a long kernel), or waiting for another node's ranks: their heartbeats tell
        lowest = min(self.seen[r][1] for r in local)
        hung = stopped or [r for r in local if self.seen[r][1] == lowest]
        idle = now - max(self.last[r] for r in hung)
        return "stall", f"{self.describe(hung, states)} made no progress for {idle:.0f} s ({self.where(pending)})"

    def describe(self, ranks, states=None) -> str:
        states = states or [proc_state(p) for p in self.pids]
        return ", ".join(f"rank {r} (pid {self.pids[r]}, {_STATES.get(states[r][0], states[r][0])})" for r in ranks)

    def where(self, pending: set) -> str:
        """Which call, and where each local rank still in it is."""
        states = [proc_state(p) for p in self.pids]
        at = [f"{self.describe([r], states)} {_block(self.seen[r][1])}" for r in sorted(pending) if r < len(self.pids)]
        return f"model call {self.call} of this group; {'; '.join(at) or 'no local rank pending'}"


def _block(b: int) -> str:
    return f"in block {b}" if b else "before its first block"
