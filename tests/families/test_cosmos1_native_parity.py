"""Cosmos 1.0, sharded on 4-rank meshes and on 1 rank, equals ComfyUI's native GeneralDIT forward on the same file,
<= 1e-4 max abs in fp32.

The oracle is ComfyUI's own model: the tiny file's state dict goes through ComfyUI's Cosmos 1 detection
(`comfy.model_detection.detect_unet_config`), which sets everything but the depth and head count for a width other
than 7B's (it fixes 36 blocks x 40 heads); those two come from the preset the file was written with (never from the
pack's detection). The supported_models class ComfyUI matches (CosmosT2V / CosmosI2V) builds the CosmosVideo
BaseModel whose `diffusion_model` (GeneralDIT) loads the file's weights and runs each case (tests/comfy_test_nodes
`cosmos1_native`).

Cases: text-to-world ("tiny", 16 channels) and video-to-world ("tiny-v2w", 17 channels: ComfyUI concats the
inverted noise mask before the call, 1 on the conditioning frames); images (T = 1) and videos; token counts that
divide the sequence degree (16, 32) and that do not (15 per frame, 45); the conds CosmosVideo passes: the text
`attention_mask`, a frame rate `fps` (it scales the rope's time axis) and a `padding_mask`.
"""
import pytest
import torch
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import COSMOS1_PRESETS, write_tiny_cosmos1

pytestmark = pytest.mark.multirank
TOL = 1e-4
PRESETS = ("tiny", "tiny-v2w")
T_ROWS = (0.6, -0.4)  # ComfyUI's EDM timestep: 0.25 * log(sigma); distinct per row

# case -> (thw, extra conds); tokens = T * H/2 * W/2
CASES = {
    "image_16tok": ((1, 8, 8), {}),
    "image_15tok": ((1, 6, 10), {}),
    "video_32tok": ((2, 8, 8), {}),
    "video_45tok": ((3, 6, 10), {}),
    "video_45tok_fps": ((3, 6, 10), {"fps": 8.0}),
    "video_45tok_masks": ((3, 6, 10), {"attention_mask": True, "padding_mask": True}),
}


def _inputs(preset, case, seed=0):
    thw, conds = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, COSMOS1_PRESETS[preset]["in_channels"], *thw, generator=g)
    if preset == "tiny-v2w":  # the channel ComfyUI concats: 1 - denoise mask (1 on the conditioning frame)
        x[:, -1] = 0.0
        if thw[0] > 1:
            x[:, -1, 0] = 1.0
    ctx = torch.randn(2, 12, 1024, generator=g)
    extras = {}
    if "fps" in conds:
        extras["fps"] = conds["fps"]
    if "attention_mask" in conds:  # the T5 mask ComfyUI's Cosmos text encoder returns (GeneralDIT ignores it)
        extras["attention_mask"] = (torch.arange(12) < torch.tensor([[9], [12]])).float()
    if "padding_mask" in conds:  # pixel-space padding mask, resized to the latent by GeneralDIT
        extras["padding_mask"] = (torch.rand(2, 1, thw[1] * 8, thw[2] * 8, generator=g) > 0.5).float()
    return x, torch.tensor(T_ROWS), ctx, extras


def _run(model, preset):
    out = {}
    for case in CASES:
        x, t, ctx, extras = _inputs(preset, case)
        y = model.forward_rows(x, t, ctx, **extras)
        out[(preset, case)] = (model.rows(2), y, model.last_tokens)
    return out


def _run_mesh(mesh, paths):
    out = {}
    for preset, path in paths.items():
        m = ShardedModel(mesh, path, "fp32")
        out.update(_run(m, preset))
        del m
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("cosmos1_families")
    return {p: write_tiny_cosmos1(str(d / f"cosmos1_{p}.safetensors"), seed=7, preset=p) for p in PRESETS}


@pytest.fixture(scope="module")
def native_outputs(checkpoints):
    comfy_host.import_comfy()
    from comfy_test_nodes import cosmos1_native

    ref = {}
    for preset, path in checkpoints.items():
        p = COSMOS1_PRESETS[preset]
        base = cosmos1_native(path, p["num_blocks"], p["num_heads"])
        assert type(base.model_config).__name__ == ("CosmosI2V" if preset == "tiny-v2w" else "CosmosT2V")
        assert type(base.diffusion_model).__name__ == "GeneralDIT"
        dm = base.diffusion_model
        for case in CASES:
            x, t, ctx, extras = _inputs(preset, case)
            with torch.no_grad():
                ref[(preset, case)] = dm(x, t, ctx, **extras).float()
    return ref


def _check(native_outputs, per_rank, label, degree=1):
    """Each rank's rows equal native; each rank pushed only its share of every frame's tokens through the blocks:
    ceil(H * W / degree) per frame and row (`degree`: the sequence split)."""
    def tokens_are_its_share(key, result):
        rows, _, tokens = result
        t, h, w = CASES[key[1]][0]
        assert tokens == (rows.stop - rows.start) * t * -(-(h // 2) * (w // 2) // degree), (key, tokens)

    assert_rows_match(native_outputs, per_rank, label, TOL, tokens_are_its_share)


def test_one_rank_equals_comfyui_native(checkpoints, native_outputs):
    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    _check(native_outputs, [_run_mesh(mesh, checkpoints)], "1 rank")


def test_native_outputs_are_not_trivial(native_outputs):
    """The cases differ from each other where they should: the frame rate and the padding mask change the output,
    the learnable position embedding makes the output depend on where a token is."""
    for preset in PRESETS:
        a = native_outputs[(preset, "video_45tok")]
        assert a.abs().mean() > 0.1
        assert (a - native_outputs[(preset, "video_45tok_fps")]).abs().max() > 1e-2
        assert (a - native_outputs[(preset, "video_45tok_masks")]).abs().max() > 1e-2




@pytest.fixture(scope="module")
def world4(checkpoints):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoints, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    _check(native_outputs, [r[mesh] for r in world4], config.describe(), degree=2)
