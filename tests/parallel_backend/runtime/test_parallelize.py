"""The transforms in their order (parallel_backend/runtime/parallelize.py), in one process on a tiny Wan: a plan hook
lost by the time the weights are in is refused naming the file; a pipeline cut of a class the family does not
pipeline is refused saying what to set; compile goes on and comes off every block. (Each transform's parity across
ranks is tested where the transform lives: parallel/, weights/.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.models import wan
from parallel_backend.parallel.plan import apply_sequence_parallel
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.parallelize import Parallelized, compile_blocks, cut_pipeline, finish_after_load
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.synthetic import write_tiny_wan

import comfy_host  # noqa: E402,F401


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_wan(str(tmp_path_factory.mktemp("parallelize") / "tiny.safetensors"))
    cfg = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    return ShardedModel(single_rank_mesh(cfg, torch.device("cpu")), path, "fp32")


def test_a_plan_hook_lost_after_the_load_is_refused_naming_the_file(model):
    # the hooks a split sequence puts on (a world of one puts none), then one of them dropped as a later swap would
    hooks = apply_sequence_parallel(model.model, model.plan, model.seq_state, max_degree=2)
    try:
        parts = Parallelized(model.seq_state, hooks)
        finish_after_load(model.model, parts, "tiny.safetensors")  # all there: nothing said
        hooks[0].handle.remove()
        with pytest.raises(RuntimeError, match=rf"tiny.safetensors: .*hooks are missing.*{hooks[0].module}"):
            finish_after_load(model.model, parts, "tiny.safetensors")
    finally:
        for h in hooks:
            h.handle.remove()


def test_a_pipeline_cut_of_a_class_the_family_does_not_pipeline_says_to_set_pp_to_1():
    mesh = SimpleNamespace(config=SimpleNamespace(pp=2))
    with pytest.raises(ValueError, match=r"f.safetensors: pipeline stages \(pp=2\).*not ComfyUI's Linear: set pp to 1"):
        cut_pipeline(torch.nn.Linear(2, 2), wan, mesh, "f.safetensors")


def test_compile_goes_on_every_block_and_eager_takes_it_off(model):
    blocks = model.model.blocks
    compile_blocks(model.model, "blocks", {"backend": "eager"})
    assert all(b._compiled_call_impl is not None for b in blocks)
    compile_blocks(model.model, "blocks", None)
    assert all(b._compiled_call_impl is None for b in blocks)
