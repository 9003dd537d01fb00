"""Cosmos Predict2, sharded on 4-rank meshes and on 1 rank, equals ComfyUI's native MiniTrainDIT forward on the
same file, <= 1e-4 max abs in fp32.

The oracle is ComfyUI's own model: the tiny file's state dict goes through ComfyUI's Predict2 detection
(`comfy.model_detection.detect_unet_config`), which sets everything but the depth and head count for a
width other than 2B's / 14B's; those two come from the preset the file was written with (never from the
pack's detection). The supported_models class ComfyUI matches builds the CosmosPredict2 BaseModel whose
`diffusion_model` (MiniTrainDIT) loads the file's weights and runs each case (tests/comfy_test_nodes
`cosmos_predict2_native`, also the oracle of the workflow test).

Cases: text-to-image / video ("tiny", 16 channels) and video-to-world ("tiny-v2w", 17 channels: ComfyUI
concats the inverted noise mask before the call, and its process_timestep passes one timestep per latent
frame with the conditioning frames at 0); images (T = 1) and videos; token counts that divide the sequence
degree (16, 32) and that do not (15, 45); an odd latent size, compared with what ComfyUI's newer
MiniTrainDIT does (pad circularly to the patch, crop the output; 0.3.75 asserts instead).
"""
import pytest
import torch
import torch.nn.functional as F
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import COSMOS_PRESETS, write_tiny_cosmos

pytestmark = pytest.mark.multirank
TOL = 1e-4
PRESETS = ("tiny", "tiny-v2w")
T_ROWS = (0.8, 0.3)  # ComfyUI's Cosmos timesteps are sigma / (sigma + 1); distinct per row


def _per_frame(frames: int) -> torch.Tensor:
    """CosmosPredict2.process_timestep with CosmosPredict2ImageToVideoLatent's mask (start image = frame 0)."""
    t = torch.tensor(T_ROWS)[:, None].expand(2, frames).clone()
    t[:, 0] = 0.0
    return t


# case -> (thw, timestep); tokens = T * H/2 * W/2
CASES = {
    "image_16tok": ((1, 8, 8), torch.tensor(T_ROWS)),
    "image_15tok": ((1, 6, 10), torch.tensor(T_ROWS)),
    "video_32tok": ((2, 8, 8), torch.tensor(T_ROWS)),
    "video_45tok": ((3, 6, 10), torch.tensor(T_ROWS)),
    "video_perframe_32tok": ((2, 8, 8), _per_frame(2)),
    "video_perframe_45tok": ((3, 6, 10), _per_frame(3)),
    "odd_7x9_padded": ((2, 7, 9), torch.tensor(T_ROWS)),
}


def _inputs(preset, case, seed=0):
    thw, t = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, COSMOS_PRESETS[preset]["in_channels"], *thw, generator=g)
    if preset == "tiny-v2w":  # the channel ComfyUI concats: 1 - denoise mask (1 on conditioning frames)
        x[:, -1] = 0.0
        if t.ndim == 2:
            x[:, -1, 0] = 1.0
    return x, t, torch.randn(2, 12, 1024, generator=g)


def _run(model, preset):
    out = {}
    for case in CASES:
        x, t, ctx = _inputs(preset, case)
        out[(preset, case)] = (model.rows(2), model.forward_rows(x, t, ctx))
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
    d = tmp_path_factory.mktemp("cosmos_families")
    return {p: write_tiny_cosmos(str(d / f"cosmos_{p}.safetensors"), seed=7, preset=p) for p in PRESETS}


@pytest.fixture(scope="module")
def native_outputs(checkpoints):
    comfy_host.import_comfy()
    from comfy_test_nodes import cosmos_predict2_native

    ref = {}
    for preset, path in checkpoints.items():
        p = COSMOS_PRESETS[preset]
        base = cosmos_predict2_native(path, p["num_blocks"], p["num_heads"])
        assert type(base.model_config).__name__ == ("CosmosI2VPredict2" if preset == "tiny-v2w" else "CosmosT2IPredict2")
        dm = base.diffusion_model
        for case in CASES:
            x, t, ctx = _inputs(preset, case)
            t_, h, w = x.shape[2:]
            if case.startswith("odd"):  # newer ComfyUI: common_dit.pad_to_patch_size (circular), then crop
                x = F.pad(x, [0, w % 2, 0, h % 2, 0, 0], mode="circular")
            with torch.no_grad():
                ref[(preset, case)] = dm(x, t, ctx).float()[:, :, :t_, :h, :w]
    return ref


