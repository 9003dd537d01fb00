"""parallel_backend.models.cosmos1: detection, config, the host model and the synthetic Cosmos 1.0 files, checked
against ComfyUI's GeneralDIT (key names and shapes), ComfyUI's own detection (supported_models class, config of the
7B / 14B widths) and diffusers' detection and key converter.

The forward itself is checked against ComfyUI's native model in tests/families/test_cosmos1_native_parity.py.
"""
import fnmatch

import pytest
import torch

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.models import FAMILIES, cosmos, cosmos1, detect_family, wan
from parallel_backend.testing.synthetic import (
    COSMOS1_PRESETS,
    COSMOS_PRESETS,
    WAN_PRESETS,
    cosmos1_shapes,
    cosmos_predict2_shapes,
    wan_shapes,
    write_tiny_cosmos1,
)
from parallel_backend.weights.reads import read_header

REAL = [p for p in COSMOS1_PRESETS if p.startswith("cosmos-1.0")]


def _header(preset, prefix="net."):
    """A header (key -> (shape, dtype)) of a file written by write_tiny_cosmos1, without writing it."""
    return {prefix + k: (tuple(v), "BF16") for k, v in cosmos1_shapes(**COSMOS1_PRESETS[preset]).items()}


def _meta_sd(preset):
    return {k[4:]: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}


def _comfy_generaldit(unet_config):
    comfy_host.import_comfy()
    import comfy.ops
    from comfy.ldm.cosmos.model import GeneralDIT

    cfg = {k: v for k, v in unet_config.items() if k != "image_model"}
    return GeneralDIT(**cfg, device="meta", operations=comfy.ops.disable_weight_init)


@pytest.mark.parametrize("preset", list(COSMOS1_PRESETS))
def test_synthetic_layout_is_comfyui_generaldit(preset):
    """The shape table names exactly GeneralDIT's tensors with their shapes (built on meta, every size), and
    ComfyUI's own detection picks the supported_models class the pack names."""
    comfy_host.import_comfy()
    import comfy.model_detection

    name, unet_config = cosmos1.comfy_model_config(_header(preset))
    expected = {k: tuple(v.shape) for k, v in _comfy_generaldit(unet_config).state_dict().items()}
    assert cosmos1_shapes(**COSMOS1_PRESETS[preset]) == expected
    assert name == ("CosmosI2V" if preset.endswith("v2w") else "CosmosT2V")
    assert type(comfy.model_detection.model_config_from_unet(_meta_sd(preset), "")).__name__ == name


@pytest.mark.parametrize("preset", REAL)
def test_real_sizes_configured_as_comfyui_detects_them(preset):
    """For the 7B / 14B widths ComfyUI's own detection knows every field: the pack's config equals it."""
    comfy_host.import_comfy()
    import comfy.model_detection

    theirs = comfy.model_detection.detect_unet_config(_meta_sd(preset), "")
    _, ours = cosmos1.comfy_model_config(_header(preset))
    defaults = dict(mlp_ratio=4.0, crossattn_emb_channels=1024)  # GeneralDIT's defaults, which ComfyUI leaves
    assert {**defaults, **theirs} == ours
    p = COSMOS1_PRESETS[preset]
    shape = cosmos1.model_shape(_header(preset))
    assert (shape.num_heads, shape.head_dim, shape.num_layers, shape.in_channels, shape.out_channels) == (
        p["num_heads"], 128, p["num_blocks"], p["in_channels"], 16)


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2w", "cosmos-1.0-7b-t2w", "cosmos-1.0-14b-v2w"])
def test_diffusers_detects_the_files_as_cosmos1(preset):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    ckpt = {k: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}
    kind = infer_diffusers_model_type(ckpt)
    assert kind.startswith("cosmos-1.0-" + ("v2w" if preset.endswith("v2w") else "t2w")), kind


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model."])
def test_diffusers_names_are_diffusers_cosmos1_names(prefix):
    """PEFT LoRA names (diffusers' CosmosTransformer3DModel) map to the file's keys through diffusers' converter."""
    names = cosmos1.diffusers_names(list(_header("tiny", prefix)))
    expected = {"transformer_blocks.0.attn1.to_q.weight": "blocks.block0.blocks.0.block.attn.to_q.0.weight",
                "transformer_blocks.1.attn2.to_out.0.weight": "blocks.block1.blocks.1.block.attn.to_out.0.weight",
                "transformer_blocks.1.ff.net.0.proj.weight": "blocks.block1.blocks.2.block.layer1.weight",
                "transformer_blocks.0.norm1.linear_2.weight": "blocks.block0.blocks.0.adaLN_modulation.2.weight",
                "proj_out.weight": "final_layer.linear.weight"}
    assert {k: names[k] for k in expected} == {k: prefix + v for k, v in expected.items()}
    assert sorted(names.values()) == sorted(_header("tiny", prefix))


