"""parallel_backend.models.kandinsky5: detection, ComfyUI's config, the model shape and block bytes auto mode reads, the
synthetic layout against ComfyUI's own Kandinsky5 class, and the plan's reach (which modules it splits and cuts).

The forward itself is checked against ComfyUI's native model in tests/families/test_kandinsky5_native_parity.py."""
import pytest
import torch

import comfy_host
from parallel_backend.models import FAMILIES, detect_family, kandinsky5
from parallel_backend.planner import block_weight_bytes, model_bytes
from parallel_backend.testing.synthetic import (
    KANDINSKY5_PRESETS,
    MINIMAX_PRESETS,
    WAN_PRESETS,
    kandinsky5_shapes,
    minimax_shapes,
    wan_shapes,
)
from parallel_backend.weights.reads import held_bytes


def _header(preset, dtype="BF16"):
    return {k: (tuple(v), dtype) for k, v in kandinsky5_shapes(**KANDINSKY5_PRESETS[preset]).items()}


def _has_kandinsky5() -> bool:
    comfy_host.import_comfy()
    import comfy.supported_models
    return hasattr(comfy.supported_models, "Kandinsky5")


def test_detected_as_kandinsky5_and_nothing_else():
    assert detect_family(_header("kandinsky5-lite-video")) is kandinsky5
    assert detect_family({"model.diffusion_model." + k: v for k, v in _header("tiny").items()}) is kandinsky5
    for other in (wan_shapes(**{k: v for k, v in WAN_PRESETS["tiny"].items() if k != "metadata"}),
                  minimax_shapes(**MINIMAX_PRESETS["tiny"])):
        assert not kandinsky5.detect(other)
    assert kandinsky5.FAMILY in FAMILIES


@pytest.mark.parametrize("preset, name, heads, head_dim, blocks", [
    ("kandinsky5-lite-video", "Kandinsky5", 28, 64, 32), ("kandinsky5-pro-video", "Kandinsky5", 32, 128, 60),
    ("kandinsky5-lite-image", "Kandinsky5Image", 20, 128, 50)])
def test_shape_class_and_block_bytes_for_auto_mode(preset, name, heads, head_dim, blocks):
    """Heads, head dim, ComfyUI's class and each visual block's bytes (what pipeline stages cut); sharded weights
    split the text blocks as well."""
    header = _header(preset)
    shape = kandinsky5.model_shape(header)
    assert (shape.num_heads, shape.head_dim, shape.num_layers) == (heads, head_dim, blocks)
    assert kandinsky5.comfy_model_config(header)[0] == name
    c = KANDINSKY5_PRESETS[preset]
    d, t, ff = c["model_dim"], c["time_dim"], c["ff_dim"]
    attention = 4 * d * d + 4 * d + 2 * head_dim
    visual = 2 * (9 * d * t + 9 * d + 2 * attention + 2 * d * ff)
    text = 2 * (6 * d * t + 6 * d + attention + 2 * d * ff)
    mb = model_bytes(header, kandinsky5, "bf16")
    assert mb.blocks == (visual,) * blocks
    assert sum(mb.blocks) + mb.rest == sum(held_bytes(s, dt, "bf16") for s, dt in header.values())
    assert block_weight_bytes(header, kandinsky5, "bf16") == blocks * visual + c["text_blocks"] * text


@pytest.mark.parametrize("preset", list(KANDINSKY5_PRESETS))
def test_synthetic_layout_is_comfyui_kandinsky5(preset):
    """The shape table names exactly Kandinsky5's tensors with their shapes (built on meta, every size), and the
    config equals ComfyUI's own detection of those shapes."""
    if not _has_kandinsky5():
        pytest.skip("this ComfyUI has no Kandinsky 5 class (its files are refused by class name)")
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.kandinsky5.model import Kandinsky5

    name, unet_config = kandinsky5.comfy_model_config(_header(preset))
    sd = {k: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}
    assert comfy.model_detection.detect_unet_config(sd, "") == unet_config
    assert type(comfy.model_detection.model_config_from_unet(sd, "")).__name__ == name
    model = Kandinsky5(**unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == kandinsky5_shapes(**KANDINSKY5_PRESETS[preset])


def test_plan_reaches_every_block_and_no_norm():
    """On a 12-block model: every visual block's rope is cut and its self-attention (only) runs sequence-parallel,
    every attention, feed-forward and modulation linear is TP-split (the modulations by their input features), and
    no q / k norm is."""
    if not _has_kandinsky5():
        pytest.skip("this ComfyUI has no Kandinsky 5 class")
    import fnmatch

    import comfy.ops
    from comfy.ldm.kandinsky5.model import Kandinsky5

    cfg = kandinsky5.comfy_model_config(_header("tiny"))[1]
    model = Kandinsky5(**{**cfg, "num_visual_blocks": 12}, device="meta", operations=comfy.ops.disable_weight_init)
    names = [n for n, _ in model.named_modules()]
    plan = kandinsky5.PLAN
    hit = lambda patterns: {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}  # noqa: E731
    assert hit(plan.seq_split_kwargs) == {f"visual_transformer_blocks.{i}" for i in range(12)}
    assert hit(plan.sequence_attention) == {f"visual_transformer_blocks.{i}.self_attention" for i in range(12)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "_transformer_blocks." in n}
    assert hit(plan.tp) == linears and len(linears) == 12 * 11 + 7
    assert {plan.tp[p] for p in plan.tp if "modulation" in p} == {"host_rowwise_sliced_input"}
    assert all(hasattr(model.get_submodule(n), "num_heads") for n in hit(plan.attention_heads))
