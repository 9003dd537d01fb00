"""Each Wan variant, sharded on 4-rank meshes, equals ComfyUI's native WanModel forward on the same file.

Wan 2.1 T2V / I2V / FLF2V, and Wan 2.2 TI2V-5B (48-channel latent; ComfyUI detects it as WAN22_T2V and,
when the first latent frame is a clean image, passes one timestep per latent frame, shape (B, frames),
which its WanModel stretches over the tokens). Wan 2.2 A14B experts are Wan 2.1 14B files: "tiny" covers
their architecture; tests/families/test_wan22_workflows.py runs two of them through the queue.
"""
import pytest
import torch

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import WAN_PRESETS, write_tiny_wan

pytestmark = pytest.mark.multirank
PRESETS = ("tiny", "tiny-i2v", "tiny-flf2v", "tiny-ti2v")
# 32 tokens, and 45 (ragged on 2 and 4 sequence ranks)
SHAPES = ((2, 8, 8), (3, 6, 10))
T_ROWS = (900.0, 500.0)  # distinct per row, so a row mix-up cannot hide


def _ti2v_timesteps(frames: int, n: int | None = None) -> torch.Tensor:
    """WAN22.process_timestep with Wan22ImageToVideoLatent's mask: frame 0 clean (t = 0), the rest t."""
    n = frames if n is None else n
    t = torch.tensor(T_ROWS)[:, None].expand(2, n).clone()
    t[:, 0] = 0.0
    return t


# case id -> (thw, timestep); TI2V-5B: per-frame timesteps (even, ragged, padded spatial size), a
# count that does not divide the tokens (ComfyUI's repeat_e cuts the tail), and plain (B,) timesteps
CASES = {
    "tiny-ti2v": {
        "perframe_32tok": ((2, 8, 8), _ti2v_timesteps(2)),
        "perframe_45tok": ((3, 6, 10), _ti2v_timesteps(3)),
        "perframe_pad_7x9": ((2, 7, 9), _ti2v_timesteps(2)),
        "two_steps_over_3frames": ((3, 6, 10), _ti2v_timesteps(3, n=2)),
        "scalar_45tok": ((3, 6, 10), torch.tensor(T_ROWS)),
    },
}
for _p in PRESETS:
    CASES.setdefault(_p, {f"{thw}": (thw, torch.tensor(T_ROWS)) for thw in SHAPES})


def _inputs(preset, case, seed=0):
    thw, t = CASES[preset][case]
    g = torch.Generator().manual_seed(seed)
    in_ch = WAN_PRESETS[preset]["in_dim"]
    x = torch.randn(2, in_ch, *thw, generator=g)
    ctx = torch.randn(2, 12, 4096, generator=g)
    clip = None
    if WAN_PRESETS[preset].get("i2v"):
        clip = torch.randn(2, 514 if "flf2v" in preset else 257, 1280, generator=g)
    return x, t, ctx, clip


def _run_mesh(mesh, paths):
    out = {}
    for preset, path in paths.items():
        m = ShardedModel(mesh, path, "fp32")
        for case in CASES[preset]:
            x, t, ctx, clip = _inputs(preset, case)
            y = m.forward_rows(x, t, ctx, **({} if clip is None else {"clip_fea": clip}))
            out[(preset, case)] = (m.rows(2), y)
        del m
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_families")
    return {p: write_tiny_wan(str(d / f"{p}.safetensors"), seed=4, preset=p) for p in PRESETS}


@pytest.fixture(scope="module")
def native_outputs(checkpoints):
    comfy_host.import_comfy()
    import comfy.sd
    ref = {}
    for preset, path in checkpoints.items():
        patcher = comfy.sd.load_diffusion_model(path)
        if preset == "tiny-ti2v":  # ComfyUI must see the 5B layout as Wan 2.2 (48-channel latent, WAN22)
            assert type(patcher.model.model_config).__name__ == "WAN22_T2V"
            assert patcher.model.latent_format.latent_channels == 48
        dm = patcher.model.diffusion_model
        for case in CASES[preset]:
            x, t, ctx, clip = _inputs(preset, case)
            with torch.no_grad():
                ref[(preset, case)] = dm(x, t, ctx, clip_fea=clip).float()
    return ref