def test_family_detection_and_refusal():
    assert detect_family(_header("tiny")) is cosmos1
    assert detect_family(_header("tiny", prefix="model.diffusion_model.")) is cosmos1  # a ComfyUI-saved file
    assert detect_family(_header("cosmos-1.0-14b-v2w")) is cosmos1
    predict2 = {"net." + k: (v, "BF16") for k, v in cosmos_predict2_shapes(**COSMOS_PRESETS["tiny"]).items()}
    assert detect_family(predict2) is cosmos and not cosmos1.detect(predict2)
    assert not cosmos.detect(_header("tiny")) and not wan.detect(_header("tiny"))
    assert not cosmos1.detect({k: (v, "F32") for k, v in wan_shapes(**WAN_PRESETS["tiny"]).items()})
    assert FAMILIES["cosmos1"] is cosmos1


def test_host_model_parameters_are_the_file_keys(tmp_path):
    """The ranks' model is ComfyUI's GeneralDIT with the file's depth and heads: every parameter is a key of the
    file with its shape (no key map); every TP / sequence pattern of the plan names modules of it; the sequence-
    attention scope holds the self-attention sub-blocks only (cross-attention has no mask to tell them apart)."""
    from parallel_backend.models.host import import_host

    import_host("cpu")
    path = write_tiny_cosmos1(str(tmp_path / "c.safetensors"), preset="tiny-v2w")
    header = read_header(path)
    model, model_config, prefix = cosmos1.build(header, torch.float32, path)
    assert type(model).__name__ == "GeneralDIT" and prefix == "net."
    assert type(model_config).__name__ == "CosmosI2V"
    params = dict(model.named_parameters())
    assert {prefix + n for n in params} == set(header)
    assert all(tuple(header[prefix + n][0]) == tuple(p.shape) for n, p in params.items())
    assert len(model.blocks) == COSMOS1_PRESETS["tiny-v2w"]["num_blocks"]
    modules = dict(model.named_modules())
    plan = cosmos1.PLAN
    for pattern in [*plan.tp, *plan.attention_heads, *plan.seq_split_outputs, *plan.grid_shape_inputs,
                    *plan.seq_gather_outputs, *plan.sequence_attention]:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in modules), pattern
    scoped = [m for n, m in modules.items() if any(fnmatch.fnmatchcase(n, p) for p in plan.sequence_attention)]
    assert len(scoped) == len(model.blocks) and all(m.attn.is_selfattn for m in scoped)
    # q/k norms are per head (head_dim,), so tensor parallelism leaves them whole
    assert params["blocks.block0.blocks.0.block.attn.to_q.1.weight"].shape == (128,)
    assert not any("norm" in k or k.endswith(".1") for k in plan.tp)


def test_compile_reaches_every_block(tmp_path):
    """GeneralDIT holds its blocks in a ModuleDict: set_compile compiles (and uncompiles) each block module."""
    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    path = write_tiny_cosmos1(str(tmp_path / "c.safetensors"))
    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    m = ShardedModel(mesh, path, "fp32")
    assert m.family is cosmos1 and m.info()["family"] == "cosmos1"
    m.set_compile({"backend": "eager"})
    assert all(b._compiled_call_impl is not None for b in m.model.blocks.values())
    m.set_compile(None)
    assert all(b._compiled_call_impl is None for b in m.model.blocks.values())


def test_peft_lora_with_diffusers_names_merges_like_a_hand_merge(tmp_path):
    """A LoRA saved with diffusers' Cosmos 1.0 names (PEFT: `transformer.transformer_blocks.0.attn1.to_q.lora_A`)
    reaches the file's own key through `diffusers_names` and merges as W + strength * B @ A (no alpha: scale 1)."""
    from safetensors.torch import save_file

    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    path = write_tiny_cosmos1(str(tmp_path / "c.safetensors"), seed=2)
    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    sm = ShardedModel(mesh, path, "fp32")
    before = {n: p.clone() for n, p in sm.model.named_parameters()}
    targets = {"attn1.to_q": "blocks.block0.blocks.0.block.attn.to_q.0.weight",
               "ff.net.2": "blocks.block1.blocks.2.block.layer2.weight"}
    g = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    for i, (name, key) in enumerate(targets.items()):
        w = before[key]
        a, b = 0.1 * torch.randn(4, w.shape[1], generator=g), 0.1 * torch.randn(w.shape[0], 4, generator=g)
        tensors[f"transformer.transformer_blocks.{i}.{name}.lora_A.weight"] = a
        tensors[f"transformer.transformer_blocks.{i}.{name}.lora_B.weight"] = b
        expected[key] = w + 0.7 * b @ a
    lora = str(tmp_path / "cosmos1_peft.safetensors")
    save_file(tensors, lora)
    sm.set_loras([(lora, 0.7)])
    after = dict(sm.model.named_parameters())
    for key, e in expected.items():
        d = (after[key] - e).abs().max().item()
        assert d <= 1e-6 and (e - before[key]).abs().max() > 1e-3, (key, d)
    assert all(torch.equal(p, before[n]) for n, p in after.items() if n not in expected)
