"""parallel_backend.models.minimax: detection, ComfyUI's config, the model shape and block bytes auto mode reads, the
synthetic layout against ComfyUI's own MiniMaxH3Model, and the plan's segment cut.

The forward itself is checked against ComfyUI's native model in tests/families/test_minimax_native_parity.py."""
import pytest
import torch

import comfy_host
from parallel_backend.models import FAMILIES, UnsupportedModelError, detect_family, minimax
from parallel_backend.parallel.plan import SequenceState
from parallel_backend.planner import block_weight_bytes, model_bytes
from parallel_backend.weights.reads import held_bytes
from parallel_backend.testing.synthetic import (
    COSMOS_PRESETS,
    MINIMAX_PRESETS,
    WAN_PRESETS,
    cosmos_predict2_shapes,
    minimax_shapes,
    wan_shapes,
)


def _header(preset, dtype="BF16"):
    return {k: (tuple(v), "F32" if k == "rope.inv_freq" else dtype)
            for k, v in minimax_shapes(**MINIMAX_PRESETS[preset]).items()}


def _has_minimax() -> bool:
    comfy_host.import_comfy()
    import comfy.supported_models
    return hasattr(comfy.supported_models, "MiniMaxH3")


def test_detected_as_minimax_and_nothing_else():
    assert detect_family(_header("minimax-h3")) is minimax
    assert detect_family({"model.diffusion_model." + k: v for k, v in _header("tiny").items()}) is minimax
    for other in (wan_shapes(**{k: v for k, v in WAN_PRESETS["tiny"].items() if k != "metadata"}),
                  cosmos_predict2_shapes(**COSMOS_PRESETS["tiny"])):
        assert not minimax.detect(other)
    assert minimax.FAMILY in FAMILIES
    with pytest.raises(UnsupportedModelError, match="MiniMax H3"):
        detect_family({"foo.weight": ((2, 2), "F32")})


def test_a_gguf_labelled_minimax_h3_or_wan_is_minimax_and_another_label_is_refused():
    """MiniMax H3 GGUFs name their architecture "minimax_h3", or "wan" so that ComfyUI-GGUF loads them: both are
    MiniMax H3 by their keys; any other label is a mislabelled file (the GGUF forward: test_minimax_native_parity)."""
    from parallel_backend.weights.gguf import GGUFHeader

    for label in ("minimax_h3", "wan"):
        assert detect_family(GGUFHeader(_header("tiny", "Q8_0"), label)) is minimax
    with pytest.raises(UnsupportedModelError, match=r"a minimax_h3 DiT but the GGUF says .* 'hyvid'"):
        detect_family(GGUFHeader(_header("tiny", "Q8_0"), "hyvid"), "h3.gguf")


def test_shape_and_block_bytes_for_auto_mode():
    """Heads, head dim and each block's bytes of the real release (the text refiner's blocks are not DiT blocks)."""
    shape = minimax.model_shape(_header("minimax-h3"))
    assert (shape.num_heads, shape.head_dim, shape.num_layers, shape.ffn_dim) == (56, 128, 50, 14336)
    mb = model_bytes(_header("minimax-h3"), minimax, "bf16")
    hidden, inner, ffn, t = 5376, 7168, 14336, 2688
    block = 2 * (2 * hidden + 3 * inner * hidden + 2 * 128 + inner * hidden + 3 * ffn * hidden + 18 * hidden * (t + 1))
    assert mb.blocks == (block,) * 50
    assert sum(mb.blocks) + mb.rest == sum(held_bytes(s, d, "bf16") for s, d in _header("minimax-h3").values())
    assert block_weight_bytes(_header("minimax-h3"), minimax, "bf16") == 50 * block  # what sharded weights split


@pytest.mark.parametrize("preset", list(MINIMAX_PRESETS))
def test_synthetic_layout_is_comfyui_minimaxh3model(preset):
    """The shape table names exactly MiniMaxH3Model's tensors with their shapes (built on meta, every size), and the
    config equals ComfyUI's own detection of those shapes."""
    if not _has_minimax():
        pytest.skip("this ComfyUI has no MiniMax H3 class (its files are refused by class name)")
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.minimax.model import MiniMaxH3Model

    name, unet_config = minimax.comfy_model_config(_header(preset))
    sd = {k: torch.empty(s, device="meta") for k, (s, _) in _header(preset).items()}
    assert name == "MiniMaxH3" and comfy.model_detection.detect_unet_config(sd, "") == unet_config
    model = MiniMaxH3Model(**unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == minimax_shapes(**MINIMAX_PRESETS[preset])


def test_segments_cut_to_each_ranks_tokens():
    """A segment table over 10 tokens split over 4 ranks (3 each, padded): each rank's local table covers exactly
    its real tokens, with per-token rows cut alike."""
    class Groups:
        degree, ulysses_size, ring_size = 4, 4, 1

    per_token = torch.arange(100, 106)
    table = [(0, 2, 7), (2, 4, 1), (4, 10, per_token)]
    covered = []
    for index in range(4):
        state = SequenceState(Groups(), index)
        state.split(torch.zeros(10, 2), 0)
        for a, b, row in state.split_segments(table):
            rows = row.tolist() if torch.is_tensor(row) else [row] * (b - a)
            covered += list(zip(range(index * 3 + a, index * 3 + b), rows))
    assert covered == list(zip(range(10), [7, 7, 1, 1] + list(range(100, 106))))
