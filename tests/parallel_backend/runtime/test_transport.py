"""Shared-memory transport: ShmTensorSlot (owner) and ShmReader (worker side).

Round trips of every dtype the pipe carries, growth to a new segment that the reader follows,
cleanup of /dev/shm, and a real spawned process that reads by descriptor only.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle

import pytest
import torch

from parallel_backend.runtime import transport
from parallel_backend.runtime.transport import ShmReader, ShmTensorSlot, TensorRef

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 16, 3, 6, 10), (5, 33)]


def _sample(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-(2 ** 40), 2 ** 40, shape, generator=g, dtype=dtype)


def _mine() -> list[str]:
    return transport.leftover_segments(os.getpid())


@pytest.fixture
def slot():
    s = ShmTensorSlot("t", capacity=1024)
    yield s
    s.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_dtypes_and_shapes(slot, dtype):
    tensors = {f"a{i}": _sample(shape, dtype, i) for i, shape in enumerate(SHAPES)}
    refs = slot.write(tensors)
    reader = ShmReader()
    try:
        for k, t in tensors.items():
            ref = refs[k]
            assert ref.dtype == str(dtype) and ref.shape == tuple(t.shape)
            assert ref.offset % 64 == 0
            got = slot.read(ref)
            assert got.dtype == dtype and got.shape == t.shape and torch.equal(got, t)
            view = reader.view(ref)  # the worker's path: map by name, read in place
            assert view.dtype == dtype and view.shape == t.shape and torch.equal(view, t)
            del view
        # tensors do not overlap: offsets + sizes are increasing
        spans = sorted((r.offset, r.offset + r.nbytes) for r in refs.values())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    finally:
        reader.close()


def test_mixed_dtypes_in_one_write_and_reuse(slot):
    first = {"x": _sample((2, 16, 2, 8, 8), torch.bfloat16, 0), "t": torch.tensor([500.0, 250.0]),
             "ids": _sample((3,), torch.int64, 1), "h": _sample((4, 4), torch.float16, 2)}
    slot_name = None
    reader = ShmReader()
    try:
        for step in range(3):  # step after step in the same segment: same name, fresh values
            tensors = {k: (v + step if v.is_floating_point() else v * (step + 1)) for k, v in first.items()}
            refs = slot.write(tensors)
            slot_name = slot_name or slot.name
            assert slot.name == slot_name and all(r.segment == slot_name for r in refs.values())
            for k, t in tensors.items():
                assert torch.equal(reader.view(refs[k]).clone(), t)
    finally:
        reader.close()


def test_growth_moves_to_a_new_segment_and_reader_remaps(slot):
    reader = ShmReader()
    try:
        small = {"x": torch.arange(16, dtype=torch.float32)}
        refs = slot.write(small)
        old = slot.name
        assert torch.equal(reader.view(refs["x"]).clone(), small["x"])
        assert list(reader._maps) == [old]

        big = {"x": torch.randn(64, 1024), "y": torch.arange(10, dtype=torch.int64)}  # 256 KB > 1 KB
        refs = slot.write(big)
        assert slot.name != old and slot.capacity >= sum(r.nbytes for r in refs.values())
        assert all(r.segment == slot.name for r in refs.values())
        assert old not in _mine() and slot.name in _mine()  # the old segment is unlinked at once
        for k, t in big.items():
            assert torch.equal(reader.view(refs[k]).clone(), t)
        assert list(reader._maps) == [slot.name]  # the old mapping of this role was dropped

        # the owner's stale descriptors are refused, not misread
        with pytest.raises(AssertionError):
            slot.read(TensorRef(old, 0, (16,), "torch.float32"))
        # a slightly bigger write fits the headroom: no new segment
        name = slot.name
        slot.write({"x": torch.randn(65, 1024)})
        assert slot.name == name
    finally:
        reader.close()


def test_reader_keeps_other_roles_mapped():
    a, b = ShmTensorSlot("in", 256), ShmTensorSlot("out", 256)
    reader = ShmReader()
    try:
        ra = a.write({"x": torch.ones(4)})["x"]
        rb = b.layout({"out": ((4,), torch.float32)})["out"]
        reader.view(ra)
        reader.view(rb).copy_(torch.full((4,), 7.0))  # the worker writes the output in place
        assert torch.equal(b.read(rb), torch.full((4,), 7.0))
        assert sorted(reader._maps) == sorted([a.name, b.name])
        ra = a.write({"x": torch.ones(1000)})["x"]  # grows "in" only
        reader.view(ra)
        assert sorted(reader._maps) == sorted([a.name, b.name])
    finally:
        reader.close()
        a.close()
        b.close()


def test_close_removes_dev_shm_entries():
    before = set(_mine())
    slots = [ShmTensorSlot(role, 4096) for role in ("in", "out")]
    names = [s.name for s in slots]
    assert set(names) <= set(_mine())
    assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    reader = ShmReader()
    refs = slots[0].write({"x": torch.randn(100)})
    view = reader.view(refs["x"])  # a live mapping in a reader must not keep the entry
    grown = slots[1].write({"y": torch.randn(10_000)})  # growth unlinks the first "out" segment
    names.append(slots[1].name)
    assert names[1] not in _mine()
    for s in slots:
        s.close()
        s.close()  # idempotent
    assert not (set(_mine()) - before), _mine()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    del view, grown
    reader.close()


def test_slot_collected_without_close_unlinks():
    s = ShmTensorSlot("gc", 128)
    name = s.name
    assert name in _mine()
    del s
    gc.collect()
    assert name not in _mine()


# ---------------------------------------------------------------- a real second process


def _child(in_refs, out_ref, conn):
    """A spawned process: reads by descriptor, computes, writes the owner's output slot in place."""

    from parallel_backend.runtime.transport import ShmReader as Reader

    reader = Reader()
    try:
        x = reader.view(in_refs["x"])
        ids = reader.view(in_refs["ids"])
        out = reader.view(out_ref)
        out.copy_(x.float() * 2 + ids.sum().float())
        conn.send(("ok", tuple(x.shape), str(x.dtype), os.getpid()))
        del x, ids, out
    except BaseException as e:  # pragma: no cover - reported to the test
        conn.send(("error", repr(e)))
    finally:
        reader.close()


@pytest.mark.multirank
def test_spawned_child_reads_by_descriptor_and_writes_output():
    x = torch.randn(1024, 1024)  # 4 MB
    ids = torch.arange(5, dtype=torch.int64)
    slot_in, slot_out = ShmTensorSlot("in", 1024), ShmTensorSlot("out", 1024)
    names = []
    try:
        in_refs = slot_in.write({"x": x, "ids": ids})
        out_ref = slot_out.layout({"out": (tuple(x.shape), torch.float32)})["out"]
        payload = (in_refs, out_ref)
        size = len(pickle.dumps(payload))
        assert size < 1024, f"descriptors pickle to {size} bytes: the payload is travelling through the pipe"
        assert in_refs["x"].nbytes == 4 * 1024 * 1024
        names = [slot_in.name, slot_out.name]

        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        p = ctx.Process(target=_child, args=(in_refs, out_ref, child_conn), daemon=True)
        p.start()
        try:
            assert parent_conn.poll(120), "child did not answer"
            msg = parent_conn.recv()
        finally:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        assert msg[0] == "ok", msg
        assert msg[1] == (1024, 1024) and msg[2] == "torch.float32" and msg[3] != os.getpid()
        assert p.exitcode == 0
        got = slot_out.read(out_ref)
        assert torch.equal(got, x * 2 + 10.0)
    finally:
        slot_in.close()
        slot_out.close()
    assert names and not set(names) & set(_mine())
