"""Cosmos 1.0 diffusion DiT (7B / 14B; text-to-world and video-to-world) on the host's own model class:
ComfyUI's `comfy.ldm.cosmos.model.GeneralDIT` (BaseModel CosmosVideo), built in each rank on the meta device; this
file is its parallel plan as data.

The checkpoint is the released / ComfyUI layout (`net.blocks.block0.blocks.0.block.attn.to_q.0.weight`, ...): its
keys are the module paths, so no key map exists. The model is configured by ComfyUI's own detection, except that
the depth and head count are read from the file (ComfyUI fixes them from the width: 4096 -> 28 x 32, any other
-> 36 x 40) so any width loads; the ComfyUI process builds its BaseModel from the same config (`comfy_model_config`).

GeneralDIT embeds the tokens as a grid (B, T, H, W, D), computes its position embeddings from that grid's shape
(the rope table, one entry per token, frame-major; a learnable absolute embedding (B, T, H, W, D) that
`_forward` adds to x before every block, outside the block modules) and runs its blocks on "T H W B D", modulated
per row. So the plan splits the tokens where they are made, at the patch embedding's output: each frame's H x W
plane over the sequence ranks, frames whole (`SeqSplit(grid=True)`); the position embedders are given the whole
grid's shape and their outputs are cut to each rank's tokens; the final layer's output ((B * T, n, C): each
frame's tokens) is gathered back before ComfyUI's unpatchify.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelShape
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit
from .cosmos_common import converted_names, cosmos_shapes, strip_cosmos

FAMILY = "cosmos1"
BLOCKS = "blocks"  # the transformer blocks (a ModuleDict block0..: what torch.compile compiles, one by one)
SHARD_UNITS = (BLOCKS,)  # sharded-weights mode: one gather per block; the rest is held whole
GGUF_ARCHITECTURES = ("cosmos",)  # city96's GGUF files name every Cosmos generation "cosmos"
PATCH = (1, 2, 2)          # (t, h, w): ComfyUI's detection fixes it for Cosmos 1
MAX_SIZE = (128, 240, 240)  # ComfyUI: max_frames 128, max_img_h / w 240 (sizes the learnable embedding)
# ComfyUI's block_config for Cosmos 1 is "FA-CA-MLP": sub-block 0 self-attention, 1 cross-attention, 2 the MLP
_ATTN = "blocks.*.block.attn"

# Parallel plan as data (see parallel/plan.py), on ComfyUI's GeneralDIT. Its q/k norms are RMSNorms over each head's
# own channels ("per_head"), so under TP a rank normalises its local heads with the full (head_dim,) weight.
PLAN = ParallelPlan(
    tp={**{f"{_ATTN}.to_{p}.0": "host_colwise" for p in "qkv"}, f"{_ATTN}.to_out.0": "host_rowwise",
        "blocks.*.block.layer1": "host_colwise", "blocks.*.block.layer2": "host_rowwise"},
    attention_heads=(_ATTN,), heads_attr="heads",
    # tokens split where they are made; the embedders read only the grid's shape: they get the whole one, and their
    # outputs (the learnable embedding's grid, the rope table's per-token entries) are cut to this rank's tokens
    seq_split_outputs={"x_embedder": {0: SeqSplit(1, grid=True)},
                       "extra_pos_embedder": {0: SeqSplit(1, expected_ndim=5, grid=True)},
                       "pos_embedder": {0: SeqSplit(0, per_token=True)}},
    grid_shape_inputs={"extra_pos_embedder": 1, "pos_embedder": 1},
    seq_gather_outputs={"final_layer": SeqGather(1, grid=True, flat=True)},
    sequence_attention=("blocks.*.blocks.0.block",),  # the self-attention sub-blocks (FA)
)

_Q = "blocks.block0.blocks.0.block.attn.to_q."


def detect(shapes: dict) -> bool:
    # ComfyUI's own Cosmos 1 key (Predict2 has `blocks.0.self_attn...`)
    keys = {strip_cosmos(k) for k in shapes}
    return {"x_embedder.proj.1.weight", _Q + "0.weight", _Q + "1.weight", "final_layer.linear.weight"} <= keys


def _sizes(shapes: dict) -> dict:
    """The model's sizes read from the checkpoint's tensor shapes."""
    s = cosmos_shapes(shapes)
    width, patch_in = s["x_embedder.proj.1.weight"]
    head_dim = s[_Q + "1.weight"][0]
    return dict(width=width, head_dim=head_dim, heads=width // head_dim,
                in_channels=patch_in // math.prod(PATCH) - 1,  # ComfyUI: concat_padding_mask is always on
                out_channels=s["final_layer.linear.weight"][0] // math.prod(PATCH),
                layers=1 + max(int(k.split(".")[1][len("block"):]) for k in s if k.startswith("blocks.block")),
                ffn=s["blocks.block0.blocks.2.block.layer1.weight"][0],
                text_dim=s["blocks.block0.blocks.1.block.attn.to_k.0.weight"][1],
                adaln_lora_dim=s["blocks.block0.blocks.0.adaLN_modulation.1.weight"][0],
                extra_pos_emb="extra_pos_embedder.pos_emb_h" in s)


def comfy_model_config(shapes: dict) -> tuple[str, dict]:
    """(ComfyUI supported_models class name, unet_config) for this file: ComfyUI's own Cosmos 1 detection (its 7B
    settings for width 4096, its 14B ones for any other), with the depth and heads read from the file. The ranks
    build GeneralDIT from it; the MODEL node builds ComfyUI's BaseModel (CosmosVideo) from it."""
    c = _sizes(shapes)
    rope = (2.0, 1.0, 1.0) if c["width"] == 4096 else (2.0, 2.0, 2.0)  # (t, h, w), as ComfyUI sets them
    extra = (1.0, 1.0, 1.0) if c["width"] == 4096 else (2.0, 2.0, 2.0)
    unet = dict(image_model="cosmos", max_img_h=MAX_SIZE[1], max_img_w=MAX_SIZE[2], max_frames=MAX_SIZE[0],
                in_channels=c["in_channels"], out_channels=c["out_channels"], patch_spatial=PATCH[1],
                patch_temporal=PATCH[0], model_channels=c["width"], block_config="FA-CA-MLP",
                concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop",
                block_x_format="THWBD", affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=c["adaln_lora_dim"],
                num_blocks=c["layers"], num_heads=c["heads"], extra_per_block_abs_pos_emb=c["extra_pos_emb"],
                rope_t_extrapolation_ratio=rope[0], rope_h_extrapolation_ratio=rope[1],
                rope_w_extrapolation_ratio=rope[2], extra_per_block_abs_pos_emb_type="learnable",
                mlp_ratio=c["ffn"] / c["width"], crossattn_emb_channels=c["text_dim"])
    if c["width"] != 4096:
        unet.update(extra_t_extrapolation_ratio=extra[0], extra_h_extrapolation_ratio=extra[1],
                    extra_w_extrapolation_ratio=extra[2])
    return ("CosmosI2V" if c["in_channels"] == 17 else "CosmosT2V"), unet


