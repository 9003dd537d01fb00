"""MiniMax H3 (joint audio + video DiT) on the host's own model class: ComfyUI 0.33's
`comfy.ldm.minimax.model.MiniMaxH3Model` (supported_models.MiniMaxH3), built in each rank on the meta device; this
file is its parallel plan as data. ComfyUI 0.3.75 has no such class: its files are refused there by class name
(`variant_of`). MiniMaxMusic3 (comfy.ldm.minimax_music, an audio-only DiT of another layout) is not this family.

The checkpoint is ComfyUI's layout (`blocks.N.attn.qkv_proj.weight`, ...): its keys are the module paths.

How the tokens flow: one flat packed sequence (S, D), no batch axis (the class runs one row per call; ComfyUI never
batches its cond and uncond, whose payloads differ): [text | condition rows | audio | video]. Every token goes
through the same blocks (single stream: the text has no weights of its own), modulated per contiguous segment
(`mod_segments`: (start, stop, modulation row), the row per token where a denoise mask varies it), with a per-token
rotation table for the 3-axis rope. So the plan splits the whole packed sequence evenly over the sequence ranks at
the first block (text included: splitting it is exact and each rank computes its share once, where xDiT's "whole
text on every rank" serves dual-stream models whose text has its own weights), cuts each block's segment table and
rope table to the rank's tokens, and gathers the sequence back before the final layer, which slices the video and
audio out of it by position. The attention is the module-level `optimized_attention`, called with the heads as
(1, H, S, D) (skip_reshape).

TP: the fused q / k / v projection is column-split by thirds (each rank its heads of q, of k, of v) and the fused
SwiGLU input by halves (its part of the gate and of the up projection); out_proj and fc2 are row-split; the per-head
q / k RMSNorms act on head_dim and stay whole. The adaLN projections, the patch embeddings, the text refiner and the
final layer stay whole.

Patch points: the class applies only the `dit` / `double_block` block replacement (with the tokens, segment table,
rope table and t_emb in its dict); it is not described here, so the ranks refuse it where the tokens are split
(parallel/patch_points.py). The `minimax_h3_sigma_shift_*` transformer_options cross and are read by the host code.
"""
from __future__ import annotations

import torch

from ..config import ModelShape
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit

FAMILY = "minimax_h3"
# GGUF files: "minimax_h3", or "wan", which MiniMax H3 GGUFs are labelled so that ComfyUI-GGUF accepts them
GGUF_ARCHITECTURES = ("minimax_h3", "wan")
BLOCKS = "blocks"
SHARD_UNITS = (BLOCKS,)
PATCH = (1, 2, 2)  # every H3 release; ComfyUI's detection fixes it (latents_dim = video_out rows // 4)
# the planner's block bytes: `blocks.N.` of the DiT, not the text refiner's own `token_refiner.blocks.N.`
BLOCK_PATTERN = r"(^|(?<!token_refiner)\.)blocks\.([0-9]+)\."
CLASSES = ("MiniMaxH3Model",)
PIPELINE_CLASSES = CLASSES  # a plain loop over `blocks` (the text refiner, embeddings and head on every stage)

PLAN = ParallelPlan(
    tp={"blocks.*.attn.qkv_proj": "host_colwise_qkv", "blocks.*.attn.out_proj": "host_rowwise",
        "blocks.*.mlp.fc1": "host_colwise_kv", "blocks.*.mlp.fc2": "host_rowwise",
        # each block's AdaLN (time_dim -> 18 x hidden: 260 M of a block's 646 M weights in the release) split by its
        # input features, its few rows (one a timestep) all-reduced: whole on every rank it held 40 % of a block
        "blocks.*.adaln_proj.linear": "host_rowwise_sliced_input"},
    attention_heads=("blocks.*.attn",), heads_attr="heads",
    # block(x, t_emb, mod_segments, rope_freqs): the packed tokens split at the first block that runs; its segment
    # table and its rope table (1, S, 1, rot / 2, 2, 2) cut to this rank's tokens at every block
    seq_split_inputs={"blocks.*": {0: SeqSplit(0, first_only=True), 2: SeqSplit(0, segments=True),
                                   3: SeqSplit(1, per_token=True)}},
    # the final layer slices the target video / audio out of the whole packed sequence
    seq_gather_inputs={"final_layer": {0: SeqGather(0)}},
    sequence_attention=("blocks.*.attn",),
)
PATCH_POINTS: dict = {}  # the host applies no attn / mlp patches in this class (only the block replacement above)


def keep_text_states(text_states):
    """The proxy's `preprocess_text_embeds`: the host BaseModel refines the text once per sampling run through its
    diffusion model; here the ranks refine it in every call instead (MiniMaxH3Model._forward does when the context
    is not yet hidden-wide): the same ops on the same values, the text refiner's cost once per step."""
    return text_states


# what ComfyUI's MiniMaxH3 BaseModel and MiniMaxH3Model.forward read off the diffusion model in the ComfyUI process
# (the class's defaults: ComfyUI's detection sets no other shift)
PROXY_ATTRIBUTES = {"sigma_shift_video": 12.0, "sigma_shift_audio": 3.0, "patch_size": PATCH,
                    "preprocess_text_embeds": keep_text_states}


def crossing_inputs(named: dict) -> dict:
    """The call's inputs as they cross: the payload without the host's prebuilt PackedLayout (an object of the
    ComfyUI process; the rank's _forward builds the same layout from the same shapes, keyframes and refs)."""
    payload = named.get("minimax_payload")
    if isinstance(payload, dict) and "layout" in payload:
        named = {**named, "minimax_payload": {k: v for k, v in payload.items() if k != "layout"}}
    return named


