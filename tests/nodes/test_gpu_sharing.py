"""Sharing GPUs with ComfyUI (nodes/gpu_sharing.py): ComfyUI's model management is called with the ranks' GPUs and
bytes before the group loads and before each sampling run, and ComfyUI's reserve grows by what the ranks hold on
its own GPU (given back when the group stops). The host has no GPU: ComfyUI's device accounting is faked (its
GPU is cuda:0 and `free_memory` records its calls) and the ranks run on CPU with the config's
device set to cuda for these calls only."""
import dataclasses

import pytest
import torch


@pytest.fixture
def fake_comfy_gpu(comfy, pack, monkeypatch):
    import sys

    import comfy.model_management as mm
    calls = []
    # ComfyUI "computes on cuda:0" for the pack's accounting only (its sampling stays on this CPU host)
    monkeypatch.setattr(sys.modules[pack.__name__ + ".nodes.gpu_sharing"], "comfy_gpu_index", lambda: 0)
    monkeypatch.setattr(mm, "free_memory", lambda nbytes, device, keep_loaded=[]: calls.append((device, nbytes)))
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 400 << 20)
    return mm, calls


def test_free_and_reserve_calls(pack, fake_comfy_gpu):
    import sys

    from parallel_backend.config import ParallelConfig

    gpu = sys.modules[pack.__name__ + ".nodes.gpu_sharing"]
    mm, calls = fake_comfy_gpu
    cfg = ParallelConfig(world_size=3, dp=3, device="cuda", devices=(0, 2, 3))
    made = gpu.free_comfy_models_on_rank_gpus(cfg, [5 << 30, 6 << 30, 7 << 30], reserve=1 << 30)
    assert made == calls == [(torch.device("cuda", 0), 6 << 30), (torch.device("cuda", 2), 7 << 30),
                             (torch.device("cuda", 3), 8 << 30)]
    # rank 0 shares ComfyUI's GPU 0: its 5 GiB join ComfyUI's reserve, replacing (not adding to) an earlier one
    assert gpu.reserve_on_comfy_gpu(cfg, [5 << 30, 6 << 30, 7 << 30]) == 5 << 30
    assert mm.EXTRA_RESERVED_VRAM == (400 << 20) + (5 << 30)
    gpu.reserve_on_comfy_gpu(cfg, [3 << 30, 6 << 30, 7 << 30])
    assert mm.EXTRA_RESERVED_VRAM == (400 << 20) + (3 << 30)
    gpu.release_reservation()
    assert mm.EXTRA_RESERVED_VRAM == 400 << 20
    # ranks kept off ComfyUI's GPU: nothing reserved; CPU ranks: no call at all
    assert gpu.reserve_on_comfy_gpu(dataclasses.replace(cfg, devices=(1, 2, 3)), [1, 1, 1]) == 0
    assert gpu.free_comfy_models_on_rank_gpus(dataclasses.replace(cfg, device="cpu"), [1, 1, 1]) == []


@pytest.mark.multirank
def test_loader_and_each_sampling_run_free_comfyui_models_on_the_ranks_gpus(pack, config_spec, conds, monkeypatch,
                                                                             fake_comfy_gpu):
    """Through the nodes: the loader frees ComfyUI's models on the ranks' GPUs before it loads, and so does every
    sampling run (ComfyUI's ON_PRE_RUN), with the bytes the plan gives each rank; the Unload node gives the reserve
    back."""
    import sys

    import nodes as comfy_nodes
    import parallel_backend.runtime.group as group

    gpu = sys.modules[pack.__name__ + ".nodes.gpu_sharing"]
    mm, calls = fake_comfy_gpu
    real_free, real_reserve = gpu.free_comfy_models_on_rank_gpus, gpu.reserve_on_comfy_gpu
    as_cuda = lambda c: dataclasses.replace(c, device="cuda", devices=(0, 1))  # the ranks stay CPU processes
    monkeypatch.setattr(gpu, "free_comfy_models_on_rank_gpus", lambda c, b, r=0: real_free(as_cuda(c), b, r))
    monkeypatch.setattr(gpu, "reserve_on_comfy_gpu", lambda c, b: real_reserve(as_cuda(c), b))
    group.stop_all()
    try:
        model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32",
                                                                          config_spec(world_size=2, ulysses=2))
        assert [d for d, _ in calls] == [torch.device("cuda", 0), torch.device("cuda", 1)]
        per_rank = calls[0][1]
        assert per_rank > 40e6  # the tiny Wan's 42.9 MB of fp32 weights + the reserve for CPU ranks
        assert mm.EXTRA_RESERVED_VRAM > 400 << 20  # rank 0 on "ComfyUI's GPU"
        calls.clear()
        pos, neg = conds
        comfy_nodes.common_ksampler(model, 1, 1, 1.0, "euler", "simple", pos, neg,
                                    {"samples": torch.zeros(1, 16, 1, 8, 8)})
        assert calls == [(torch.device("cuda", 0), per_rank), (torch.device("cuda", 1), per_rank)]
        pack.NODE_CLASS_MAPPINGS["ParallelUnload"]().unload()
        assert mm.EXTRA_RESERVED_VRAM == 400 << 20
    finally:
        group.stop_all()
