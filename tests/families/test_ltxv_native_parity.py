"""LTX-Video, sharded on 4-rank meshes (cfg2 x ulysses2, ring2 x tp2), on 3 ranks (ring3) and on 1 rank, equals
ComfyUI's native LTXVModel forward on the same file, <= 1e-4 max abs in fp32.

The oracle is ComfyUI's own loader: `comfy.sd.load_diffusion_model` (what the native Load Diffusion Model runs)
detects the tiny file as LTXV and builds LTXVModel; each case runs its `diffusion_model` with the inputs ComfyUI
passes (x, timestep, context, attention_mask, frame_rate, and for image-to-video the per-token timestep that
LTXV.process_timestep makes from the denoise mask, plus the mask itself).

Cases: token counts that divide every sequence degree (2 x 4 x 4 = 32 on 2 ranks) and that do not (45 and 31 on 2,
32 and 31 on 3); one timestep per row and one per token (frame 0 kept: image-to-video); a text mask with padding;
on 0.33 a guide frame (keyframe_idxs, some of its tokens dropped by the denoise mask's grid), and a weak guide, whose
attention mask is refused on every split mesh and equals native on 1 rank.
"""
import pytest
import torch
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import LTXV_PRESETS, write_tiny_ltxv

pytestmark = pytest.mark.multirank
TOL = 1e-4
T_ROWS = (0.8, 0.3)
TEXT_TOKENS = 12

# case -> (frames, height, width) of the latent, per-token timestep (i2v), padded text mask, guide strength (None: no
# guide)
CASES = {
    "t2v_32tok": ((2, 4, 4), False, False, None),
    "t2v_45tok_masked_text": ((3, 5, 3), False, True, None),
    "i2v_45tok": ((3, 5, 3), True, False, None),
    "t2v_31tok": ((1, 1, 31), False, False, None),
}


def _host_has_guide_attention() -> bool:
    """ComfyUI 0.33's LTXVModel keeps guide tokens by a denoise-mask grid and may mask their attention (0.3.75 has
    neither)."""
    import os
    with open(os.path.join(comfy_host.comfyui_path(), "comfy", "ldm", "lightricks", "model.py")) as f:
        return "guide_attention_entries" in f.read()


# 0.33: the last latent frame is a guide (LTXVAddGuide appends it with its pixel positions as keyframe_idxs); 4 of its
# 15 tokens are dropped by the denoise mask's grid (negative), the rest split with the video's. At strength 1 no
# attention mask is needed; below 1 the guide's attention is masked over the whole sequence: refused on a split
GUIDED = {"guided_41tok": ((3, 5, 3), False, False, 1.0)}
WEAK_GUIDE = {"weak_guide_41tok": ((3, 5, 3), False, False, 0.5)}
if _host_has_guide_attention():
    CASES.update(GUIDED)


def _inputs(case, seed=0):
    """(x, timestep, context, {keyword inputs}) as ComfyUI's LTXV BaseModel hands them to the diffusion model."""
    thw, i2v, masked, guide = {**CASES, **WEAK_GUIDE}[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, LTXV_PRESETS["tiny"]["in_channels"], *thw, generator=g)
    ctx = torch.randn(2, TEXT_TOKENS, LTXV_PRESETS["tiny"]["caption_channels"], generator=g)
    t = torch.tensor(T_ROWS)
    kw = {"frame_rate": 24}
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    if masked:
        mask[0, 9:] = 0
        mask[1, 5:] = 0
    kw["attention_mask"] = mask
    if i2v or guide is not None:  # LTXV.process_timestep: the denoise mask times sigma, one entry per token
        dm = torch.ones(2, 1, *thw)
        if i2v:
            dm[:, :, 0] = 0.0  # the kept first frame
        t = (dm * t.view(2, 1, 1, 1, 1)).flatten(2)[:, 0]
        kw["denoise_mask"] = dm
    if guide is not None:
        _, h, w = thw
        kw["denoise_mask"][:, :, -1, :2, :2] = -1.0  # grid-masked guide tokens
        hw = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1).float()
        start = torch.cat([torch.zeros(1, h * w), 32 * hw])  # (3, K) pixel positions of a frame-0 guide
        kw["keyframe_idxs"] = torch.stack([start, start + torch.tensor([1.0, 32, 32]).view(3, 1)], -1).expand(
            2, 3, h * w, 2).contiguous()
        kw["guide_attention_entries"] = [{"pre_filter_count": h * w, "strength": guide}]
    return x, t, ctx, kw


def _run(model):
    out = {}
    for case in CASES:
        x, t, ctx, kw = _inputs(case)
        out[("tiny", case)] = (model.rows(2), model.forward_rows(x, t, ctx, **kw))
    if _host_has_guide_attention():  # a weak guide: equal to native unsplit, refused on a split sequence
        x, t, ctx, kw = _inputs("weak_guide_41tok")
        try:
            out["weak_guide"] = (model.rows(2), model.forward_rows(x, t, ctx, **kw))
        except ValueError as e:
            out["weak_guide"] = str(e)
    return out


def _run_mesh(mesh, path):
    return _run(ShardedModel(mesh, path, "fp32"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_ltxv(str(tmp_path_factory.mktemp("ltxv") / "ltxv_tiny.safetensors"), seed=3)


def ltxv_native(path):
    """ComfyUI's own LTXV model for the file, as its Load Diffusion Model loads it (fp32)."""
    comfy_host.import_comfy()
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32})
    return patcher.model


