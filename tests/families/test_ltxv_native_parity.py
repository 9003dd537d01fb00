"""LTX-Video, sharded on 4-rank meshes (cfg2 x ulysses2, ring2 x tp2), on 3 ranks (ring3) and on 1 rank, equals
ComfyUI's native LTXVModel forward on the same file, <= 1e-4 max abs in fp32.

The oracle is ComfyUI's own loader: `comfy.sd.load_diffusion_model` (what the native Load Diffusion Model runs)
detects the tiny file as LTXV and builds LTXVModel; each case runs its `diffusion_model` with the inputs ComfyUI
passes (x, timestep, context, attention_mask, frame_rate, and for image-to-video the per-token timestep that
LTXV.process_timestep makes from the denoise mask, plus the mask itself).

Cases: token counts that divide every sequence degree (2 x 4 x 4 = 32 on 2 ranks) and that do not (45 and 31 on 2,
32 and 31 on 3); one timestep per row and one per token (frame 0 kept: image-to-video); a text mask with padding.
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

# case -> (frames, height, width) of the latent, per-token timestep (i2v), padded text mask
CASES = {
    "t2v_32tok": ((2, 4, 4), False, False),
    "t2v_45tok_masked_text": ((3, 5, 3), False, True),
    "i2v_45tok": ((3, 5, 3), True, False),
    "t2v_31tok": ((1, 1, 31), False, False),
}


def _inputs(case, seed=0):
    """(x, timestep, context, {keyword inputs}) as ComfyUI's LTXV BaseModel hands them to the diffusion model."""
    thw, i2v, masked = CASES[case]
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
    if i2v:  # LTXV.process_timestep: the denoise mask (0 on the kept first frame) times sigma, one per token
        dm = torch.ones(2, 1, *thw)
        dm[:, :, 0] = 0.0
        t = (dm * t.view(2, 1, 1, 1, 1)).flatten(2)[:, 0]  # (B, N): patchify of a 1-channel mask
        kw["denoise_mask"] = dm
    return x, t, ctx, kw


def _run(model):
    out = {}
    for case in CASES:
        x, t, ctx, kw = _inputs(case)
        out[("tiny", case)] = (model.rows(2), model.forward_rows(x, t, ctx, **kw))
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


def test_native_outputs_are_not_trivial(native_outputs):
    """Per-token timesteps and the text mask change the output (the cases test what they say)."""
    a = native_outputs[("tiny", "t2v_45tok_masked_text")]
    b = native_outputs[("tiny", "i2v_45tok")]
    assert a.abs().mean() > 0.1 and (a - b).abs().max() > 1e-2


def test_one_rank_equals_comfyui_native(checkpoint, native_outputs):
    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    assert_rows_match(native_outputs, [_run_mesh(mesh, checkpoint)], "1 rank", TOL)


@pytest.fixture(scope="module")
def world4(checkpoint):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoint, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    assert_rows_match(native_outputs, [r[mesh] for r in world4], config.describe(), TOL)


def test_odd_world_size_ring3_equals_comfyui_native(checkpoint, native_outputs):
    """3 ranks: 32 heads do not divide by 3, so the sequence splits by Ring; every case's token count is ragged on 3."""
    config = ParallelConfig(world_size=3, device="cpu", dtype="fp32", ring=3)
    assert_rows_match(native_outputs, run_on_ranks(_run_mesh, config, checkpoint), config.describe(), TOL)
