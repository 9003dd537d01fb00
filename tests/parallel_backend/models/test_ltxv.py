"""parallel_backend.models.ltxv: detection, shape, the host model and the synthetic LTX-Video files, checked against
ComfyUI's own LTXVModel and its detection (key names and shapes, real sizes on meta); the plan's patterns against
the modules they name; the refusal of a class the family does not run, by name.

The forward itself is checked against ComfyUI's native model in tests/families/test_ltxv_native_parity.py.
"""
import fnmatch

import pytest
import torch

import comfy_host
from parallel_backend.models import FAMILIES, detect_family, ltxv, wan
from parallel_backend.testing.synthetic import LTXV_PRESETS, ltxv_shapes, write_tiny_ltxv
from parallel_backend.weights.reads import read_header


def _header(preset, prefix="model.diffusion_model."):
    return {prefix + k: (tuple(v), "BF16") for k, v in ltxv_shapes(**LTXV_PRESETS[preset]).items()}


@pytest.mark.parametrize("preset", list(LTXV_PRESETS))
def test_synthetic_layout_is_comfyui_ltxvmodel_as_detected(preset):
    """ComfyUI's own detection of the header's keys builds an LTXVModel (on meta, every size) whose state dict is
    exactly the shape table; the pack's shape says the heads / head dim / depth ComfyUI built."""
    comfy_host.import_comfy()
    import comfy.model_detection

    sd = {k[len("model.diffusion_model."):]: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config).__name__ == "LTXV"
    model = config.get_model(sd, "", device=torch.device("meta")).diffusion_model
    assert type(model).__name__ == "LTXVModel"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ltxv_shapes(**LTXV_PRESETS[preset])
    shape = ltxv.model_shape(_header(preset))
    block = model.transformer_blocks[0].attn1
    assert (shape.num_heads, shape.head_dim, shape.num_layers) == (block.heads, block.dim_head, len(
        model.transformer_blocks))
    assert shape.in_channels == shape.out_channels == LTXV_PRESETS[preset]["in_channels"]


def test_family_detection():
    assert detect_family(_header("tiny")) is ltxv
    assert detect_family(_header("tiny", prefix="")) is ltxv  # a bare diffusion-model file
    assert not wan.detect(_header("tiny")) and "ltxv" in FAMILIES


def test_host_model_parameters_are_the_file_keys_and_the_plan_names_its_modules(tmp_path):
    """The ranks' model is ComfyUI's LTXVModel: every parameter a key of the file with its shape (no key map);
    every pattern of the plan (of this host's version) names modules of it; the split hooks sit on the blocks only
    (a pattern that also matched their children would cut attn1's rope a second time)."""
    from parallel_backend.models.host import import_host

    import_host("cpu")
    path = write_tiny_ltxv(str(tmp_path / "l.safetensors"))
    header = read_header(path)
    model, _, prefix = ltxv.build(header, torch.float32, path)
    params = dict(model.named_parameters())
    assert prefix == "model.diffusion_model." and {prefix + n for n in params} == set(header)
    assert all(tuple(header[prefix + n][0]) == tuple(p.shape) for n, p in params.items())
    names = [n for n, _ in model.named_modules()]
    plan = ltxv.plan_for(model)
    for pattern in [*plan.tp, *plan.attention_heads, *plan.seq_gather_outputs, *plan.sequence_attention]:
        if "to_gate_logits" in pattern:  # gated attention: LTX 2.x files only
            continue
        assert any(fnmatch.fnmatchcase(n, pattern) for n in names), pattern
    split = {n for p in [*plan.seq_split_inputs, *plan.seq_split_kwargs] for n in names if fnmatch.fnmatchcase(n, p)}
    assert split == {f"transformer_blocks.{i}" for i in range(LTXV_PRESETS["tiny"]["num_layers"])}
    # the host's rope layout picks the plan: 0.33 passes (rotation, split mode), 0.3.75 one tensor (tokens at dim 2)
    import comfy.ldm.lightricks.model as host
    pe = plan.seq_split_kwargs["transformer_blocks.[0-9]"]["pe"]
    assert (pe.item, pe.dim) == ((0, 1) if hasattr(host, "LTXBaseModel") else (None, 2))


def test_a_class_the_family_does_not_run_is_refused_by_name():
    with pytest.raises(ValueError, match=r"detects this file as MochiModel, which the parallel loader cannot run yet"):
        ltxv.conds_of("MochiModel")
    assert "keyframe_idxs" in ltxv.conds_of("LTXVModel") and "a_timestep" in ltxv.conds_of("LTXAVModel")


def test_diffusers_names_map_to_the_file_keys():
    names = ltxv.diffusers_names(list(_header("tiny")))
    assert names["proj_in.weight"] == "model.diffusion_model.patchify_proj.weight"
    assert names["transformer_blocks.0.attn1.norm_q.weight"] == "model.diffusion_model.transformer_blocks.0.attn1.q_norm.weight"


@pytest.mark.parametrize("preset", ["tiny", "tiny_2_3"])
def test_an_ltx2_audio_video_file_builds_ltxavmodel_or_is_refused_by_class_name(preset):
    """An LTX-2 file of the 2.0 or 2.3 layout (ComfyUI 0.33 detects LTXAVModel by its audio AdaLN key): on 0.33 the
    family builds it (its plan: tests/parallel_backend/models/test_ltxav.py); on a ComfyUI without the class (0.3.75,
    which would build a video-only LTXVModel of it) it is refused before any weight is read, with the update to
    make."""
    from parallel_backend.models.host import import_host
    from parallel_backend.testing.synthetic import LTXAV_PRESETS, ltxav_shapes

    import_host("cpu")
    header = {"model.diffusion_model." + k: (s, "BF16") for k, s in ltxav_shapes(**LTXAV_PRESETS[preset]).items()}
    assert ltxv.file_class(header) == "LTXAVModel" and detect_family(header) is ltxv
    if ltxv.host_has_class("LTXAVModel"):
        return
    with pytest.raises(ValueError, match=r"makes it ComfyUI's LTXAVModel .* which this ComfyUI does not have .* update"):
        ltxv.build(header, torch.float32, "ltx-2-19b-dev.safetensors")


def test_an_ltx2_gguf_is_refused_with_the_file_to_load_instead():
    """An LTX-2 GGUF (architecture "ltxv", LTXAVModel's keys) carries no metadata config, from which ComfyUI builds
    LTX-2's connectors and audio stream: refused before any rank starts (the loader calls check_file_class), on
    either host, naming the files that run; an LTX-Video 0.9 GGUF passes (tests/families/test_ltxv_native_parity.py)."""
    from parallel_backend.testing.synthetic import LTXAV_PRESETS, ltxav_shapes
    from parallel_backend.weights.gguf import GGUFHeader

    av = GGUFHeader({k: (s, "Q8_0") for k, s in ltxav_shapes(**LTXAV_PRESETS["tiny"]).items()}, "ltxv")
    with pytest.raises(ValueError, match=r"LTX-2 GGUF, which carries no metadata config .* load the LTX-2 "
                                         r"safetensors or fp8 file"):
        ltxv.check_file_class(av)
    video = GGUFHeader({k: (s, "Q8_0") for k, s in ltxv_shapes(**LTXV_PRESETS["tiny"]).items()}, "ltxv")
    assert detect_family(video) is ltxv and ltxv.check_file_class(video) == "LTXVModel"
