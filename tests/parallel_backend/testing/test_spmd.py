"""testing/spmd.py: ranks forked from one preloaded forkserver are still fresh processes: what one run changes in a
module is not seen by the next, and a rank's error comes back with its traceback."""
import os

import pytest

from parallel_backend.config import ParallelConfig
from parallel_backend.testing.spmd import run_on_ranks

pytestmark = pytest.mark.multirank


def _mutate_and_report(mesh):
    import parallel_backend.parallel.attention as attention
    seen = attention.ACTIVE_SEQUENCE_STATES[:]  # noqa: flagged below if a previous run's entry is still there
    attention.ACTIVE_SEQUENCE_STATES.append(f"rank {mesh.rank}")
    return os.getpid(), os.getppid(), seen


def _fail(mesh):
    if mesh.rank == 1:
        raise ValueError("rank 1 refuses")
    return mesh.rank


def test_each_run_gets_fresh_ranks_from_one_server():
    cfg = ParallelConfig(world_size=2, device="cpu", dtype="fp32", ulysses=2)
    first = run_on_ranks(_mutate_and_report, cfg)
    second = run_on_ranks(_mutate_and_report, cfg)
    assert all(seen == [] for _, _, seen in first + second), "a rank saw module state from an earlier run"
    assert not {pid for pid, _, _ in first} & {pid for pid, _, _ in second}
    servers = {ppid for _, ppid, _ in first + second}
    assert len(servers) == 1 and os.getpid() not in servers  # forked by the forkserver, not by this process


def test_a_rank_error_names_the_rank():
    cfg = ParallelConfig(world_size=2, device="cpu", dtype="fp32", ulysses=2)
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: rank 1 refuses"):
        run_on_ranks(_fail, cfg)
