"""Kandinsky 5, sharded on cfg2 x ulysses2, ring2 x tp2, on 3 ranks (ulysses3, ring3), on 2 pipeline stages and with
sharded weights, equals ComfyUI 0.33's native Kandinsky5._forward on the same file (loaded by ComfyUI's own loader),
<= 1e-4 max abs in fp32, and so do a LoRA (ComfyUI's key layout) and an fp8_scaled copy on tp2; on a host without the
class (0.3.75) the file is refused by class name before any rank starts.

The I2V case (2 rows, a 2 x 10 x 10 latent with its start frame written in by `time_dim_replace`) has 5 x 5 = 25
tokens a frame, which divide by neither 2, 3 nor 4: the split pads every frame's plane. The image-shaped case (1 row,
a 4-D 9 x 11 latent, which the host pads to the patch) has 30 tokens; one row, so the cfg replicas fold into the
sequence split. A `dit` / `double_block` replacement that looks across the tokens (SkipLayerGuidanceDiT's patch point)
sees the whole sequence on every mesh but the pipeline one, which refuses it.
"""
import pytest
import torch
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import write_tiny_kandinsky5

TOL = 1e-4
HAS_KANDINSKY5 = comfy_host.comfyui_version() != "0.3.75"
MESHES_3 = {"ulysses3": dict(ulysses=3), "ring3": dict(ring=3)}
CASES = ("i2v_2rows", "image_1row")


def _case(name):
    """(x, timestep, context, conds): the latent with its 17 conditioning channels (16 image + 1 mask) as the
    host's concat_cond gives them, the Qwen text (3584 wide) and the pooled CLIP vector `y`."""
    g = torch.Generator().manual_seed(len(name))
    if name == "image_1row":
        x = torch.randn(1, 33, 9, 11, generator=g)
        return x, torch.tensor([450.0]), torch.randn(1, 5, 3584, generator=g), {"y": torch.randn(1, 768, generator=g)}
    x = torch.randn(2, 33, 2, 10, 10, generator=g)
    conds = {"y": torch.randn(2, 768, generator=g), "time_dim_replace": torch.randn(2, 16, 1, 10, 10, generator=g)}
    return x, torch.tensor([700.0, 300.0]), torch.randn(2, 7, 3584, generator=g), conds


def _mix_tokens(args, extra):
    """A `dit` / `double_block` replacement that looks across the tokens (each token plus half the mean of all of
    them, in place of the block, as SkipLayerGuidanceDiT skips it): on a share of the tokens it would compute
    something else. (It cannot call `original_block`: ComfyUI 0.33's raises a TypeError natively.)"""
    x = args["x"]
    return {"x": x + 0.5 * x.mean(dim=1, keepdim=True)}


REPLACED = {"patches_replace": {"dit": {("double_block", 1): _mix_tokens}}}
BLOCK_REPLACE_CASE = ("tiny", "i2v_block_replace")


def _run_mesh(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    out = {}
    for name in CASES:
        x, t, ctx, conds = _case(name)
        out[("tiny", name)] = (m.rows(x.shape[0]), m.forward_rows(x, t, ctx, **conds), m.last_fold)
    if mesh.config.pp == 1:  # (pipeline stages refuse block replacements by name)
        x, t, ctx, conds = _case("i2v_2rows")
        out[BLOCK_REPLACE_CASE] = (m.rows(2), m.forward_rows(x, t, ctx, transformer_options=REPLACED, **conds), "")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_kandinsky5(str(tmp_path_factory.mktemp("kandinsky5") / "kandinsky5_tiny.safetensors"), seed=5)


@pytest.fixture(scope="module")
def native_outputs(checkpoint):
    comfy_host.import_comfy()
    import comfy.sd

    dm = comfy.sd.load_diffusion_model(checkpoint).model.diffusion_model
    ref = {}
    for name in CASES:
        x, t, ctx, conds = _case(name)
        with torch.no_grad():
            ref[("tiny", name)] = dm._forward(x, t, ctx, transformer_options={}, **conds).float()
    x, t, ctx, conds = _case("i2v_2rows")
    with torch.no_grad():
        ref[BLOCK_REPLACE_CASE] = dm._forward(x, t, ctx, transformer_options=dict(REPLACED), **conds).float()
    return ref


def test_refused_by_class_name_where_the_host_lacks_it(tmp_path):
    """Accepted on a ComfyUI with the Kandinsky5 class (0.33); refused before any rank starts on one without it
    (0.3.75), the refusal naming the missing class and what to change."""
    comfy_host.import_comfy()
    from parallel_backend.weights.reads import read_header

    path = write_tiny_kandinsky5(str(tmp_path / "kandinsky5.safetensors"))
    host_model = comfy_host.import_pack().nodes.host_model
    if HAS_KANDINSKY5:
        host_model.refuse_unsupported_class("kandinsky5", path, read_header(path))
        assert host_model.host_model_config("kandinsky5", path, "fp32", read_header(path))[2].__name__ == "Kandinsky5"
        return
    with pytest.raises(ValueError, match=r"kandinsky5.safetensors: this ComfyUI has no Kandinsky5 model class .*"
                                         r"update ComfyUI"):
        host_model.refuse_unsupported_class("kandinsky5", path, read_header(path))


needs_class = pytest.mark.skipif(not HAS_KANDINSKY5, reason="this ComfyUI has no Kandinsky 5 class (see the refusal)")


@needs_class
def test_native_outputs_are_not_trivial(native_outputs, checkpoint):
    comfy_host.import_comfy()
    import comfy.sd

    a = native_outputs[("tiny", "i2v_2rows")]
    assert (native_outputs[BLOCK_REPLACE_CASE] - a).abs().max() > 1e-2  # the block replacement changes the output
    dm = comfy.sd.load_diffusion_model(checkpoint).model.diffusion_model
    x, t, ctx, conds = _case("i2v_2rows")
    with torch.no_grad():
        plain = dm._forward(x, t, ctx, conds["y"], transformer_options={})
    assert a.abs().mean() > 0.1 and (a - plain).abs().max() > 1e-2  # the start frame changes the output


@pytest.fixture(scope="module")
def world4(checkpoint):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoint, MESHES_4, timeout=600)


