"""HunyuanVideo 1.5, sharded on cfg2 x ulysses2, ring2 x tp2 and on 3 ranks (ring3), equals ComfyUI's native
HunyuanVideo._forward on the same file (the released key layout, loaded by ComfyUI's own loader), <= 1e-4 max abs in
fp32, on both hosts (0.33 joins the text before the image tokens, 0.3.75 after them).

105 image tokens (3 x 5 x 7) divide by neither 2, 4 nor 3: the split pads. The text (9 Qwen tokens, 4 ByT5 glyph
tokens, 3 SigLIP image tokens: 16) is held whole by every rank and counted once as keys; the masked case (batch 1,
the host's integer text mask with 3 of 9 tokens off) checks the mask folds into the split keys. HunyuanVideo 1.0 (patch
1 x 2 x 2, single blocks, its pooled CLIP-L `y` and guidance) on ring2 x tp2 and cfg2 x ulysses2.

1.5's distilled files, in the same rank runs (each rank loads them after the base file), with the inputs ComfyUI's
sampler hands their class: the SR distilled file (ComfyUI's HunyuanVideo15_SR_Distilled: 98 input channels, the noise
and HunyuanVideo15SuperResolution's 66 channels through the class's own concat_cond at noise_augmentation 0.7,
`disable_time_r` False from its extra_conds) and the step-distilled file (HunyuanVideo15 with `time_r_in`); both add
the meanflow embedding of the next sigma of the schedule (`transformer_options` sigmas / sample_sigmas, which cross
to the ranks with the call; each cfg replica gets its rows' sigmas). 1.5's cfg-distilled files have the base layout
(no guidance_in): the base file covers them.
"""
import pytest
import torch
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import write_tiny_hunyuan_video

TOL = 1e-4
MESHES_3 = {"ring3": dict(ring=3)}  # (the tiny model has 2 heads of 128: Ulysses cannot take 3)
CASES = ("t2v_i2v_conds", "text_mask")


def _case(name):
    """(x, timestep, context, conds): 2 rows with ByT5 + image tokens, or 1 row with a text mask (the host's mask
    covers the Qwen text only, so that case has no other text tokens)."""
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(2, 65, 3, 5, 7, generator=g)
    ctx = torch.randn(2, 9, 64, generator=g)
    if name == "text_mask":
        mask = torch.ones(1, 9, dtype=torch.long)
        mask[:, 6:] = 0
        return x[:1], torch.tensor([0.6]), ctx[:1], {"attention_mask": mask}
    conds = {"txt_byt5": torch.randn(2, 4, 1472, generator=g), "clip_fea": torch.randn(2, 3, 1152, generator=g)}
    return x, torch.tensor([0.7, 0.3]), ctx, conds


# the distilled files: preset -> (ComfyUI's supported_models class, the cases each runs)
VARIANTS = {"sr-distilled": ("HunyuanVideo15_SR_Distilled", ("sr_t2v",)),
            "step-distilled": ("HunyuanVideo15", ("step_i2v", "step_text_mask"))}
SCHEDULE = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])  # sample_sigmas; the case's rows are at 0.75


def _sr_inputs(base_model, g):
    """(x, context, conds) as ComfyUI's HunyuanVideo15_SR_Distilled gets them for 2 rows: the node
    HunyuanVideo15SuperResolution's conditioning from a latent, the class's extra_conds (its concat_cond at
    noise_augmentation 0.7, the guidance, `disable_time_r`), the concat channels joined to the noise as its
    apply_model does."""
    from comfy_extras.nodes_hunyuan import HunyuanVideo15SuperResolution

    noise, ctx = torch.randn(2, 32, 3, 5, 7, generator=g), torch.randn(2, 9, 64, generator=g)
    low = {"samples": torch.randn(1, 32, 3, 5, 7, generator=g)}
    positive = HunyuanVideo15SuperResolution.execute([[ctx[:1], {}]], [[ctx[:1], {}]], low, 0.7)[0][0][1]
    out = base_model.extra_conds(noise=noise, device=torch.device("cpu"), seed=5, cross_attn=ctx, pooled_output=None,
                                 conditioning_byt5small=torch.randn(2, 4, 1472, generator=g), **positive)
    conds = {k: c.process_cond(batch_size=2, area=None).cond for k, c in out.items()}
    x = torch.cat((noise, conds.pop("c_concat")), dim=1)
    return x, conds.pop("c_crossattn"), conds


