"""Kandinsky 5 (video Lite / Pro, image Lite) on the host's own model class: ComfyUI 0.33's
`comfy.ldm.kandinsky5.model.Kandinsky5` (supported_models Kandinsky5, Kandinsky5Image), built in each rank on the meta
device; this file is its parallel plan as data. ComfyUI 0.3.75 has no such class: its files are refused there by
class name (`variant_of`).

The checkpoint is ComfyUI's layout (`visual_transformer_blocks.N.self_attention.to_query.weight`, ...): its keys are
the module paths, so no key map exists.

How the tokens flow: the text is embedded and refined by the text encoder blocks (`text_transformer_blocks`: self
attention over the text, modulated per row), whole on every rank (it is short and its blocks are few). The latent is
patch-embedded into a grid (B, T, H, W, D) (`visual_embeddings`), flattened frame-major, run through the visual
decoder blocks (self-attention over the visual tokens with a 3-axis rope, cross-attention to the text, modulation
per row: one timestep per sample), reshaped back to the grid and handed to the out layer, which modulates per row
and unpatchifies. So the plan splits the grid where it is made, each frame's H x W plane over the sequence ranks
(`SeqSplit(grid=True)`: the host's flatten and reshape then work on (B, T, 1, n) unchanged), cuts the rope table
(one entry per token, frame-major) to each rank's tokens at every visual block, runs the visual self-attention
sequence-parallel, and gathers the grid back before the out layer. The host's attention is full (no NABLA / block
sparsity in this class): the split is exact. The image model (a 4-D latent, T = 1) takes the same plan.

TP: q / k / v projections of every attention (text self-attention, visual self- and cross-attention) column-split
by heads, their out projections and the feed-forwards Megatron-style; the per-head q / k RMSNorms act on head_dim and
stay whole, as do the modulations, the embeddings and the out layer.

Patch points: the class applies only the `dit` / `double_block` block replacement (SkipLayerGuidanceDiT, ...): it
sees the whole visual sequence (`BLOCK_REPLACE`, parallel/patch_points.py). `rope_options` (the RoPE scaling nodes) is read where the whole rope table is made, before the cut.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelShape
from ..parallel.patch_points import BlockReplace, Tokens
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit
from ..weights.checkpoint import strip_prefix

FAMILY = "kandinsky5"
BLOCKS = "visual_transformer_blocks"  # what torch.compile compiles and pipeline stages cut
# sharded weights split the text blocks too (Pro: 4 of ~0.45 GB in bf16); auto mode's per-block bytes (pipeline
# stages) count the visual blocks only, as the stages cut them (the text blocks run on every stage)
SHARD_UNITS = ("text_transformer_blocks", BLOCKS)
CLASSES = ("Kandinsky5",)  # the diffusion model class of both supported_models Kandinsky5 and Kandinsky5Image
PIPELINE_CLASSES = CLASSES  # a plain loop over visual_transformer_blocks
PATCH = (1, 2, 2)  # every release; ComfyUI's detection keeps the class default
# ComfyUI's detection reads neither the text widths nor the output channels: the class defaults hold for every file
TEXT_DIM, POOLED_DIM, OUT_CHANNELS = 3584, 768, 16

_VISUAL = ("visual_transformer_blocks.[0-9]", "visual_transformer_blocks.[0-9][0-9]")
_TEXT = ("text_transformer_blocks.[0-9]",)
_ATTN = tuple(f"{b}.self_attention" for b in _VISUAL + _TEXT) + tuple(f"{b}.cross_attention" for b in _VISUAL)


def _tp() -> dict:
    tp = {}
    for attn in _ATTN:
        tp.update({f"{attn}.to_{p}": "host_colwise" for p in ("query", "key", "value")})
        tp[f"{attn}.out_layer"] = "host_rowwise"
    for block in _VISUAL + _TEXT:
        tp.update({f"{block}.feed_forward.in_layer": "host_colwise", f"{block}.feed_forward.out_layer": "host_rowwise"})
    # the modulations (time_dim -> 9 / 6 x model_dim) split by their input features, their rows all-reduced
    tp.update({f"{block}.visual_modulation.out_layer": "host_rowwise_sliced_input" for block in _VISUAL})
    tp.update({f"{block}.text_modulation.out_layer": "host_rowwise_sliced_input" for block in _TEXT})
    return tp


PLAN = ParallelPlan(
    tp=_tp(),
    attention_heads=_ATTN, heads_attr="num_heads",
    # visual_embeddings -> (B, T, H, W, D): every frame's plane split; each visual block's rope table (1, T*H*W, 1,
    # head_dim / 2, 2, 2), passed as `freqs=`, cut to this rank's tokens; the grid gathered before the out layer
    seq_split_outputs={"visual_embeddings": {0: SeqSplit(1, grid=True)}},
    seq_split_kwargs={b: {"freqs": SeqSplit(1, per_token=True)} for b in _VISUAL},
    seq_gather_inputs={"out_layer": {0: SeqGather(1, grid=True)}},
    sequence_attention=tuple(f"{b}.self_attention" for b in _VISUAL),
)
PATCH_POINTS: dict = {}  # the host applies no attn / mlp patches in this class (only the block replacement below)
# `dit` / `double_block` (SkipLayerGuidanceDiT, ...): the replacement gets {"x": the visual tokens (B, L, D), flat and
# frame-major, "context", "time_embed", "freqs" (the whole rope table), ...} and returns {"x"}. (ComfyUI 0.33's
# `original_block` for it calls the block with keywords its forward does not take: a replacement that calls it fails
# natively, and here alike.)
BLOCK_REPLACE = {("dit", "double_block"): BlockReplace(args={"x": Tokens(1)}, returns={"x": Tokens(1)})}


# ---- the file: detection, ComfyUI's config and names --------------------------------------------------------------
def _shapes(shapes: dict) -> dict:
    """module path -> shape (ComfyUI's prefix stripped; a header's values are (shape, dtype))."""
    out = {}
    for k, v in shapes.items():
        shape = v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (tuple, list)) else v
        out[strip_prefix(k)] = tuple(shape)
    return out


def detect(shapes: dict) -> bool:
    keys = {strip_prefix(k) for k in shapes}
    return {"visual_transformer_blocks.0.cross_attention.key_norm.weight", "visual_embeddings.in_layer.weight",
            "text_transformer_blocks.0.text_modulation.out_layer.weight"} <= keys


def _count(keys, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)), default=-1)


def comfy_model_config(shapes: dict) -> tuple[str, dict]:
    """(ComfyUI supported_models class name, unet_config) as ComfyUI 0.33's own Kandinsky 5 detection reads the
    shapes (comfy/model_detection.py; Kandinsky5Image where the width is 2560 and the patch input 64, as its
    unet_config matches)."""
    s = _shapes(shapes)
    width = s["visual_embeddings.in_layer.bias"][0]
    c = dict(model_dim=width, time_dim=s["time_embeddings.in_layer.bias"][0], image_model="kandinsky5",
             ff_dim=s["visual_transformer_blocks.0.feed_forward.in_layer.weight"][0],
             visual_embed_dim=s["visual_embeddings.in_layer.weight"][1],
             num_text_blocks=_count(s, "text_transformer_blocks."),
             num_visual_blocks=_count(s, "visual_transformer_blocks."))
    if width in (4096, 2560):  # Pro video, Lite image
        c["axes_dims"] = (32, 48, 48)
        if width == 2560:
            c["rope_scale_factor"] = (1.0, 1.0, 1.0)
    elif width == 1792:  # Lite video
        c["axes_dims"] = (16, 24, 24)
    image = width == 2560 and c["visual_embed_dim"] == 64
    return ("Kandinsky5Image" if image else "Kandinsky5"), c


def head_dim_of(config: dict) -> int:
    return sum(config.get("axes_dims", (16, 24, 24)))  # the class: head_dim = sum(axes_dims)


def model_shape(shapes: dict) -> ModelShape:
    c = comfy_model_config(shapes)[1]
    head_dim = head_dim_of(c)
    return ModelShape(FAMILY, c["model_dim"] // head_dim, head_dim, c["ff_dim"], c["num_visual_blocks"],
                      c["visual_embed_dim"] // math.prod(PATCH), OUT_CHANNELS, PATCH)


def variant_of(class_name: str | None) -> dict:
    """The class the pack runs; None (a host without it: ComfyUI before Kandinsky 5, e.g. 0.3.75) or another class
    is refused by name."""
    if class_name in CLASSES:
        return {}
    from .host import newer_class_refusal
    raise ValueError(newer_class_refusal(class_name, "Kandinsky 5", "Kandinsky5", "comfy.ldm.kandinsky5",
                                         "Kandinsky5 class"))


def host_class_name() -> str | None:
    """The supported_models class this host has for the family, or None (ComfyUI 0.3.75 has no Kandinsky 5)."""
    from .host import supported_model_if_any
    return supported_model_if_any("Kandinsky5")


def diffusers_names(source_keys) -> dict:
    """diffusers names of PEFT LoRAs: not mapped for this family (only ComfyUI's own LoRA names match)."""
    return {}


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>", storage: str | None = None):
    """ComfyUI's Kandinsky5 for this file, on meta; refused by class name on a host without it."""
    import sys

    from .host import build_newer_family
    return build_newer_family(sys.modules[__name__], header, compute_dtype, path, storage)


def conds_of(class_name: str) -> tuple:
    """The keyword inputs (ComfyUI conds) the ranks take: the pooled CLIP vector `y`, the I2V start latent
    `time_dim_replace` (written over the first frames before the patch embedding: whole on every rank) and the
    text mask, which the class takes and ignores as native does."""
    variant_of(class_name)
    return ("y", "time_dim_replace", "attention_mask")


def install_attention(model, seq_state, backend: str) -> None:
    """The visual self-attention inside the plan's scope runs Ulysses / Ring: Kandinsky5's attention calls the
    module-level `optimized_attention` of comfy.ldm.kandinsky5.model, wrapped once per rank process (the text and
    cross-attention run outside the scope: plain local attention)."""
    import comfy.ldm.kandinsky5.model as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)


def forward(model, x, timestep, context, y=None, transformer_options=None, **conds):
    """ComfyUI's Kandinsky5._forward (its DIFFUSION_MODEL wrappers already ran in the ComfyUI process)."""
    return model._forward(x, timestep, context, y, transformer_options=transformer_options or {}, **conds)