@needs_class
@pytest.mark.multirank
@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    assert_rows_match(native_outputs, [r[mesh] for r in world4], config.describe(), TOL)
    if mesh == "cfg2xulysses2":  # one row: the cfg replicas fold into the sequence split
        assert {r[mesh][("tiny", "image_1row")][2] for r in world4} != {"none"}


def _run_meshes_3(mesh0, path):
    from parallel_backend.runtime.mesh import build_mesh

    out = {}
    for name, degrees in MESHES_3.items():
        cfg = ParallelConfig(world_size=3, device="cpu", dtype="fp32", **degrees)
        mesh = mesh0 if cfg == mesh0.config else build_mesh(cfg, mesh0.rank, mesh0.device)
        out[name] = _run_mesh(mesh, path)
    return out


@needs_class
@pytest.mark.multirank
def test_odd_world_size_equals_comfyui_native(native_outputs, checkpoint):
    config = ParallelConfig(world_size=3, device="cpu", dtype="fp32", **MESHES_3["ulysses3"])
    per_rank = run_on_ranks(_run_meshes_3, config, checkpoint, timeout=600)
    for mesh in MESHES_3:
        assert_rows_match(native_outputs, [r[mesh] for r in per_rank], mesh, TOL)


@needs_class
@pytest.mark.multirank
@pytest.mark.parametrize("degrees", [dict(pp=2), dict(ulysses=2, shard_weights=True)], ids=["pp2", "ulysses2_sharded"])
def test_pipeline_and_sharded_weights_equal_comfyui_native(native_outputs, checkpoint, degrees):
    """Two pipeline stages (one visual block each; the text blocks and the out layer on both), and sharded weights
    (each text and visual block's weights split over the ranks, gathered per block) on ulysses2."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", **degrees)
    per_rank = run_on_ranks(_run_mesh, config, checkpoint, timeout=600)
    expected = {k: v for k, v in native_outputs.items() if k in per_rank[0]}
    assert_rows_match(expected, per_rank, config.describe(), TOL)


# ---- a LoRA (ComfyUI's key layout) and an fp8_scaled file on tp2: each layer's rows split after the merge / scale ----
LORA_STRENGTH = 0.8
LORA_MODULES = ("text_transformer_blocks.0.self_attention.to_key", "visual_transformer_blocks.0.self_attention.to_query",
                "visual_transformer_blocks.1.cross_attention.to_value", "visual_transformer_blocks.1.self_attention.out_layer",
                "visual_transformer_blocks.0.feed_forward.in_layer", "visual_transformer_blocks.1.feed_forward.out_layer")


@pytest.fixture(scope="module")
def variants(checkpoint, tmp_path_factory):
    from parallel_backend.testing.synthetic import write_fp8_variant, write_module_lora

    d = tmp_path_factory.mktemp("kandinsky5_variants")
    return {"lora": write_module_lora(str(d / "kandinsky5_lora.safetensors"), checkpoint, LORA_MODULES),
            "fp8_scaled": write_fp8_variant(checkpoint, str(d / "kandinsky5_fp8_scaled.safetensors"))}


def _native(path, lora=None):
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
                x, t, ctx, conds = _case(name)
                out[("tiny", name)] = patcher.model.diffusion_model._forward(x, t, ctx, transformer_options={},
                                                                            **conds).float()
        finally:
            patcher.unpatch_model()
    return out


def _run_variants(mesh, checkpoint, variants):
    from parallel_backend.weights.lora import lora_key

    lora = ShardedModel(mesh, checkpoint, "fp32")
    lora.set_loras(lora_key([(variants["lora"], LORA_STRENGTH)]))
    out = {"lora": {}, "fp8_scaled": {}}
    fp8 = ShardedModel(mesh, variants["fp8_scaled"], "fp32")
    for name in CASES:
        x, t, ctx, conds = _case(name)
        for kind, m in (("lora", lora), ("fp8_scaled", fp8)):
            out[kind][("tiny", name)] = (m.rows(x.shape[0]), m.forward_rows(x, t, ctx, **conds), m.last_fold)
    return out


@needs_class
@pytest.mark.multirank
def test_lora_and_fp8_scaled_on_tp2_equal_comfyui_native(native_outputs, checkpoint, variants):
    """A LoRA merged on the ranks (ComfyUI's own key map and patch code per layer, then the TP split) and an
    fp8_scaled file (ComfyUI's scaled-fp8 layers) on tp2 equal ComfyUI's LoraLoader / its loader of the same files."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", tp=2)
    per_rank = run_on_ranks(_run_variants, config, checkpoint, variants, timeout=600)
    lora_ref = _native(checkpoint, variants["lora"])
    assert (lora_ref[("tiny", "i2v_2rows")] - native_outputs[("tiny", "i2v_2rows")]).abs().max() > 1e-3
    assert_rows_match(lora_ref, [r["lora"] for r in per_rank], "tp2 + LoRA", TOL)
    fp8_ref = _native(variants["fp8_scaled"])
    assert (fp8_ref[("tiny", "i2v_2rows")] - native_outputs[("tiny", "i2v_2rows")]).abs().max() > 1e-3  # held in fp8
    assert_rows_match(fp8_ref, [r["fp8_scaled"] for r in per_rank], "tp2 fp8_scaled", TOL)