def _variant_case(name, base_model=None):
    """(x, timestep, context, conds, transformer_options) of a distilled file's case: rows at sigma 0.75 of
    SCHEDULE, the timestep ComfyUI's flow sampling gives (sigma x 1000)."""
    g = torch.Generator().manual_seed(20 + len(name))
    if name == "sr_t2v":
        x, ctx, conds = _sr_inputs(base_model, g)
    else:
        x, ctx = torch.randn(2, 65, 3, 5, 7, generator=g), torch.randn(2, 9, 64, generator=g)
        conds = {"txt_byt5": torch.randn(2, 4, 1472, generator=g), "clip_fea": torch.randn(2, 3, 1152, generator=g)}
    rows = 1 if name == "step_text_mask" else 2
    if rows == 1:
        conds = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])}
    sigmas = torch.full((rows,), 0.75)
    options = {"sigmas": sigmas, "sample_sigmas": SCHEDULE}
    return x[:rows], sigmas * 1000, ctx[:rows], conds, options


def _run_mesh(mesh, paths):
    """On every rank: each file's cases (the base file's, then the distilled ones')."""
    out = {}
    for preset, path in paths.items():
        m = ShardedModel(mesh, path, "fp32")
        if preset == "tiny":
            for name in CASES:
                x, t, ctx, conds = _case(name)
                out[(preset, name)] = (m.rows(x.shape[0]), m.forward_rows(x, t, ctx, **conds), m.last_fold)
            continue
        inputs = torch.load(path + ".inputs.pt")  # the cases' inputs, as the native side made them
        for name in VARIANTS[preset][1]:
            x, t, ctx, conds, options = inputs[name]
            out[(preset, name)] = (m.rows(x.shape[0]), m.forward_rows(x, t, ctx, transformer_options=options,
                                                                     **conds), m.last_fold)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """preset -> tiny file: the base 1.5 file and the distilled ones (each with its cases' inputs beside it)."""
    d = tmp_path_factory.mktemp("hunyuan")
    paths = {"tiny": write_tiny_hunyuan_video(str(d / "hunyuan_video15_tiny.safetensors"), seed=2)}
    for i, preset in enumerate(VARIANTS):
        paths[preset] = write_tiny_hunyuan_video(str(d / f"hunyuan_video15_{preset}.safetensors"), seed=4 + i,
                                                 preset=f"tiny-{preset}")
    return paths


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints["tiny"]


@pytest.fixture(scope="module")
def native_outputs(checkpoints):
    """ComfyUI's own loader and _forward on each file (the distilled cases' inputs saved for the ranks)."""
    comfy_host.import_comfy()
    import comfy.sd

    ref = {}
    for preset, path in checkpoints.items():
        base = comfy.sd.load_diffusion_model(path).model
        if preset != "tiny":
            assert type(base).__name__ == VARIANTS[preset][0] and base.diffusion_model.time_r_in is not None
        cases = {n: _variant_case(n, base) for n in VARIANTS[preset][1]} if preset in VARIANTS else {}
        if cases:
            torch.save(cases, path + ".inputs.pt")
        for name in CASES if preset == "tiny" else cases:
            x, t, ctx, conds, options = cases[name] if cases else (*_case(name), {})
            with torch.no_grad():
                ref[(preset, name)] = base.diffusion_model._forward(x, t, ctx, transformer_options=options,
                                                                    **conds).float()
    return ref


pytestmark = pytest.mark.multirank


def test_native_outputs_are_not_trivial(native_outputs, checkpoint):
    comfy_host.import_comfy()
    import comfy.sd

    a = native_outputs[("tiny", "text_mask")]
    dm = comfy.sd.load_diffusion_model(checkpoint).model.diffusion_model
    x, t, ctx, _ = _case("text_mask")
    with torch.no_grad():
        unmasked = dm._forward(x, t, ctx, transformer_options={})
    assert a.abs().mean() > 0.1 and (a - unmasked).abs().max() > 1e-2  # the mask changes the output