def detect(shapes: dict) -> bool:
    keys = {k.removeprefix("model.diffusion_model.") for k in shapes}
    return {"video_patch_proj.weight", "audio_patch_proj.weight", "blocks.0.attn.qkv_proj.weight",
            "final_layer.video_out.weight"} <= keys


def _shapes(shapes: dict) -> dict:
    """key -> shape, the ComfyUI prefix stripped (a header's values are (shape, dtype))."""
    out = {}
    for k, v in shapes.items():
        shape = v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (tuple, list)) else v
        out[k.removeprefix("model.diffusion_model.")] = tuple(shape)
    return out


def _count(keys, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)), default=-1)


def comfy_model_config(shapes: dict) -> tuple[str, dict]:
    """(ComfyUI supported_models class name, unet_config): ComfyUI 0.33's own MiniMax H3 detection, read from the
    shapes (comfy/model_detection.py), so the ComfyUI process and the ranks build the same class."""
    s = _shapes(shapes)
    head_dim = s["blocks.0.attn.q_norm.weight"][0]
    c = dict(image_model="minimax_h3", num_layers=_count(s, "blocks."),
             token_refiner_num_layers=_count(s, "token_refiner.blocks."),
             hidden_size=s["video_patch_proj.weight"][0], latents_dim=s["final_layer.video_out.weight"][0] // 4,
             audio_latents_dim=s["final_layer.audio_out.weight"][0], attention_head_dim=head_dim,
             num_attention_heads=s["blocks.0.attn.qkv_proj.weight"][0] // (3 * head_dim),
             ffn_hidden_size=s["blocks.0.mlp.fc1.weight"][0] // 2, text_dim=s["condition_proj.weight"][1],
             rope_inv_freq_len=s["rope.inv_freq"][0])
    if "adaln_t_table" in s:  # curve-form checkpoints: a precomputed time-embedding curve, no time embedder
        c.update(adaln_curve_grid=s["adaln_t_table"][0], time_embed_dim=s["adaln_t_table"][1])
    else:
        c.update(timestep_input_dim=s["time_embedder.proj_in.weight"][1],
                 time_embed_hidden_size=s["time_embedder.proj_in.weight"][0],
                 time_embed_dim=s["time_embedder.proj_out.weight"][0])
    return "MiniMaxH3", c


def model_shape(shapes: dict) -> ModelShape:
    c = comfy_model_config(shapes)[1]
    return ModelShape(FAMILY, c["num_attention_heads"], c["attention_head_dim"], c["ffn_hidden_size"],
                      c["num_layers"], c["latents_dim"], c["latents_dim"], PATCH)


def variant_of(class_name: str | None) -> dict:
    """The class the pack runs; None (a host without it: ComfyUI before MiniMax H3, e.g. 0.3.75) or another class
    is refused by name."""
    if class_name in CLASSES:
        return {}
    from .host import newer_class_refusal
    raise ValueError(newer_class_refusal(class_name, "MiniMax H3", "MiniMaxH3", "comfy.ldm.minimax", "MiniMaxH3Model"))


def host_class_name() -> str | None:
    """The supported_models class this host has for the family, or None (ComfyUI 0.3.75 has no MiniMax H3)."""
    from .host import supported_model_if_any
    return supported_model_if_any("MiniMaxH3")


def diffusers_names(source_keys) -> dict:
    """diffusers names of PEFT LoRAs: diffusers has no MiniMax H3 class, so only the file's own names match."""
    return {}


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>", storage: str | None = None):
    """ComfyUI's MiniMaxH3Model for this file, on meta; refused by class name on a host without it."""
    import sys

    from .host import build_newer_family
    return build_newer_family(sys.modules[__name__], header, compute_dtype, path, storage)


def conds_of(class_name: str) -> tuple:
    """The keyword inputs the ranks take: the H3 payload (seed, audio scale, keyframe / reference latents, text
    tags; the host's prebuilt layout is dropped by the proxy and rebuilt in the rank), the per-row denoise masks,
    and the stream shapes of the packed latent (the proxy packs the [video, audio] pair into one tensor)."""
    variant_of(class_name)
    return ("minimax_payload", "denoise_mask", "audio_denoise_mask", "latent_shapes")


def install_attention(model, seq_state, backend: str) -> None:
    """The blocks' self-attention inside the plan's scope runs Ulysses / Ring: MiniMaxH3Model's Attention calls the
    module-level `optimized_attention` of comfy.ldm.minimax.model, wrapped once per rank process."""
    import comfy.ldm.minimax.model as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)


def forward(model, x, timestep, context, latent_shapes=None, transformer_options=None, **conds):
    """ComfyUI's MiniMaxH3Model._forward on the [video, audio] pair packed in `x` (as comfy.utils packs it), its
    output packed alike. The DIFFUSION_MODEL wrappers and the audio-scale carry ran in the ComfyUI process."""
    import comfy.utils

    if not latent_shapes or len(latent_shapes) < 2:
        raise ValueError("MiniMax H3 samples a video and an audio latent together: use its own latent nodes "
                         "(EmptyMiniMaxH3Latent / the MiniMax H3 conditioning nodes), which give both streams")
    streams = comfy.utils.unpack_latents(x, latent_shapes)
    out = model._forward(streams, timestep, context, transformer_options=transformer_options or {}, **conds)
    return comfy.utils.pack_latents(out)[0]