def model_shape(shapes: dict) -> ModelShape:
    c = _sizes(shapes)
    return ModelShape(FAMILY, c["heads"], c["head_dim"], c["ffn"], c["layers"], c["in_channels"], c["out_channels"],
                      PATCH)


class _KeepKeys(dict):
    def pop(self, key, *default):
        return self[key] if key in self else dict.pop(self, key, *default)


def diffusers_names(source_keys) -> dict:
    """diffusers parameter name -> checkpoint key, from diffusers' own converter run on key names (its Cosmos 1.0
    branch, chosen by the `net.`-prefixed key of block 1): LoRAs saved with diffusers / PEFT names
    (`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`) are matched through it."""
    # the converter expects `net.` keys; other prefixes (a ComfyUI-saved file) are replaced here, values keep the key.
    # It pops every key before it looks for block 1's key to pick its Cosmos 1.0 table (so, given a plain dict, it
    # always renames with its 2.0 table): a mapping whose pop keeps the keys lets it see the release it converts
    return converted_names(_KeepKeys({"net." + strip_cosmos(k): k for k in source_keys}), "Cosmos 1")


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>", storage: str | None = None):
    """ComfyUI's GeneralDIT for this file, on meta, configured as `comfy_model_config` says."""
    from .host import build_with_pos_embed

    return build_with_pos_embed(header, compute_dtype, path, comfy_model_config(header)[1], storage=storage)


def conds_of(class_name: str) -> tuple:
    """The keyword inputs (ComfyUI conds) the ranks take: CosmosVideo's text `attention_mask` (GeneralDIT ignores it:
    ComfyUI leaves use_cross_attn_mask off), `fps` (the frame rate a conditioning may set: it scales the rope's time
    axis) and GeneralDIT's padding mask (concatenated before the patch embedding: whole on every rank).
    Video-to-world's conditioning frames arrive concatenated to x (ComfyUI's mask_inverted channel)."""
    return ("attention_mask", "fps", "padding_mask")


def install_attention(model, seq_state, backend: str) -> None:
    """Self-attention inside the plan's sequence-attention scope runs Ulysses / Ring: ComfyUI's GeneralDIT calls
    the module-level `optimized_attention` of comfy.ldm.cosmos.blocks, wrapped once per rank process."""
    import comfy.ldm.cosmos.blocks as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)


def forward(model, x, timestep, context, attention_mask=None, fps=None, padding_mask=None, transformer_options=None,
            **extras):
    """ComfyUI's GeneralDIT._forward (its DIFFUSION_MODEL wrappers already ran in the ComfyUI process)."""
    return model._forward(x, timestep, context, attention_mask=attention_mask, fps=fps, padding_mask=padding_mask,
                          transformer_options=transformer_options or {}, **extras)