@pytest.fixture(scope="module")
def native_outputs(checkpoint):
    base = ltxv_native(checkpoint)
    assert type(base).__name__ == "LTXV" and type(base.diffusion_model).__name__ == "LTXVModel"
    dm, ref = base.diffusion_model, {}
    for case in CASES:
        x, t, ctx, kw = _inputs(case)
        with torch.no_grad():
            ref[("tiny", case)] = dm(x, t, ctx, **kw).float()
    return ref


def _check_weak_guide(per_rank, split: bool, checkpoint):
    """Refused with what to change on every rank of a split mesh; equal to native where nothing is split."""
    if not _host_has_guide_attention():
        return
    if split:
        assert all(isinstance(r["weak_guide"], str) and "set ulysses and ring to 1" in r["weak_guide"]
                   for r in per_rank), [r["weak_guide"] for r in per_rank]
        return
    x, t, ctx, kw = _inputs("weak_guide_41tok")
    with torch.no_grad():
        ref = ltxv_native(checkpoint).diffusion_model(x, t, ctx, **kw).float()
    rows, y = per_rank[0]["weak_guide"]
    assert (y - ref[rows]).abs().max().item() <= TOL


def test_native_outputs_are_not_trivial(native_outputs):
    """Per-token timesteps and the text mask change the output (the cases test what they say)."""
    a = native_outputs[("tiny", "t2v_45tok_masked_text")]
    b = native_outputs[("tiny", "i2v_45tok")]
    assert a.abs().mean() > 0.1 and (a - b).abs().max() > 1e-2
    if ("tiny", "guided_41tok") in native_outputs:  # the guide's grid-dropped tokens come back as zeros
        guided = native_outputs[("tiny", "guided_41tok")]
        assert guided[:, :, -1, :2, :2].abs().max() == 0 and guided[:, :, -1, 2:].abs().mean() > 0.1


def test_one_rank_equals_comfyui_native(checkpoint, native_outputs):
    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    out = _run_mesh(mesh, checkpoint)
    assert_rows_match(native_outputs, [out], "1 rank", TOL)
    _check_weak_guide([out], False, checkpoint)


@pytest.fixture(scope="module")
def world4(checkpoint):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoint, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    assert_rows_match(native_outputs, [r[mesh] for r in world4], config.describe(), TOL)
    _check_weak_guide([r[mesh] for r in world4], True, None)


def test_odd_world_size_ring3_equals_comfyui_native(checkpoint, native_outputs):
    """3 ranks: 32 heads do not divide by 3, so the sequence splits by Ring; every case's token count is ragged on 3."""
    config = ParallelConfig(world_size=3, device="cpu", dtype="fp32", ring=3)
    per_rank = run_on_ranks(_run_mesh, config, checkpoint)
    assert_rows_match(native_outputs, per_rank, config.describe(), TOL)
    _check_weak_guide(per_rank, True, None)


def test_sharded_weights_equal_comfyui_native(checkpoint, native_outputs):
    """Sharded weights (each block's weights split over the ranks, gathered as it runs) on ulysses2."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", ulysses=2, shard_weights=True)
    assert_rows_match(native_outputs, run_on_ranks(_run_mesh, config, checkpoint), config.describe(), TOL)


def test_pipeline_stages_equal_comfyui_native(checkpoint, native_outputs):
    """Two pipeline stages (the tiny file's blocks halved; embeddings, text and the head on each stage), each row a
    micro-batch: every case (per-token i2v timesteps, masked text) equals native."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", pp=2)
    assert_rows_match(native_outputs, run_on_ranks(_run_mesh, config, checkpoint), config.describe(), TOL)


GGUF_MESHES = {"tp2": dict(tp=2), "ulysses2": dict(ulysses=2)}


def _run_gguf(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    return {**_run(m), "info": m.info()}


def test_gguf_q8_0_equals_comfyui_native_on_its_dequantized_weights(checkpoint, tmp_path):
    """LTX-Video 0.9 as a Q8_0 GGUF (city96's layout, architecture "ltxv") on tp2 and ulysses2: its block linears
    stay quantized on the ranks (split on quant-block boundaries under TP) and every case equals ComfyUI's forward
    on the file's dequantized weights (ComfyUI-GGUF dequantizes the same bytes per layer). LTX-2 GGUFs are refused
    (tests/parallel_backend/models/test_ltxv.py)."""
    from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit

    path = str(tmp_path / "ltx-video-2b-v0.9.5-Q8_0.gguf")
    write_gguf_dit(checkpoint, path, "Q8_0", architecture="ltxv")
    deq = write_dequantized_safetensors(path, str(tmp_path / "ltxv_deq.safetensors"))
    dm, ref = ltxv_native(deq).diffusion_model, {}
    for case in CASES:
        x, t, ctx, kw = _inputs(case)
        with torch.no_grad():
            ref[("tiny", case)] = dm(x, t, ctx, **kw).float()
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", **GGUF_MESHES["tp2"])
    per_rank = run_on_ranks(run_meshes, config, _run_gguf, path, GGUF_MESHES, timeout=600)
    for mesh in GGUF_MESHES:
        info = per_rank[0][mesh]["info"]
        assert info["family"] == "ltxv" and info["gguf_quantized_layers"] >= 8, info
        assert not info["gguf_dequantized_at_load"], info
        assert_rows_match(ref, [r[mesh] for r in per_rank], f"GGUF Q8_0 {mesh}", TOL)
