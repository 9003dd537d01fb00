"""Parallel Sampler in-process against ComfyUI's native Load Diffusion Model + KSampler."""
import pytest
import torch

pytestmark = pytest.mark.multirank


def _native(models_dir, pos, neg, latent, seed, steps=4, cfg=5.0):
    import comfy.sd

    import nodes
    model = comfy.sd.load_diffusion_model(f"{models_dir}/tiny_wan.safetensors")
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def test_parallel_sampler_matches_native_and_survives_cancel(comfy, pack, config_spec, conds):
    import comfy.model_management as mm

    import parallel_backend.runtime.group as group
    from parallel_backend.runtime.transport import leftover_segments

    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10)}  # 3*3*5 = 45 tokens: ragged for 2 ranks
    nodes = pack.NODE_CLASS_MAPPINGS
    spec = config_spec(world_size=2, cfg=2)  # cond and uncond on separate ranks
    model, plan = nodes["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec)
    assert "cfg=2" in plan
    out = nodes["ParallelSampler"]().sample(model, 7, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    ref = _native(comfy["models_dir"], pos, neg, latent, 7)
    diff = (out - ref).abs().max().item()
    print(f"Parallel Sampler (cfg2) vs native KSampler: max abs diff {diff:.2e}")
    assert diff <= 1e-4

    # the native KSampler on the pack's MODEL gives the same result
    import nodes as comfy_nodes
    native_on_pack = comfy_nodes.KSampler().sample(model, 7, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    assert (native_on_pack - out).abs().max().item() <= 1e-6

    # Cancel after the 2nd step: sampling stops at that step boundary, the group stays usable
    starts, g = group.starts, group.active_groups()[0]
    calls = {"n": 0}
    real_forward = g.forward

    def counting_forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            mm.interrupt_current_processing(True)
        return real_forward(*a, **k)

    g.forward = counting_forward
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes["ParallelSampler"]().sample(model, 7, 4, 5.0, "euler", "simple", pos, neg, latent)
    finally:
        g.forward = real_forward
        mm.interrupt_current_processing(False)
    assert calls["n"] == 2
    again = nodes["ParallelSampler"]().sample(model, 7, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    assert torch.equal(again, out)
    assert group.starts == starts and g.alive() and g.load_count == 1

    # latents the model cannot take are refused before any step runs (no forward reaches the group)
    from parallel_backend.config import ConfigError
    g.forward = counting_forward
    calls["n"] = 0
    try:
        # (a 4-D latent with the model's 16 channels is an image ComfyUI gives a frame axis: taken)
        for bad, why in (((1, 4, 8, 8), "5-D video latent"), ((1, 48, 2, 8, 8), "48 channels"),
                         ((1, 16, 0, 8, 8), "empty")):
            with pytest.raises(ConfigError, match=why):
                nodes["ParallelSampler"]().sample(model, 7, 4, 5.0, "euler", "simple", pos, neg,
                                                  {"samples": torch.zeros(bad)})
    finally:
        g.forward = real_forward
    assert calls["n"] == 0

    group.stop_all()
    assert not g.alive() and leftover_segments(__import__("os").getpid()) == []


def test_sampler_refuses_a_foreign_model_and_bad_latent(comfy, pack, config_spec, conds):
    models_dir = comfy["models_dir"]
    import comfy.sd
    pos, neg = conds
    native = comfy.sd.load_diffusion_model(f"{models_dir}/tiny_wan.safetensors")
    sampler = pack.NODE_CLASS_MAPPINGS["ParallelSampler"]()
    with pytest.raises(ValueError, match="Parallel Model Loader"):
        sampler.sample(native, 0, 1, 1.0, "euler", "simple", pos, neg, {"samples": torch.zeros(1, 16, 1, 8, 8)})


@pytest.mark.parametrize("cfg_scale, separate", [(1.0, False), (5.0, True)], ids=["cfg1", "cfg5_separate_calls"])
def test_cfg_mesh_keeps_every_rank_busy(comfy, pack, config_spec, conds, cfg_scale, separate):
    """cfg 1.0 (one row per call) and cfg 5 with cond and uncond sent as separate calls, on a cfg=2 mesh: the
    replica without a row folds into the sequence split, so both ranks compute on every call, and the result
    is ComfyUI's native one."""
    import parallel_backend.runtime.group as group

    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10)}
    nodes = pack.NODE_CLASS_MAPPINGS
    model, _ = nodes["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", config_spec(world_size=2, cfg=2))
    g = group.active_groups()[0]
    before = [r["forwards"] for r in g.stats()]
    if separate:  # ComfyUI batches cond and uncond only when its memory estimate allows: make it refuse
        model = model.clone()
        model.model.memory_required = lambda *a, **k: 1e30
    try:
        out = nodes["ParallelSampler"]().sample(model, 3, 4, cfg_scale, "euler", "simple", pos, neg, latent)[0]
    finally:
        if separate:
            model.model.memory_required = lambda *a, **k: 0
    stats = g.stats()
    calls = stats[0]["forwards"] - before[0]
    assert calls == (8 if separate else 4), calls  # separate: two batch-1 calls per step
    for r in stats:
        assert all(n > 0 for n in r["tokens_per_forward"][-calls:]), f"rank {r['rank']} idled"
        assert set(r["fold_per_forward"][-calls:]) == {"2xulysses"}
    ref = _native(comfy["models_dir"], pos, neg, latent, 3, cfg=cfg_scale)
    diff = (out["samples"] - ref).abs().max().item()
    print(f"cfg2 mesh at cfg {cfg_scale} ({calls} calls, both ranks busy on each): vs native {diff:.2e}")
    assert diff <= 1e-4
