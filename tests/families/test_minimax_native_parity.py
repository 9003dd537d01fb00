"""MiniMax H3, sharded on cfg2 x ulysses2, ring2 x tp2 and on 3 ranks (ulysses3, ring3), equals ComfyUI 0.33's native
MiniMaxH3Model._forward on the same file, <= 1e-4 max abs in fp32; on a host without the class (0.3.75) the file is
refused by class name before any rank starts.

The oracle is ComfyUI's own loader (comfy.sd.load_diffusion_model detects a tiny H3 file fully). The class runs one
row per call (ComfyUI never batches its cond and uncond), so on the cfg2 mesh the two replicas fold into the sequence
split (checked). Packed sequences of 70 and 77 tokens (text | cond rows | audio | video) divide by neither 4 nor 3:
the split pads. The keyframe case has a condition frame (cond rows with noise augmentation), text tags (the text
span modulated in runs) and video / audio denoise masks that vary per token (segment rows per token).
"""
import pytest
import torch
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import write_tiny_minimax

TOL = 1e-4
HAS_MINIMAX = comfy_host.comfyui_version() != "0.3.75"
MESHES_3 = {"ulysses3": dict(ulysses=3), "ring3": dict(ring=3)}


def _case(name):
    """(video, audio, timestep, context, conds) of a case; tokens = text + 2 x audio frames + T x H/2 x W/2."""
    g = torch.Generator().manual_seed(len(name))
    video = torch.randn(1, 24, 3, 6, 10, generator=g)  # 45 video tokens
    audio = torch.randn(1, 32, 2, 7, generator=g)       # 14 audio rows
    text = 11 if name == "t2va_70tok" else 12
    ctx = torch.randn(1, text, 96, generator=g)
    conds = {"minimax_payload": {"seed": 3, "audio_scale": 1.0}}
    if name == "keyframe_77tok":  # one condition frame before the targets (cond rows: 15 more tokens)
        frame = torch.randn(1, 24, 1, 6, 10, generator=g)
        mask = torch.ones(1, 1, 3, 6, 10)
        mask[:, :, 0] = 0.25
        mask[:, :, 1, :2, :4] = 0.5
        amask = torch.ones(1, 1, 2, 7)
        amask[..., :3] = 0.4
        conds = {"minimax_payload": {"seed": 3, "audio_scale": 1.0, "visual_cond_noise_aug": 0.95,
                                     "keyframes": [{"latent": frame, "resolved_frame_index": 4}],
                                     "cond_video_latents": [frame],
                                     "text_token_tags": torch.tensor([1] * 5 + [0] * 4 + [1] * 3)},
                 "denoise_mask": mask, "audio_denoise_mask": amask}
    return video, audio, torch.tensor([700.0]), ctx, conds


CASES = ("t2va_70tok", "keyframe_77tok")


def _run_mesh(mesh, path):
    import comfy.utils

    m = ShardedModel(mesh, path, "fp32")
    out = {}
    for name in CASES:
        video, audio, t, ctx, conds = _case(name)
        x, shapes = comfy.utils.pack_latents([video, audio])
        y = m.forward_rows(x, t, ctx, latent_shapes=shapes, **conds)
        out[("tiny", name)] = (m.rows(1), y, m.last_fold)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_minimax(str(tmp_path_factory.mktemp("minimax") / "minimax_h3_tiny.safetensors"), seed=3)


@pytest.fixture(scope="module")
def native_outputs(checkpoint):
    comfy_host.import_comfy()
    import comfy.sd
    import comfy.utils

    dm = comfy.sd.load_diffusion_model(checkpoint).model.diffusion_model
    ref = {}
    for name in CASES:
        video, audio, t, ctx, conds = _case(name)
        with torch.no_grad():
            out = dm._forward([video, audio], t, ctx, transformer_options={}, **conds)
        ref[("tiny", name)] = comfy.utils.pack_latents(out)[0].float()
    return ref


pytestmark = [pytest.mark.multirank,
              pytest.mark.skipif(not HAS_MINIMAX, reason="this ComfyUI has no MiniMax H3 class (see the refusal test)")]


def test_native_outputs_are_not_trivial(native_outputs):
    a, b = native_outputs[("tiny", "t2va_70tok")], native_outputs[("tiny", "keyframe_77tok")]
    assert a.abs().mean() > 0.1 and (a - b).abs().max() > 1e-2


@pytest.fixture(scope="module")
def world4(checkpoint):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoint, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    assert_rows_match(native_outputs, [r[mesh] for r in world4], config.describe(), TOL)
    folds = {r[mesh][("tiny", "t2va_70tok")][2] for r in world4}
    # one row per call: the cfg replicas join the sequence split (the fold at cfg 1), so no rank idles
    assert folds == ({"none"} if mesh == "ring2xtp2" else {"2xring"}), folds


def _run_meshes_3(mesh0, path):
    from parallel_backend.runtime.mesh import build_mesh

    out = {}
    for name, degrees in MESHES_3.items():
        cfg = ParallelConfig(world_size=3, device="cpu", dtype="fp32", **degrees)
        mesh = mesh0 if cfg == mesh0.config else build_mesh(cfg, mesh0.rank, mesh0.device)
        out[name] = _run_mesh(mesh, path)
    return out