def test_distilled_inputs_change_native_outputs(native_outputs, checkpoints):
    """The meanflow embedding of the next sigma changes each distilled file's output (ComfyUI skips it with
    disable_time_r True, as its HunyuanImage 2.1 refiner sets), and so do the SR file's 66 concat channels."""
    comfy_host.import_comfy()
    import comfy.sd

    for preset, (_, names) in VARIANTS.items():
        dm = comfy.sd.load_diffusion_model(checkpoints[preset]).model.diffusion_model
        x, t, ctx, conds, options = torch.load(checkpoints[preset] + ".inputs.pt")[names[0]]
        ref = native_outputs[(preset, names[0])]
        with torch.no_grad():
            plain = dm._forward(x, t, ctx, transformer_options=options, **{**conds, "disable_time_r": True})
            assert ref.abs().mean() > 0.1 and (ref - plain).abs().max() > 1e-2, preset
            if preset == "sr-distilled":
                assert (ref - dm._forward(torch.cat((x[:, :32], 0 * x[:, 32:]), 1), t, ctx,
                                          transformer_options=options, **conds)).abs().max() > 1e-2


@pytest.fixture(scope="module")
def world4(checkpoints):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoints, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    assert_rows_match(native_outputs, [r[mesh] for r in world4], config.describe(), TOL)
    if mesh == "cfg2xulysses2":  # one row (the masked case): the cfg replicas fold into the sequence split
        assert {r[mesh][("tiny", "text_mask")][2] for r in world4} != {"none"}


def _run_meshes_3(mesh0, paths):
    from parallel_backend.runtime.mesh import build_mesh

    out = {}
    for name, degrees in MESHES_3.items():
        cfg = ParallelConfig(world_size=3, device="cpu", dtype="fp32", **degrees)
        mesh = mesh0 if cfg == mesh0.config else build_mesh(cfg, mesh0.rank, mesh0.device)
        out[name] = _run_mesh(mesh, paths)
    return out


def test_odd_world_size_equals_comfyui_native(native_outputs, checkpoints):
    config = ParallelConfig(world_size=3, device="cpu", dtype="fp32", **MESHES_3["ring3"])
    per_rank = run_on_ranks(_run_meshes_3, config, checkpoints, timeout=600)
    for mesh in MESHES_3:
        assert_rows_match(native_outputs, [r[mesh] for r in per_rank], mesh, TOL)


