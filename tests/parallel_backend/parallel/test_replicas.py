"""The batch split over the cfg x dp replicas (parallel_backend/parallel/replicas.py)."""
import pytest

from parallel_backend.parallel.replicas import replica_slice

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("batch", [0, 1, 2, 3, 5, 8, 13])
def test_replica_slice_covers_every_row_once(batch, replicas):
    import torch

    slices = [replica_slice(batch, i, replicas) for i in range(replicas)]
    rows = [r for s in slices for r in range(batch)[s]]
    assert rows == list(range(batch))  # each row exactly once, in order, contiguous chunks
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1
    # the torch.tensor_split rule the docstring promises
    assert sizes == [len(c) for c in torch.tensor_split(torch.arange(batch), replicas)]


def test_replica_slice_empty_chunks_when_batch_smaller():
    # cfg == 1.0 on a cfg=2 mesh: ComfyUI sends one row, the uncond replica idles
    assert replica_slice(1, 0, 2) == slice(0, 1)
    s = replica_slice(1, 1, 2)
    assert s.start == s.stop
    empties = [i for i in range(4) if (lambda s: s.start == s.stop)(replica_slice(3, i, 4))]
    assert empties == [3]
