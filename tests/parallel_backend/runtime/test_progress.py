"""The ranks' progress counters and the block at which they agree to stop a cancelled call
(parallel_backend/runtime/progress.py), in exact interleavings, without processes: each rank is a RankProgress over
one shared array, driven step by step. The end-to-end cases (real ranks, SIGSTOP, Cancel through ComfyUI) are in
test_group.py and tests/e2e/test_cancel.py."""
import numpy as np
import pytest

from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.progress import CallCancelled, CallWatch, RankProgress, cooperative, words

pytestmark = pytest.mark.engine


class _Owner:
    """OwnerProgress's reading side over a plain array (no shared memory needed for the logic)."""

    def __init__(self, w, n):
        from parallel_backend.runtime.progress import OwnerProgress
        self.w, self.n = w, n
        self.started = lambda: OwnerProgress.started(self)
        self.cooperative = bool(w[1])

    def request_cancel(self, call):
        self.w[0] = call


def _ranks(n=2, call=7):
    w = np.zeros(words(n), dtype=np.int64)
    w[1] = 1  # a cooperative mesh
    ranks = [RankProgress(w, r, n) for r in range(n)]
    for r in ranks:
        r.begin_call(call)
    return w, ranks


def _step(rank) -> bool:
    """One block start; True when the rank stopped the call there."""
    try:
        rank.block_started()
        return False
    except CallCancelled:
        return True


def test_ranks_that_read_the_cancel_at_the_same_block_stop_there():
    w, (a, b) = _ranks()
    assert not _step(a) and not _step(b)  # block 1, no cancel
    w[0] = 7
    assert _step(a) and _step(b)  # block 2: both read it, none ahead
    assert a.block == b.block == 2


def test_a_rank_that_passed_the_block_unaware_makes_the_others_run_on_to_the_next():
    """Rank 0 started block 2 before the cancel was written; rank 1 reads it at block 2. Stopping there would leave
    rank 0 alone in block 2's all-to-all: rank 1 must run on, and both stop at block 3."""
    w, (a, b) = _ranks()
    _step(a), _step(b)
    assert not _step(a)  # block 2 read without the flag
    w[0] = 7
    assert not _step(b)  # block 2 with the flag: rank 0 went on unaware, so rank 1 does too
    assert _step(a) and _step(b) and a.block == b.block == 3


def test_a_rank_ahead_keeps_the_ones_behind_going_until_its_block():
    """cfg replicas share no collective inside the blocks: rank 0 may be several blocks ahead. It stops where it reads
    the flag (nobody is further), and rank 1 runs on to that block, then stops too."""
    w, (a, b) = _ranks()
    for _ in range(3):
        _step(a)
    w[0] = 7
    assert _step(a) and a.block == 4
    stops = [_step(b) for _ in range(4)]
    assert stops == [False, False, False, True] and b.block == 4


def test_no_cancel_of_another_call_and_none_on_a_mesh_that_cannot():
    w, (a, b) = _ranks()
    w[0] = 6  # an earlier call's cancel
    assert not _step(a) and not _step(b)
    w[0], w[1] = 7, 0  # pipeline stages / sharded weights / several nodes: the group is stopped instead
    assert not _step(a) and not _step(b)
    assert cooperative(ParallelConfig(world_size=2, cfg=2, device="cpu"))
    assert not cooperative(ParallelConfig(world_size=2, pp=2, device="cpu"))
    assert not cooperative(ParallelConfig(world_size=2, ulysses=2, device="cpu", shard_weights=True))


def test_watch_asks_for_the_cancel_and_gives_up_after_its_grace(monkeypatch):
    monkeypatch.setenv("PDIT_CANCEL_GRACE_S", "0.2")
    w, (a, b) = _ranks()
    owner = _Owner(w, 2)

    class Cancel(Exception):
        pass

    def interrupt():
        raise Cancel()
    watch = CallWatch(owner, 7, [1 << 22, 1 << 22], 1000, interrupt)  # pids that do not exist
    assert watch.tick({0, 1}) is None and isinstance(watch.exc, Cancel) and w[0] == 7
    import time
    time.sleep(0.25)
    kind, text = watch.tick({0, 1})
    assert kind == "give_up" and "did not stop the call within" in text and "model call 7" in text, text
