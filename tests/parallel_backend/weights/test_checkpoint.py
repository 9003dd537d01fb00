"""What the checkpoint readers share: key prefixes stripped as ComfyUI strips them, and the map re-opened every
`budget` bytes touched (so a rank's resident pages stay about one tensor)."""
from __future__ import annotations

import pytest

from parallel_backend.weights.checkpoint import MODEL_PREFIXES, ReopeningReader, strip_prefix, stripped_shapes

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only


def test_strip_prefix_takes_the_first_prefix_a_key_starts_with_and_nothing_else():
    assert strip_prefix("model.diffusion_model.blocks.0.q.weight") == "blocks.0.q.weight"
    assert strip_prefix("diffusion_model.head.weight") == "head.weight"
    assert strip_prefix("net.blocks.0.q.weight") == "net.blocks.0.q.weight"  # not one of ComfyUI's
    assert strip_prefix("net.blocks.0.q.weight", ("net.", *MODEL_PREFIXES)) == "blocks.0.q.weight"
    assert strip_prefix("x.diffusion_model.a") == "x.diffusion_model.a"  # only at the start


def test_stripped_shapes_keeps_each_shape_under_its_module_path():
    header = {"diffusion_model.a.weight": ([4, 2], "F32"), "b": ((3,), "BF16")}
    assert stripped_shapes(header) == {"a.weight": (4, 2), "b": (3,)}


class _CountingReader(ReopeningReader):
    def __init__(self, *args):
        super().__init__(*args)
        self.opened, self.dropped = 0, 0

    def _open_file(self):
        self.opened += 1
        return object()

    def _drop_file(self, f) -> None:
        self.dropped += 1


def test_the_map_is_reopened_once_a_read_would_pass_the_budget():
    with _CountingReader("f", 100) as r:
        first = r._handle(60)
        assert r._handle(40) is first and r.opened == 1  # exactly at the budget: the same map
        assert r._handle(1) is not first and (r.opened, r.dropped) == (2, 1)
    assert r.dropped == 2  # closed on leaving the block