def test_ti2v_timesteps_are_what_comfyui_passes(checkpoints):
    """The per-frame timesteps above are the ones ComfyUI's WAN22 model computes from the noise mask
    Wan22ImageToVideoLatent makes (start image = first latent frame)."""
    comfy_host.import_comfy()
    import comfy.sd
    base = comfy.sd.load_diffusion_model(checkpoints["tiny-ti2v"]).model
    frames = 3
    mask = torch.ones(2, 1, frames, 6, 10)
    mask[:, :, :1] = 0.0
    x = torch.zeros(2, 48, frames, 6, 10)
    got = base.process_timestep(torch.tensor(T_ROWS), x=x, denoise_mask=mask)
    assert torch.equal(got, _ti2v_timesteps(frames))


# two 4-rank meshes that between them use every axis (the full matrix runs against diffusers in
# tests/parallel_backend/models/test_wan.py)
@pytest.mark.parametrize("degrees", [dict(cfg=2, ulysses=2), dict(ring=2, tp=2)], ids=["cfg2xulysses2", "ring2xtp2"])
def test_sharded_forward_equals_comfyui_native(checkpoints, native_outputs, degrees):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **degrees)
    per_rank = run_on_ranks(_run_mesh, config, checkpoints)
    worst = {}
    for key, ref in native_outputs.items():
        got = torch.empty_like(ref)
        for result in per_rank:
            rows, y = result[key]
            if y is not None:
                got[rows] = y
        diff = (got - ref).abs().max().item()
        worst[key[0]] = max(worst.get(key[0], 0.0), diff)
        assert diff <= 1e-4, f"{key} on {config.describe()}: max abs diff {diff:.2e}"
    print(f"{config.describe()}: worst max abs diff vs ComfyUI native over {len(native_outputs)} cases: "
          + ", ".join(f"{p} {d:.2e}" for p, d in worst.items()))


# ---- in-context references (ComfyUI 0.33+: WanModel's `context_latents`, a list of latents appended as tokens) --------
def _context_latents(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 1, 6, 10, generator=g), torch.randn(2, 16, 2, 4, 6, generator=g)]


def _run_context(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    x, t, ctx, _ = _inputs("tiny", "(3, 6, 10)")
    return m.rows(2), m.forward_rows(x, t, ctx, context_latents=_context_latents())


@pytest.mark.parametrize("mesh", ["ulysses2", "ring2"])
def test_context_latents_equal_comfyui_native(tmp_path, mesh):
    """The reference latents are embedded and appended after the video's tokens, split with them (ragged: 45 + 15 +
    12 tokens) and cut off after the head: the forward equals ComfyUI's native WanModel with the same references."""
    import inspect

    comfy_host.import_comfy()
    import comfy.ldm.wan.model as wan_model
    import comfy.sd

    if "context_latents" not in inspect.getsource(wan_model.WanModel.forward_orig):
        pytest.skip("this ComfyUI's WanModel takes no context_latents (0.3.75)")
    path = write_tiny_wan(str(tmp_path / "tiny.safetensors"), seed=4)
    dm = comfy.sd.load_diffusion_model(path).model.diffusion_model
    x, t, ctx, _ = _inputs("tiny", "(3, 6, 10)")
    with torch.no_grad():
        ref = dm(x, t, ctx, context_latents=_context_latents()).float()
        moved = (ref - dm(x, t, ctx).float()).abs().max().item()
    degrees = {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2)}[mesh]
    got = torch.full_like(ref, float("nan"))
    for rows, y in run_on_ranks(_run_context, ParallelConfig(world_size=2, device="cpu", dtype="fp32", **degrees),
                                path):
        got[rows] = y
    diff = (got - ref).abs().max().item()
    print(f"context_latents on {mesh} vs native: {diff:.2e} (they move the output by {moved:.3f})")
    assert moved > 1e-2 and diff <= 1e-4