def test_odd_world_size_equals_comfyui_native(native_outputs, checkpoint):
    config = ParallelConfig(world_size=3, device="cpu", dtype="fp32", **MESHES_3["ulysses3"])
    per_rank = run_on_ranks(_run_meshes_3, config, checkpoint, timeout=600)
    for mesh in MESHES_3:
        assert_rows_match(native_outputs, [r[mesh] for r in per_rank], mesh, TOL)


def test_sharded_weights_equal_comfyui_native(native_outputs, checkpoint):
    """Sharded weights (each DiT block's weights split over the ranks, gathered as it runs) on ulysses2."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", ulysses=2, shard_weights=True)
    assert_rows_match(native_outputs, run_on_ranks(_run_mesh, config, checkpoint, timeout=600), config.describe(), TOL)


def test_pipeline_stages_equal_comfyui_native(native_outputs, checkpoint):
    """Two pipeline stages (one DiT block each; the text refiner, the packing and the final layer on both; the
    packed sequence passed stage to stage) equal native."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", pp=2)
    per_rank = run_on_ranks(_run_mesh, config, checkpoint, timeout=600)
    assert_rows_match(native_outputs, per_rank, config.describe(), TOL)


# ---- a LoRA (ComfyUI's key layout) and an fp8_scaled file on tp2: each layer's rows split after the merge / scale ----
LORA_STRENGTH = 0.8
# fused q/k/v (split by thirds) and SwiGLU fc1 (by halves), row-split out_proj / fc2, the text refiner's block too
LORA_MODULES = ("blocks.0.attn.qkv_proj", "blocks.1.attn.out_proj", "blocks.0.mlp.fc1", "blocks.1.mlp.fc2",
                "token_refiner.blocks.0.attn.qkv_proj")


@pytest.fixture(scope="module")
def variants(checkpoint, tmp_path_factory):
    from parallel_backend.testing.synthetic import write_fp8_variant, write_module_lora

    from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit

    d = tmp_path_factory.mktemp("minimax_variants")
    gguf = str(d / "minimax_h3-Q8_0.gguf")  # city96's layout under the architecture name MiniMax H3 files carry
    write_gguf_dit(checkpoint, gguf, "Q8_0", architecture="minimax_h3")
    return {"lora": write_module_lora(str(d / "minimax_h3_lora.safetensors"), checkpoint, LORA_MODULES),
            "fp8_scaled": write_fp8_variant(checkpoint, str(d / "minimax_h3_fp8_scaled.safetensors")),
            "gguf": gguf,
            "gguf_dequantized": write_dequantized_safetensors(gguf, str(d / "minimax_h3_deq.safetensors"))}


def _native_variant(path, lora=None):
    """ComfyUI's loader of the file (LoraLoader's merge for the LoRA) on the cases."""
    comfy_host.import_comfy()
    import comfy.sd
    import comfy.utils

    patcher = comfy.sd.load_diffusion_model(path)
    if lora:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(lora), LORA_STRENGTH, 0)
    out = {}
    with torch.no_grad():
        patcher.patch_model()
        try:
            for name in CASES:
                video, audio, t, ctx, conds = _case(name)
                y = patcher.model.diffusion_model._forward([video, audio], t, ctx, transformer_options={}, **conds)
                out[("tiny", name)] = comfy.utils.pack_latents(y)[0].float()
        finally:
            patcher.unpatch_model()
    return out


def _run_variants(mesh, checkpoint, variants):
    import comfy.utils

    from parallel_backend.weights.lora import lora_key

    lora = ShardedModel(mesh, checkpoint, "fp32")
    lora.set_loras(lora_key([(variants["lora"], LORA_STRENGTH)]))
    fp8 = ShardedModel(mesh, variants["fp8_scaled"], "fp32")
    gguf = ShardedModel(mesh, variants["gguf"], "fp32")
    out = {"lora": {}, "fp8_scaled": {}, "gguf": {}, "gguf_info": gguf.info()}
    for name in CASES:
        video, audio, t, ctx, conds = _case(name)
        x, shapes = comfy.utils.pack_latents([video, audio])
        for kind, m in (("lora", lora), ("fp8_scaled", fp8), ("gguf", gguf)):
            out[kind][("tiny", name)] = (m.rows(1), m.forward_rows(x, t, ctx, latent_shapes=shapes, **conds))
    return out


def test_lora_fp8_scaled_and_gguf_on_tp2_equal_comfyui_native(native_outputs, checkpoint, variants):
    """A LoRA merged on the ranks (ComfyUI's own key map and patch code per layer, then the TP split of the fused
    q/k/v and SwiGLU rows) and an fp8_scaled file (ComfyUI's scaled-fp8 layers) on tp2 equal ComfyUI's LoraLoader /
    its loader of the same files; a Q8_0 GGUF (its block linears kept quantized, split on quant-block boundaries)
    equals ComfyUI's loader of its dequantized weights."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", tp=2)
    per_rank = run_on_ranks(_run_variants, config, checkpoint, variants, timeout=600)
    info = per_rank[0]["gguf_info"]
    assert info["gguf_quantized_layers"] >= 8 and not info["gguf_dequantized_at_load"], info
    for kind in ("lora", "fp8_scaled", "gguf"):
        ref = _native_variant(checkpoint, variants["lora"]) if kind == "lora" else _native_variant(
            variants["gguf_dequantized" if kind == "gguf" else kind])
        assert (ref[("tiny", "t2va_70tok")] - native_outputs[("tiny", "t2va_70tok")]).abs().max() > 1e-3, kind
        assert_rows_match(ref, [r[kind] for r in per_rank], f"tp2 {kind}", TOL)
