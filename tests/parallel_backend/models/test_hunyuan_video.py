"""parallel_backend.models.hunyuan_video: detection, ComfyUI's config and class, the released key layout against the
host's own renaming, the model shape and block bytes auto mode reads, and the joint (text) keys of the split.

The forward itself is checked against ComfyUI's native model in tests/families/test_hunyuan_video_native_parity.py."""
import pytest
import torch

import comfy_host
from parallel_backend.models import FAMILIES, detect_family, hunyuan_video
from parallel_backend.parallel.plan import SequenceState
from parallel_backend.planner import block_weight_bytes, model_bytes
from parallel_backend.testing.synthetic import (
    HUNYUAN_PRESETS,
    MINIMAX_PRESETS,
    WAN_PRESETS,
    hunyuan_released_name,
    hunyuan_video_shapes,
    minimax_shapes,
    wan_shapes,
)
from parallel_backend.weights.reads import held_bytes


def _header(preset, dtype="BF16"):
    return {hunyuan_released_name(k): (tuple(v), dtype)
            for k, v in hunyuan_video_shapes(**HUNYUAN_PRESETS[preset]).items()}


def test_detected_as_hunyuan_video_and_nothing_else():
    assert detect_family(_header("hunyuan-video-1.5")) is hunyuan_video
    assert detect_family({"model.diffusion_model." + k: v for k, v in _header("tiny").items()}) is hunyuan_video
    for other in (wan_shapes(**{k: v for k, v in WAN_PRESETS["tiny"].items() if k != "metadata"}),
                  minimax_shapes(**MINIMAX_PRESETS["tiny"])):
        assert not hunyuan_video.detect(other)
    assert hunyuan_video.FAMILY in FAMILIES


def test_shape_and_block_bytes_for_auto_mode():
    """Heads, head dim and block bytes of the real 1.5 release (54 double blocks of 2048, 16 heads of 128)."""
    shape = hunyuan_video.model_shape(_header("hunyuan-video-1.5"))
    assert (shape.num_heads, shape.head_dim, shape.num_layers, shape.ffn_dim) == (16, 128, 54, 8192)
    h = 2048
    block = 2 * 2 * (6 * h * h + 6 * h + 3 * h * h + 3 * h + 2 * 128 + h * h + h + 8 * h * h + 5 * h)
    mb = model_bytes(_header("hunyuan-video-1.5"), hunyuan_video, "bf16")
    assert mb.blocks == (block,) * 54
    assert sum(mb.blocks) + mb.rest == sum(held_bytes(s, d, "bf16") for s, d in _header("hunyuan-video-1.5").values())
    assert block_weight_bytes(_header("hunyuan-video-1.5"), hunyuan_video, "bf16") == 54 * block
    v10 = hunyuan_video.model_shape(_header("hunyuan-video-1.0"))  # 1.0: 20 double + 40 single blocks of 3072
    assert (v10.num_heads, v10.num_layers, v10.patch_size) == (24, 60, (1, 2, 2))


@pytest.mark.parametrize("preset", list(HUNYUAN_PRESETS))
def test_released_layout_is_comfyui_hunyuanvideo(preset):
    """ComfyUI's own detection gives the config and class this file names, and its own renaming of the released keys
    gives exactly the state dict of the HunyuanVideo class it builds (on meta; `.scale` norms on 0.3.75)."""
    comfy_host.import_comfy()
    import comfy.model_detection

    name, unet_config = hunyuan_video.comfy_model_config(_header(preset))
    sd = {k: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(detected).__name__ == name
    assert {k: v for k, v in detected.unet_config.items() if k in unet_config} == \
        {k: v for k, v in unet_config.items() if k in detected.unet_config}
    model = detected.get_model(sd, "", device=torch.device("meta")).diffusion_model
    assert type(model).__name__ == "HunyuanVideo"
    names = hunyuan_video.file_keys(detected, _header(preset), "")
    assert set(names) == set(model.state_dict()) and set(names.values()) == set(_header(preset))


def test_joint_text_keys_count_once():
    """Image tokens 0..9 split over 4 ranks (3 each, padded) with 2 text tokens before them: in Ulysses' gathered
    order each chunk is [text | 3 image tokens]; the text counts in chunk 0 only, masked text nowhere, padding not."""
    class Groups:
        degree, ulysses_size, ring_size = 4, 4, 1

    s = SequenceState(Groups(), 1)
    s.begin_forward()
    assert s.split(torch.zeros(1, 10, 4), 1).shape[1] == 3
    s.record_joint(torch.zeros(1, 2, 4), 1, "before")
    keep = s.key_valid(0, 4).view(4, 5)
    assert keep[0].tolist() == [True] * 5 and keep[1].tolist() == [False, False, True, True, True]
    assert keep[3].tolist() == [False, False, True, False, False]  # image token 9, then padding
    mask = torch.zeros(1, 1, 12)
    mask[..., 1] = torch.finfo(torch.float32).min
    assert s.joint_key_mask(mask)(0, 1).tolist() == [True, False, True, True, True]
    assert s.joint_key_mask(torch.ones(1, 1, 12)) is None  # an additive bias it cannot fold: refused by the caller
    table = torch.arange(12).view(1, 1, 12)  # a rope table over [text | image]: text whole, this rank's image rows
    assert s.split_per_token(table, 2).flatten().tolist() == [0, 1, 5, 6, 7]