def test_pipeline_stages_equal_comfyui_native(native_outputs, checkpoint):
    """Two pipeline stages over the tiny file's double block and single block (cut as one sequence): the stage
    boundary falls where the host joins img and txt, so (img, txt) crosses and the next stage joins them."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", pp=2)
    per_rank = run_on_ranks(_run_mesh, config, {"tiny": checkpoint}, timeout=600)
    assert_rows_match({k: v for k, v in native_outputs.items() if k[0] == "tiny"}, per_rank, config.describe(), TOL)


def test_sharded_weights_equal_comfyui_native(native_outputs, checkpoint):
    """Sharded weights (each double / single block's weights split over the ranks, gathered per block) on ulysses2."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", ulysses=2, shard_weights=True)
    per_rank = run_on_ranks(_run_mesh, config, {"tiny": checkpoint}, timeout=600)
    base = {k: v for k, v in native_outputs.items() if k[0] == "tiny"}
    assert_rows_match(base, per_rank, config.describe(), TOL)


# HunyuanVideo 1.0 (T2V): patch (1, 2, 2), the pooled CLIP-L vector `y` (vector_in) and the guidance number
# (guidance_in) join the per-row modulation vector; 3 x 3 x 5 = 45 image tokens, 9 text tokens
V10 = dict(in_channels=16, out_channels=16, patch=(1, 2, 2), byt5=False, vision=False, guidance=True, vector=True)


def _case_10():
    g = torch.Generator().manual_seed(10)
    conds = {"y": torch.randn(2, 768, generator=g), "guidance": torch.tensor([6.0, 3.5])}
    x, ctx = torch.randn(2, 16, 3, 6, 10, generator=g), torch.randn(2, 9, 64, generator=g)
    return x, torch.tensor([0.8, 0.4]), ctx, conds


def _run_10(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    x, t, ctx, conds = _case_10()
    return {("hunyuan-1.0", "y_guidance"): (m.rows(2), m.forward_rows(x, t, ctx, **conds))}


def test_hunyuan_video_10_pooled_clip_and_guidance_equal_comfyui_native(tmp_path):
    """1.0's own inputs on ring2 x tp2 (single blocks' fused layers split, the sequence ringed) and cfg2 x ulysses2."""
    comfy_host.import_comfy()
    import comfy.sd

    path = write_tiny_hunyuan_video(str(tmp_path / "hunyuan_video10_tiny.safetensors"), seed=3, **V10)
    x, t, ctx, conds = _case_10()
    dm = comfy.sd.load_diffusion_model(path).model.diffusion_model
    with torch.no_grad():
        ref = dm._forward(x, t, ctx, transformer_options={}, **conds).float()
        plain = dm._forward(x, t, ctx, transformer_options={}, y=torch.zeros_like(conds["y"]),
                            guidance=torch.ones(2)).float()
    assert ref.abs().mean() > 0.1 and (ref - plain).abs().max() > 1e-2  # y and guidance change the output
    meshes = {k: MESHES_4[k] for k in ("ring2xtp2", "cfg2xulysses2")}
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **meshes["ring2xtp2"])
    per_rank = run_on_ranks(run_meshes, config, _run_10, path, meshes, timeout=600)
    for mesh in meshes:
        assert_rows_match({("hunyuan-1.0", "y_guidance"): ref}, [r[mesh] for r in per_rank], mesh, TOL)


# a city96-layout GGUF ("hyvid"): 2 ranks, tensor parallel (the fused q/k/v and the single blocks' linears split on
# quant-block boundaries) and Ulysses (each rank the whole quantized weights)
GGUF_MESHES = {"tp2": dict(tp=2), "ulysses2": dict(ulysses=2)}


def _run_gguf(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    x, t, ctx, conds = _case("t2v_i2v_conds")
    return {("gguf", "t2v_i2v_conds"): (m.rows(2), m.forward_rows(x, t, ctx, **conds)), "info": m.info()}


def test_gguf_q8_0_equals_comfyui_native_on_its_dequantized_weights(checkpoint, tmp_path):
    """HunyuanVideo 1.5 as a Q8_0 GGUF (city96's layout, architecture "hyvid") on tp2 and ulysses2: its block linears
    stay quantized on the ranks and the output equals ComfyUI's forward on the file's dequantized weights (ComfyUI
    has no GGUF loader of its own: ComfyUI-GGUF dequantizes the same bytes per layer)."""
    from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit

    comfy_host.import_comfy()
    import comfy.sd

    path = str(tmp_path / "hunyuanvideo1.5_720p_t2v-Q8_0.gguf")
    write_gguf_dit(checkpoint, path, "Q8_0", architecture="hyvid")
    deq = write_dequantized_safetensors(path, str(tmp_path / "hunyuan_video15_dequantized.safetensors"))
    x, t, ctx, conds = _case("t2v_i2v_conds")
    with torch.no_grad():
        ref = comfy.sd.load_diffusion_model(deq).model.diffusion_model._forward(
            x, t, ctx, transformer_options={}, **conds).float()
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", **GGUF_MESHES["tp2"])
    per_rank = run_on_ranks(run_meshes, config, _run_gguf, path, GGUF_MESHES, timeout=600)
    for mesh in GGUF_MESHES:
        info = per_rank[0][mesh]["info"]
        assert info["family"] == "hunyuan_video" and info["gguf_quantized_layers"] >= 8, info
        assert not info["gguf_dequantized_at_load"], info
        assert_rows_match({("gguf", "t2v_i2v_conds"): ref}, [r[mesh] for r in per_rank], f"GGUF Q8_0 {mesh}", TOL)


def test_hunyuan_video_10_pipeline_stages_equal_comfyui_native(tmp_path):
    """1.0 with 3 double and 1 single block on two stages: the boundary inside the double blocks (the second double
    block's (img, txt) output crosses), the second stage running the last double block, the join and the single
    block."""
    comfy_host.import_comfy()
    import comfy.sd

    path = write_tiny_hunyuan_video(str(tmp_path / "hunyuan_video10_tiny.safetensors"), seed=3, **{**V10, "depth": 3})
    x, t, ctx, conds = _case_10()
    with torch.no_grad():
        ref = comfy.sd.load_diffusion_model(path).model.diffusion_model._forward(
            x, t, ctx, transformer_options={}, **conds).float()
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", pp=2)
    assert_rows_match({("hunyuan-1.0", "y_guidance"): ref}, run_on_ranks(_run_10, config, path, timeout=600),
                      config.describe(), TOL)
