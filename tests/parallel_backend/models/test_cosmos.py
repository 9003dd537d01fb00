"""parallel_backend.models.cosmos: detection, config, the host model and the synthetic Predict2 files, checked against
ComfyUI's MiniTrainDIT (key names and shapes) and ComfyUI's / diffusers' own detection of real-size files.

The forward itself is checked against ComfyUI's native model in tests/families/test_cosmos_native_parity.py.
"""
import pytest
import torch

import comfy_host
from parallel_backend.config import ConfigError, validate_latent
from parallel_backend.models import FAMILIES, UnsupportedModelError, cosmos, detect_family, wan
from parallel_backend.testing.synthetic import (
    COSMOS_PRESETS,
    WAN_PRESETS,
    cosmos_predict2_shapes,
    cosmos_rope_ranges,
    wan_shapes,
    write_tiny_cosmos,
)
from parallel_backend.weights.reads import read_header

REAL = [p for p in COSMOS_PRESETS if p.startswith("cosmos-predict2")]


def _header(preset, prefix="net."):
    """A header (key -> (shape, dtype)) of a file written by write_tiny_cosmos, without writing it."""
    p = COSMOS_PRESETS[preset]
    h = {prefix + k: (tuple(v), "BF16") for k, v in cosmos_predict2_shapes(**p).items()}
    for k, t in cosmos_rope_ranges(p["model_channels"] // p["num_heads"]).items():
        h[prefix + k] = (tuple(t.shape), "F32")
    return h


def _comfy_minitraindit(unet_config):
    comfy_host.import_comfy()
    import comfy.ops
    from comfy.ldm.cosmos.predict2 import MiniTrainDIT

    cfg = {k: v for k, v in unet_config.items() if k != "image_model"}
    return MiniTrainDIT(**cfg, device="meta", operations=comfy.ops.disable_weight_init)


@pytest.mark.parametrize("preset", list(COSMOS_PRESETS))
def test_synthetic_layout_is_comfyui_minitraindit(preset):
    """The shape table names exactly MiniTrainDIT's tensors with their shapes (built on meta, every size)."""
    name, unet_config = cosmos.comfy_model_config(_header(preset))
    expected = {k: tuple(v.shape) for k, v in _comfy_minitraindit(unet_config).state_dict().items()}
    assert cosmos_predict2_shapes(**COSMOS_PRESETS[preset]) == expected
    assert name == ("CosmosI2VPredict2" if preset.endswith("v2w") else "CosmosT2IPredict2")


@pytest.mark.parametrize("preset", REAL)
def test_real_sizes_configured_as_comfyui_detects_them(preset):
    """For the 2B / 14B widths ComfyUI's own detection knows every field: the pack's config equals it."""
    comfy_host.import_comfy()
    import comfy.model_detection

    sd = {k[4:]: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}
    theirs = comfy.model_detection.detect_unet_config(sd, "")
    _, ours = cosmos.comfy_model_config(_header(preset))
    defaults = dict(mlp_ratio=4.0, extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=1.0,
                    rope_w_extrapolation_ratio=1.0, rope_t_extrapolation_ratio=1.0)  # MiniTrainDIT's defaults
    assert {**defaults, **theirs} == ours
    p = COSMOS_PRESETS[preset]
    shape = cosmos.model_shape(_header(preset))
    assert (shape.num_heads, shape.head_dim, shape.num_layers, shape.in_channels) == (
        p["num_heads"], 128, p["num_blocks"], p["in_channels"])


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2w", "cosmos-predict2-2b-t2i", "cosmos-predict2-14b-v2w"])
def test_diffusers_detects_the_files_as_predict2(preset):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    ckpt = {k: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}
    kind = infer_diffusers_model_type(ckpt)
    assert kind.startswith("cosmos-2.0-" + ("v2w" if preset.endswith("v2w") else "t2i")), kind


def test_family_detection_and_refusal():
    assert detect_family(_header("tiny")) is cosmos
    assert detect_family(_header("tiny", prefix="model.diffusion_model.")) is cosmos  # a ComfyUI-saved file
    assert detect_family({k: (v, "F32") for k, v in wan_shapes(**WAN_PRESETS["tiny"]).items()}) is wan
    assert not wan.detect(_header("tiny"))
    # a later release on the same blocks with parts this port does not run (Predict2.5's text projection)
    assert not cosmos.detect({**_header("tiny"), "net.crossattn_proj.0.weight": ((1024, 100352), "BF16")})
    with pytest.raises(UnsupportedModelError, match=r"vae\.safetensors.*supported: wan, cosmos_predict2, cosmos1, "):
        detect_family({"decoder.conv_in.weight": ((4, 4, 3, 3), "F32")}, "vae.safetensors")
    assert {"wan", "cosmos_predict2", "cosmos1", "ltxv", "kandinsky5"} <= set(FAMILIES)  # (the others test their own detection)


def test_host_model_parameters_are_the_file_keys(tmp_path):
    """The ranks' model is ComfyUI's MiniTrainDIT with the file's depth and heads: every parameter is a key of the
    file with its shape (no key map); every TP / sequence pattern of the plan names modules of it."""
    import fnmatch

    from parallel_backend.models.host import import_host

    import_host("cpu")
    path = write_tiny_cosmos(str(tmp_path / "c.safetensors"), preset="tiny-v2w")
    header = read_header(path)
    model, _, prefix = cosmos.build(header, torch.float32, path)
    assert type(model).__name__ == "MiniTrainDIT" and prefix == "net."
    params = dict(model.named_parameters())
    assert {prefix + n for n in params} <= set(header)
    assert all(tuple(header[prefix + n][0]) == tuple(p.shape) for n, p in params.items())
    assert len(model.blocks) == COSMOS_PRESETS["tiny-v2w"]["num_blocks"]
    names = [n for n, _ in model.named_modules()]
    plan = cosmos.PLAN
    for pattern in [*plan.tp, *plan.attention_heads, *plan.seq_split_inputs, *plan.seq_split_kwargs,
                    *plan.seq_gather_outputs, *plan.sequence_attention]:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in names), pattern
    # q/k norms are per head (head_dim,), so tensor parallelism leaves them whole
    assert params["blocks.0.self_attn.q_norm.weight"].shape == (model.blocks[0].self_attn.head_dim,)
    assert not any("norm" in k for k in plan.tp)


def test_image_latent_accepted_for_image_models():
    """ComfyUI gives a 4-D empty image latent (EmptySD3LatentImage) a frame axis before sampling: the
    Parallel Sampler's check takes it when its channels are the model's latent channels."""
    shape = cosmos.model_shape(_header("tiny"))
    validate_latent(shape, (1, 16, 128, 128))
    validate_latent(shape, (1, 16, 1, 128, 128))
    with pytest.raises(ConfigError, match="4-D image latent with 16 channels"):
        validate_latent(shape, (1, 4, 128, 128))
    v2w = cosmos.model_shape(_header("tiny-v2w"))
    assert (v2w.in_channels, v2w.out_channels) == (17, 16)
    validate_latent(v2w, (1, 16, 3, 8, 8))
