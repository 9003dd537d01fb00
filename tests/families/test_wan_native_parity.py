"""Each Wan variant, sharded on 4-rank meshes, equals ComfyUI's native WanModel forward on the same file."""
import pytest
import torch

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runner import ShardedModel
from parallel_backend.spmd import run_on_ranks
from parallel_backend.synthetic import write_tiny_wan

pytestmark = pytest.mark.multirank
PRESETS = ("tiny", "tiny-i2v", "tiny-flf2v")
SHAPES = ((2, 8, 8), (3, 6, 10))  # 32 tokens, and 45 (ragged on 2 and 4 sequence ranks)


def _inputs(preset, thw, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_ch = 36 if preset != "tiny" else 16
    x = torch.randn(2, in_ch, *thw, generator=g)
    t = torch.tensor([900.0, 900.0])
    ctx = torch.randn(2, 12, 4096, generator=g)
    clip = None if preset == "tiny" else torch.randn(2, 514 if "flf2v" in preset else 257, 1280, generator=g)
    return x, t, ctx, clip


def _run_mesh(mesh, paths):
    out = {}
    for preset, path in paths.items():
        m = ShardedModel(mesh, path, "fp32")
        for thw in SHAPES:
            x, t, ctx, clip = _inputs(preset, thw)
            y = m.forward_rows(x, t, ctx, **({} if clip is None else {"clip_fea": clip}))
            out[(preset, thw)] = (m.rows(2), y)
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
        dm = comfy.sd.load_diffusion_model(path).model.diffusion_model
        for thw in SHAPES:
            x, t, ctx, clip = _inputs(preset, thw)
            with torch.no_grad():
                ref[(preset, thw)] = dm(x, t, ctx, clip_fea=clip).float()
    return ref


# two 4-rank meshes that between them use every axis (the full matrix runs against diffusers in
# tests/parallel_backend/models/test_wan.py)
@pytest.mark.parametrize("degrees", [dict(cfg=2, ulysses=2), dict(ring=2, tp=2)], ids=["cfg2xulysses2", "ring2xtp2"])
def test_sharded_forward_equals_comfyui_native(checkpoints, native_outputs, degrees):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **degrees)
    per_rank = run_on_ranks(_run_mesh, config, checkpoints)
    worst = 0.0
    for key, ref in native_outputs.items():
        got = torch.empty_like(ref)
        for result in per_rank:
            rows, y = result[key]
            if y is not None:
                got[rows] = y
        diff = (got - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff <= 1e-4, f"{key} on {config.describe()}: max abs diff {diff:.2e}"
    print(f"{config.describe()}: worst max abs diff vs ComfyUI native over {len(native_outputs)} cases {worst:.2e}")
