"""The pack's MODEL behaves like any MODEL: native samplers, model-sampling patches, denoise < 1,
previews and progress per step; patches that cannot reach the shards are refused."""
import pytest
import torch

pytestmark = pytest.mark.multirank
STEPS = 3


@pytest.fixture(scope="module")
def models(comfy, pack):
    models_dir = comfy["models_dir"]
    import comfy.sd
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(2, 2, 1, 1, 1, 1, "fp32", "cpu", "sdpa")[0]
    parallel, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec)
    native = comfy.sd.load_diffusion_model(f"{models_dir}/tiny_wan.safetensors")
    yield parallel, native
    import parallel_backend.runtime.group as group
    group.stop_all()


def _ksampler(model, pos, neg, latent, sampler="euler", scheduler="simple", denoise=1.0, seed=5):
    import nodes
    return nodes.common_ksampler(model, seed, STEPS, 4.0, sampler, scheduler, pos, neg, latent,
                                 denoise=denoise)[0]["samples"]


def _close(a, b, bound=1e-4):
    d = (a - b).abs().max().item()
    assert d <= bound, f"max abs diff {d:.2e} > {bound}"
    return d


def test_samplers_schedulers_shift_and_denoise(models, conds):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    parallel, native = models
    pos, neg = conds
    empty = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    video = {"samples": torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))}
    shift = ModelSamplingSD3()
    p8, n8 = shift.patch(parallel, 8.0)[0], shift.patch(native, 8.0)[0]
    worst = 0.0
    for sampler, scheduler in (("euler", "simple"), ("dpmpp_2m", "karras"), ("uni_pc", "beta"),
                               ("euler_ancestral", "normal")):
        worst = max(worst, _close(_ksampler(p8, pos, neg, empty, sampler, scheduler),
                                  _ksampler(n8, pos, neg, empty, sampler, scheduler)))
    # video-to-video: denoise < 1 keeps part of the input latent
    worst = max(worst, _close(_ksampler(parallel, pos, neg, video, denoise=0.6),
                              _ksampler(native, pos, neg, video, denoise=0.6)))
    print(f"pack MODEL vs native MODEL over samplers/schedulers/shift/denoise: worst {worst:.2e}")


def test_advanced_and_custom_samplers_equal_parallel_sampler(models, conds, pack):
    from comfy_extras import nodes_custom_sampler as cs

    import nodes
    parallel, _ = models
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    ref = pack.NODE_CLASS_MAPPINGS["ParallelSampler"]().sample(parallel, 5, STEPS, 4.0, "euler", "simple", pos,
                                                               neg, latent)[0]["samples"]
    adv = nodes.KSamplerAdvanced().sample(parallel, "enable", 5, STEPS, 4.0, "euler", "simple", pos, neg, latent,
                                          0, 10000, "disable")[0]["samples"]
    _close(adv, ref, 1e-6)
    noise = cs.RandomNoise.execute(5).args[0]
    guider = cs.CFGGuider.execute(parallel, pos, neg, 4.0).args[0]
    sampler = cs.KSamplerSelect.execute("euler").args[0]
    sigmas = cs.BasicScheduler.execute(parallel, "simple", STEPS, 1.0).args[0]
    custom = cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).args[0]["samples"]
    _close(custom, ref, 1e-6)


def test_progress_and_preview_every_step(models, conds, pack, monkeypatch):
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod
    parallel, _ = models
    pos, neg = conds
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total, preview)))
    try:
        pack.NODE_CLASS_MAPPINGS["ParallelSampler"]().sample(parallel, 1, 4, 4.0, "euler", "simple", pos, neg,
                                                             {"samples": torch.zeros(1, 16, 2, 8, 8)})
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert [c[0] for c in calls] == [1, 2, 3, 4] and all(c[1] == 4 for c in calls)
    assert all(c[2] is not None for c in calls), "a step came without a latent preview"


def test_patch_the_native_model_ignores_is_ignored_the_same_way(models, conds):
    """An attn1_output patch (a patch point of ComfyUI's UNet, which no Wan class has) crosses to the ranks, where
    ComfyUI's own WanModel ignores it exactly as the native model does."""
    parallel, native = models
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    patch = lambda n, extra_options: n * 0  # would change the output if it were applied
    patched, native_patched = parallel.clone(), native.clone()
    patched.set_model_attn1_output_patch(patch)
    native_patched.set_model_attn1_output_patch(patch)
    ref = _ksampler(native_patched, pos, neg, latent)
    assert torch.equal(ref, _ksampler(native, pos, neg, latent))  # natively ignored
    assert (_ksampler(patched, pos, neg, latent) - ref).abs().max().item() <= 1e-4


def test_in_context_reference_latents_cross_as_a_list(models, conds):
    """BerniniConditioning's `context_latents` (ComfyUI 0.33+: a list of reference latents on the conditioning) reach
    the ranks as a list, each item cut to the replica's rows (cfg 2 here): the latent equals native."""
    import inspect

    import comfy.ldm.wan.model as wan_model
    import node_helpers

    if "context_latents" not in inspect.getsource(wan_model.WanModel.forward_orig):
        pytest.skip("this ComfyUI's WanModel takes no context_latents (0.3.75)")
    parallel, native = models
    g = torch.Generator().manual_seed(12)
    refs = {"context_latents": [torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 1, 4, 6, generator=g)]}
    pos, neg = (node_helpers.conditioning_set_values(c, refs) for c in conds)
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    ref = _ksampler(native, pos, neg, latent)
    moved = (ref - _ksampler(native, *conds, latent)).abs().max().item()
    diff = _close(_ksampler(parallel, pos, neg, latent), ref)
    print(f"context_latents through the proxy (cfg2) vs native: {diff:.2e} (they move the latent by {moved:.3f})")
    assert moved > 1e-2
