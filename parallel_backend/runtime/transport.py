"""The shared-memory hop between the ComfyUI process and the worker ranks.

Big tensors never travel through a pipe: the owner (ComfyUI process) writes them into a named
POSIX shared-memory segment, and only a small descriptor (segment name, offset, shape, dtype)
is pickled over the control pipe. Workers map the segment once and read their part in place.

Segments are named `pdit_<owner pid>_<n>` so a test (or an operator) can see what is left in
/dev/shm. The owner unlinks them on close; Python's resource tracker unlinks them if the owner
is killed, since the owner registered them when it created them.
"""
from __future__ import annotations

import gc
import itertools
import os
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

SHM_PREFIX = "pdit_"
_ALIGN = 64
_counter = itertools.count()

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies in a segment. Small and picklable."""
    segment: str
    offset: int
    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _view(buf, ref: TensorRef) -> torch.Tensor:
    dtype = _DTYPES[ref.dtype]
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
    return raw.view(dtype).view(ref.shape)


class ShmTensorSlot:
    """One owned shared-memory segment holding several tensors, reused step after step.

    `write` packs tensors at aligned offsets and grows the segment (a new name) when they do not
    fit; readers notice the new name in the descriptors and remap.
    """

    def __init__(self, role: str, capacity: int = 1 << 20):
        self.role = role
        self._shm: shared_memory.SharedMemory | None = None
        self._capacity = 0
        self._grow(capacity)

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def capacity(self) -> int:
        return self._capacity

    def _grow(self, capacity: int) -> None:
        self._release()
        capacity = max(_aligned(capacity), _ALIGN)
        name = f"{SHM_PREFIX}{os.getpid()}_{next(_counter)}_{self.role}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=capacity)
        self._capacity = capacity

    def layout(self, specs: dict) -> dict:
        """Place tensors given as name -> (shape, dtype); grow if needed. Returns name -> TensorRef."""
        offsets, total = {}, 0
        for key, (shape, dtype) in specs.items():
            offsets[key] = total
            n = torch.Size(shape).numel() * dtype.itemsize
            total += _aligned(n)
        if total > self._capacity:
            self._grow(int(total * 1.25))  # headroom so a slightly larger step does not remap
        return {k: TensorRef(self.name, offsets[k], tuple(specs[k][0]), str(specs[k][1])) for k in specs}

    def write(self, tensors: dict) -> dict:
        refs = self.layout({k: (t.shape, t.dtype) for k, t in tensors.items()})
        for k, t in tensors.items():
            if t.numel():
                _view(self._shm.buf, refs[k]).copy_(t.detach().to("cpu"))
        return refs

    def read(self, ref: TensorRef, copy: bool = True) -> torch.Tensor:
        assert ref.segment == self.name, "descriptor from another segment"
        t = _view(self._shm.buf, ref)
        return t.clone() if copy else t

    def _release(self) -> None:
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere: collect and retry once
            gc.collect()
            try:
                shm.close()
            except BufferError:
                pass
        try:
            shm.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._release()

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass


class ShmReader:
    """Worker side: maps segments by name on first use and drops mappings of a role once the
    owner has moved that role to a new (larger) segment."""

    def __init__(self):
        self._maps: dict[str, shared_memory.SharedMemory] = {}

    def view(self, ref: TensorRef) -> torch.Tensor:
        shm = self._maps.get(ref.segment)
        if shm is None:
            self._forget_role(ref.segment)
            shm = shared_memory.SharedMemory(name=ref.segment, create=False)
            self._maps[ref.segment] = shm
        return _view(shm.buf, ref)

    def _forget_role(self, new_name: str) -> None:
        role = new_name.rsplit("_", 1)[-1]
        for name in [n for n in self._maps if n.rsplit("_", 1)[-1] == role]:
            self._close(name)

    def _close(self, name: str) -> None:
        shm = self._maps.pop(name)
        try:
            shm.close()
        except BufferError:
            gc.collect()
            try:
                shm.close()
            except BufferError:
                pass

    def close(self) -> None:
        for name in list(self._maps):
            self._close(name)


def leftover_segments(pid: int | None = None) -> list[str]:
    """Segments of this pack still in /dev/shm (optionally only those owned by `pid`)."""
    prefix = SHM_PREFIX if pid is None else f"{SHM_PREFIX}{pid}_"
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    except FileNotFoundError:
        return []
