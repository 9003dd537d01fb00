"""parallel_backend.models.ltxav: the synthetic LTX-2 files against ComfyUI 0.33's own LTXAVModel and its detection
(key names and shapes, the 19B release's sizes on meta); the plans' patterns against the modules they name (each
stream's hooks on its own modules only); the refusals (audio heads that do not split, rows at different timesteps on
a replica split) with what to change.

The forward itself is checked against ComfyUI's native model in tests/families/test_ltxav_native_parity.py.
"""
import fnmatch
import json
import os

import pytest
import torch

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.models import detect_family, ltxav, ltxv
from parallel_backend.testing.synthetic import LTXAV_PRESETS, ltxav_metadata, ltxav_shapes, write_tiny_ltxav
from parallel_backend.weights.reads import read_header

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(comfy_host.comfyui_path(), "comfy", "ldm", "lightricks", "av_model.py")),
    reason="this ComfyUI has no LTXAVModel (0.3.75: its refusal is test_ltxv.py's)")


@pytest.mark.parametrize("preset", list(LTXAV_PRESETS))
def test_synthetic_layout_is_comfyui_ltxavmodel_as_detected(preset):
    """ComfyUI's detection of the keys (with the file's metadata config) builds an LTXAVModel whose state dict is
    exactly the shape table; the pack's shape has the heads both streams split by."""
    comfy_host.import_comfy()
    import comfy.model_detection

    cfg = LTXAV_PRESETS[preset]
    sd = {k: torch.empty(s, device="meta") for k, s in ltxav_shapes(**cfg).items()}
    meta = {"config": json.dumps({"transformer": ltxav_metadata(**cfg)})}
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
    model = config.get_model(sd, "", device=torch.device("meta")).diffusion_model
    assert type(config).__name__ == "LTXAV" and type(model).__name__ == "LTXAVModel"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ltxav_shapes(**cfg)
    header = {"model.diffusion_model." + k: (s, "BF16") for k, s in ltxav_shapes(**cfg).items()}
    shape = ltxv.model_shape(header)
    assert shape.num_heads == 32 == model.audio_num_attention_heads and shape.dim == cfg["width"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from parallel_backend.models.host import import_host

    import_host("cpu")
    path = write_tiny_ltxav(str(tmp_path_factory.mktemp("ltxav") / "ltx2.safetensors"))
    header = read_header(path)
    return path, header, ltxv.build(header, torch.float32, path)


def test_host_model_parameters_are_the_file_keys_and_each_plan_names_its_streams_modules(tiny):
    path, header, (model, _, prefix) = tiny
    assert detect_family(header) is ltxv and type(model).__name__ == "LTXAVModel"
    assert {prefix + n for n, _ in model.named_parameters()} == set(header)
    names = [n for n, _ in model.named_modules()]

    def named(patterns):
        return {n for p in patterns for n in names if fnmatch.fnmatchcase(n, p)}

    blocks = {f"transformer_blocks.{i}" for i in range(LTXAV_PRESETS["tiny"]["num_layers"])}
    video, audio = ltxv.plan_for(model), ltxav.AUDIO_PLAN
    assert video is ltxav.VIDEO_PLAN
    for plan in (video, audio):
        assert named([*plan.seq_split_inputs, *plan.seq_split_kwargs]) == blocks
    # each self-attention scope and each gathered-key cross-attention on its own stream's modules only
    assert {n.split(".", 2)[2] for n in named(video.sequence_attention)} == {"attn1"}
    assert {n.split(".", 2)[2] for n in named(audio.sequence_attention)} == {"audio_attn1"}
    assert {n.split(".", 2)[2] for n in named(video.key_gather_attention)} == {"video_to_audio_attn"}
    assert {n.split(".", 2)[2] for n in named(audio.key_gather_attention)} == {"audio_to_video_attn"}
    assert all(named([p]) for p in video.tp if "gate_logits" not in p and ".[0-9][0-9]." not in p)
    assert len(named(video.attention_heads)) == 6 * len(blocks)


def test_the_2_3_layouts_gates_are_split_with_their_heads(tiny, tmp_path):
    """LTX-2.3's gated attention: every TP entry of the plan (the per-head gates too) names modules of the 2.3
    layout's model, each gate column-split like its attention's q / k / v (one row a head)."""
    path = write_tiny_ltxav(str(tmp_path / "ltx2_3.safetensors"), preset="tiny_2_3")
    model, _, _ = ltxv.build(read_header(path), torch.float32, path)
    names = [n for n, _ in model.named_modules()]
    plan = ltxv.plan_for(model)
    for pattern, style in plan.tp.items():
        named = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        assert named or ".[0-9][0-9]." in pattern, pattern
        if pattern.endswith("to_gate_logits"):
            assert style == plan.tp[pattern.replace("to_gate_logits", "to_q")] == "host_colwise"
            assert all(model.get_submodule(n).out_features == model.get_submodule(n.rpartition(".")[0]).heads
                       for n in named)


@pytest.mark.parametrize("stream, attr", [("audio", "audio_num_attention_heads"), ("video", "num_attention_heads")])
def test_heads_that_do_not_split_are_refused_with_what_to_change(tiny, stream, attr):
    """A file whose metadata gives a stream heads that ulysses x tp does not divide (here 6; LTX-2.5's video has
    24, where the pack's shape assumes 32) is refused on the built model."""
    path, _, (model, _, _) = tiny
    ltxv.check_mesh(model, ParallelConfig(world_size=4, device="cpu", ulysses=2, tp=2), path)
    setattr(model, attr, 6)
    try:
        with pytest.raises(ValueError, match=rf"{stream} stream has 6 attention heads.*ulysses x tp = 2 x 2.*among"):
            ltxv.check_mesh(model, ParallelConfig(world_size=4, device="cpu", ulysses=2, tp=2), path)
    finally:
        setattr(model, attr, 32)


def test_rows_at_different_timesteps_are_refused_on_a_replica_split():
    """Cond and uncond at one sigma split over replicas; rows whose largest timestep differs (the cross-attention
    gates read the batch's) are refused, whichever replica asks."""
    same, differ = torch.tensor([0.7, 0.7]), torch.tensor([0.8, 0.3])
    ltxv.check_rows("LTXAVModel", same, {"a_timestep": same}, slice(1, 2))
    ltxv.check_rows("LTXVModel", differ, {}, slice(1, 2))  # video-only rows are independent
    for rows in (slice(0, 1), slice(1, 2)):
        with pytest.raises(ValueError, match="set cfg and dp to 1"):
            ltxv.check_rows("LTXAVModel", same, {"a_timestep": differ}, rows)