def _check(native_outputs, per_rank, label):
    assert_rows_match(native_outputs, per_rank, label, TOL)


def test_one_rank_equals_comfyui_native(checkpoints, native_outputs):
    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    _check(native_outputs, [_run_mesh(mesh, checkpoints)], "1 rank")


def test_native_outputs_are_not_trivial(native_outputs):
    """The cases differ from each other where they should (per-frame timesteps change the output)."""
    for preset in PRESETS:
        a = native_outputs[(preset, "video_45tok")]
        b = native_outputs[(preset, "video_perframe_45tok")]
        assert a.abs().mean() > 0.1 and (a - b).abs().max() > 1e-2




@pytest.fixture(scope="module")
def world4(checkpoints):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoints, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    _check(native_outputs, [r[mesh] for r in world4], config.describe())


# ---- model patches at MiniTrainDIT's patch points (ComfyUI 0.33+: attn1 / attn2 / mlp) -----------------------------
def _cosmos_patches() -> dict:
    """Patches that look across tokens at each of MiniTrainDIT's patch points (module-level functions: they reach
    the ranks by reference)."""
    return {"attn1_patch": [_attn1_patch], "attn2_patch": [_attn2_patch], "mlp_patch": [_mlp_patch]}


def _attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):  # (B, T * H * W, D) each, pe per token
    return {"q": q - 0.2 * q.mean(1, keepdim=True), "k": k + 0.1 * k.flip(1), "pe": pe.flip(0)}


def _attn2_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):  # q the tokens, k / v the text
    return {"q": q + 0.1 * q.mean(1, keepdim=True) * k.mean()}


def _mlp_patch(args):  # {"x": (B, T, H, W, D)}
    x = args["x"]
    return {**args, "x": x + 0.1 * x.mean((1, 2, 3), keepdim=True) - 0.05 * x.flip(2)}


def _run_patched(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    x, t, ctx = _inputs("tiny", "video_45tok")
    return m.rows(2), m.forward_rows(x, t, ctx, transformer_options={"patches": _cosmos_patches()})


def _host_applies_cosmos_patches() -> bool:
    import inspect

    import comfy.ldm.cosmos.predict2 as predict2
    return "mlp_patch" in inspect.getsource(predict2)


@pytest.mark.parametrize("mesh", ["ulysses2", "ring2xtp2"])
def test_patches_see_the_whole_grid_as_natively(checkpoints, mesh):
    """Each MiniTrainDIT patch point hands the patch the whole sequence (the grid for mlp_patch) on the pack: the
    forward equals ComfyUI's native MiniTrainDIT with the same patches (a host without the points ignores them
    on both sides)."""
    comfy_host.import_comfy()
    from comfy_test_nodes import cosmos_predict2_native

    p = COSMOS_PRESETS["tiny"]
    dm = cosmos_predict2_native(checkpoints["tiny"], p["num_blocks"], p["num_heads"]).diffusion_model
    x, t, ctx = _inputs("tiny", "video_45tok")
    with torch.no_grad():
        ref = dm(x, t, ctx, transformer_options={"patches": _cosmos_patches()}).float()
        moved = (ref - dm(x, t, ctx).float()).abs().max().item()
    degrees = {"ulysses2": dict(ulysses=2), "ring2xtp2": dict(ring=2, tp=2)}[mesh]
    config = ParallelConfig(world_size=2 if mesh == "ulysses2" else 4, device="cpu", dtype="fp32", **degrees)
    got = torch.full_like(ref, float("nan"))
    for rows, y in run_on_ranks(_run_patched, config, checkpoints["tiny"]):
        if y is not None:
            got[rows] = y
    diff = (got - ref).abs().max().item()
    print(f"MiniTrainDIT patches on {mesh} vs native: {diff:.2e} (they move the output by {moved:.3f})")
    assert (moved > 1e-2) == _host_applies_cosmos_patches()
    assert diff <= TOL
