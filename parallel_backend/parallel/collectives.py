"""Thin wrappers over torch.distributed collectives, with an optional byte counter.

The counter lets tests and bench/ measure the payload each axis moves per forward (the
communication table in the README is checked against it).
"""
from __future__ import annotations

import functools
import os
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

_counting: dict | None = None


@contextmanager
def count_bytes():
    """Count the bytes this rank sends per collective kind while the block runs."""
    global _counting
    prev, _counting = _counting, defaultdict(int)
    try:
        yield _counting
    finally:
        _counting = prev


def _count(kind: str, nbytes: int) -> None:
    if _counting is not None:
        _counting[kind] += int(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# A testing knob: "gbit=<rate>,delay_ms=<latency>" makes every collective below wait as a link of that rate and
# latency would for the bytes this rank sends, so tests and bench/placement.py can slow a single-node link on purpose
# (runtime/link_probe.py measures through the same wrappers). Unset in normal use.
EMULATE_LINK_ENV = "PDIT_EMULATE_LINK"


@functools.lru_cache(maxsize=4)
def parse_emulated_link(text: str) -> tuple:
    """(bytes per second, seconds per message) from the knob's text; (0, 0) for an empty one."""
    fields = dict(p.split("=", 1) for p in text.replace(" ", "").split(",") if p)
    unknown = set(fields) - {"gbit", "delay_ms"}
    if unknown:
        raise ValueError(f"{EMULATE_LINK_ENV}={text!r}: unknown fields {sorted(unknown)} (use gbit=, delay_ms=)")
    rate = float(fields.get("gbit", 0)) * 1e9 / 8
    return rate, float(fields.get("delay_ms", 0)) / 1e3


def emulate_link(nbytes: int) -> None:
    """Wait as the emulated link would for one message of `nbytes` (nothing when the knob is unset)."""
    text = os.environ.get(EMULATE_LINK_ENV)
    if not text:
        return
    rate, delay = parse_emulated_link(text)
    time.sleep(delay + (nbytes / rate if rate else 0.0))


def all_to_all_single(x: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 (which must equal the group size)."""
    size = dist.get_world_size(group)
    _count("all_to_all", _nbytes(x) * (size - 1) // size)
    out = funcol.wait_tensor(funcol.all_to_all_single(x, None, None, group))
    emulate_link(_nbytes(x) * (size - 1) // size)
    return out


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    # ring all-reduce sends 2 (n-1)/n of the buffer
    _count("all_reduce", 2 * _nbytes(x) * (size - 1) // size)
    out = funcol.wait_tensor(funcol.all_reduce(x, "sum", group))
    emulate_link(2 * _nbytes(x) * (size - 1) // size)
    return out


def all_gather(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    size = dist.get_world_size(group)
    _count("all_gather", _nbytes(x) * (size - 1))
    out = funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), 0, group))
    emulate_link(_nbytes(x) * (size - 1))
    if dim != 0:
        out = torch.cat(out.chunk(size, dim=0), dim=dim)
    return out


class _PendingExchange:
    def __init__(self, reqs, buf):
        self._reqs, self._buf = reqs, buf
        self._sent = time.perf_counter()

    def wait(self) -> torch.Tensor:
        for r in self._reqs:
            r.wait()
        if os.environ.get(EMULATE_LINK_ENV):  # the emulated transfer overlaps what ran since it was sent
            left = self._sent - time.perf_counter()
            rate, delay = parse_emulated_link(os.environ[EMULATE_LINK_ENV])
            time.sleep(max(0.0, left + delay + (_nbytes(self._buf) / rate if rate else 0.0)))
        return self._buf


def ring_exchange(x: torch.Tensor, group) -> _PendingExchange:
    """Send `x` to the next rank of the ring and receive the previous rank's; returns a handle."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    buf = torch.empty_like(x)
    _count("ring_p2p", _nbytes(x))
    ops = [dist.P2POp(dist.isend, x, nxt, group), dist.P2POp(dist.irecv, buf, prv, group)]
    return _PendingExchange(dist.batch_isend_irecv(ops), buf)
