"""Cosmos Predict2 DiT (2B / 14B; text-to-image / video and video-to-world) on the host's own model class:
ComfyUI's `comfy.ldm.cosmos.predict2.MiniTrainDIT`, built in each rank on the meta device; this file is its
parallel plan as data.

The checkpoint is the released / ComfyUI layout (`net.blocks.N.self_attn.q_proj.weight`, ...): its keys are the
module paths, so no key map exists. The model is configured by ComfyUI's own detection, except that the depth and
head count are read from the file (ComfyUI fixes them from the width: 2048 -> 28 x 16, 5120 -> 36 x 40) so any
width loads; the ComfyUI process builds its BaseModel from the same config (`comfy_model_config`).

MiniTrainDIT keeps the tokens as a grid (B, T, H, W, D) and modulates every block per latent frame ((B, T, D)
time embeddings: one timestep per frame under video-to-world). So the plan splits each frame's H x W plane over
the sequence ranks and keeps the frames whole (`SeqSplit(grid=True)`): the per-frame modulation, the final layer
and the time embeddings run unchanged on every rank; the rope table is cut to each rank's tokens; the final
layer's output is gathered back to the grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelShape
from ..parallel.patch_points import PatchPoint, Tokens
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit
from .cosmos_common import converted_names, cosmos_shapes, strip_cosmos

FAMILY = "cosmos_predict2"
BLOCKS = "blocks"  # the transformer blocks (what torch.compile compiles, one by one)
SHARD_UNITS = (BLOCKS,)  # sharded-weights mode: one gather per block; the rest is held whole
GGUF_ARCHITECTURES = ("cosmos",)  # city96's GGUF files name every Cosmos generation "cosmos"
PATCH = (1, 2, 2)          # (t, h, w): every Predict2 release; ComfyUI's detection fixes it too
MAX_SIZE = (128, 240, 240)  # ComfyUI: max_frames 128, max_img_h / w 240 (only bounds the learnable embedding)

_ATTN = ("self_attn", "cross_attn")
# Parallel plan as data (see parallel/plan.py), on ComfyUI's MiniTrainDIT. Cosmos' q/k norm is an RMSNorm over each
# head's own channels, so under TP a rank normalises its local heads with the full (head_dim,) weight: no head_norm.
PLAN = ParallelPlan(
    tp={**{f"blocks.*.{a}.{p}_proj": "host_colwise" for a in _ATTN for p in "qkv"},
        **{f"blocks.*.{a}.output_proj": "host_rowwise" for a in _ATTN},
        "blocks.*.mlp.layer1": "host_colwise", "blocks.*.mlp.layer2": "host_rowwise"},
    attention_heads=tuple(f"blocks.*.{a}" for a in _ATTN), heads_attr="n_heads",
    # the grid enters the first block that runs and is split there (frames whole, each frame's plane split); every
    # block gets the rope table (one entry per token, frame-major) and, with an extra per-block position embedding,
    # that grid as keywords: each rank keeps the entries of its own tokens; the final layer's output is gathered
    seq_split_inputs={"blocks.*": {0: SeqSplit(1, first_only=True, grid=True)}},
    seq_split_kwargs={"blocks.*": {"rope_emb_L_1_1_D": SeqSplit(1, per_token=True),
                                   "extra_per_block_pos_emb": SeqSplit(1, expected_ndim=5, grid=True)}},
    seq_gather_outputs={"final_layer": SeqGather(1, grid=True)},
    sequence_attention=("blocks.*.self_attn",),
)

# ComfyUI's patch points in MiniTrainDIT (comfy/ldm/cosmos/predict2.py in 0.33.0; 0.3.75 has none), with the layout
# of what the host hands the patch: each patch sees the whole sequence (parallel/patch_points.py). The attention
# patches are called the UNet way, patch(q, k, v, pe=rope, attn_mask=None, extra_options=...) -> {"q", "k", "v",
# "pe"}, before the projections: q (and k, v for self-attention) are the block's normalised tokens (B, T * H * W,
# D), flat and frame-major, the rope table one entry per token (1, L, 1, 1, D); the cross-attention's k / v are the
# text (whole). mlp_patch gets {"x": (B, T, H, W, D)}, the grid.
_FLAT = _ROPE = Tokens(1)  # both hold the tokens at dim 1
PATCH_POINTS = {
    "attn1_patch": PatchPoint(args={("pos", 0): _FLAT, ("pos", 1): _FLAT, ("pos", 2): _FLAT, ("kw", "pe"): _ROPE},
                              returns={("dict", "q"): _FLAT, ("dict", "k"): _FLAT, ("dict", "v"): _FLAT,
                                       ("dict", "pe"): _ROPE}),
    "attn2_patch": PatchPoint(args={("pos", 0): _FLAT, ("kw", "pe"): _ROPE},
                              returns={("dict", "q"): _FLAT, ("dict", "pe"): _ROPE}),
    "mlp_patch": PatchPoint(args={("dict", "x"): Tokens(1, grid=True)}, returns={("dict", "x"): Tokens(1, grid=True)}),
}

# parts of later releases on the same block layout (Predict2.5's text projection, Transfer2.5's image context)
# that the host's MiniTrainDIT (ComfyUI 0.3.75) does not have: such files are refused rather than run without them
_NOT_PREDICT2 = ("crossattn_proj.", "img_context_proj.")


def detect(shapes: dict) -> bool:
    keys = {strip_cosmos(k) for k in shapes}
    # Predict2 (MiniTrainDIT); Cosmos 1 has `blocks.block0.blocks.0.block.attn...` and no `mlp.layer1`
    return ({"x_embedder.proj.1.weight", "blocks.0.mlp.layer1.weight", "blocks.0.self_attn.q_proj.weight",
             "blocks.0.self_attn.q_norm.weight"} <= keys
            and not any(k.startswith(_NOT_PREDICT2) for k in keys))


def _rope_scale(in_channels: int, width: int) -> tuple:
    """(t, h, w) rope extrapolation ratios, as ComfyUI's detection sets them for Predict2."""
    if in_channels == 16:  # text-to-image / video
        return (1.0, 4.0, 4.0)
    if in_channels == 17:  # video-to-world
        if width == 2048:
            return (1.0, 3.0, 3.0)
        if width == 5120:
            return (0.8333333333333334, 2.0, 2.0)
    return (1.0, 1.0, 1.0)  # MiniTrainDIT's defaults, which ComfyUI leaves for any other width


def _sizes(shapes: dict) -> dict:
    """The model's sizes read from the checkpoint's tensor shapes."""
    s = cosmos_shapes(shapes)
    width, patch_in = s["x_embedder.proj.1.weight"]
    head_dim = s["blocks.0.self_attn.q_norm.weight"][0]
    return dict(width=width, head_dim=head_dim, heads=width // head_dim,
                in_channels=patch_in // math.prod(PATCH) - 1,  # ComfyUI: concat_padding_mask is always on
                out_channels=s["final_layer.linear.weight"][0] // math.prod(PATCH),
                layers=1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks.")),
                ffn=s["blocks.0.mlp.layer1.weight"][0], text_dim=s["blocks.0.cross_attn.k_proj.weight"][1],
                adaln_lora_dim=s["blocks.0.adaln_modulation_self_attn.1.weight"][0])


def comfy_model_config(shapes: dict) -> tuple[str, dict]:
    """(ComfyUI supported_models class name, unet_config) for this file: ComfyUI's own Predict2 detection,
    with the depth and heads read from the file (ComfyUI only knows the 2B / 14B widths). The ranks build
    MiniTrainDIT from it; the MODEL node builds ComfyUI's BaseModel (sampling, latent format, video-to-world
    mask concat) from it."""
    c = _sizes(shapes)
    t, h, w = _rope_scale(c["in_channels"], c["width"])
    unet = dict(image_model="cosmos_predict2", max_img_h=MAX_SIZE[1], max_img_w=MAX_SIZE[2], max_frames=MAX_SIZE[0],
                in_channels=c["in_channels"], out_channels=c["out_channels"], patch_spatial=PATCH[1],
                patch_temporal=PATCH[0], model_channels=c["width"], num_blocks=c["layers"], num_heads=c["heads"],
                mlp_ratio=c["ffn"] / c["width"], concat_padding_mask=True, crossattn_emb_channels=c["text_dim"],
                pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30,
                use_adaln_lora=True, adaln_lora_dim=c["adaln_lora_dim"], extra_per_block_abs_pos_emb=False,
                rope_h_extrapolation_ratio=h, rope_w_extrapolation_ratio=w, rope_t_extrapolation_ratio=t,
                extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0,
                rope_enable_fps_modulation=False)
    return ("CosmosI2VPredict2" if c["in_channels"] == 17 else "CosmosT2IPredict2"), unet


def model_shape(shapes: dict) -> ModelShape:
    c = _sizes(shapes)
    return ModelShape(FAMILY, c["heads"], c["head_dim"], c["ffn"], c["layers"], c["in_channels"], c["out_channels"],
                      PATCH)


def diffusers_names(source_keys) -> dict:
    """diffusers parameter name -> checkpoint key, from diffusers' own converter run on key names: LoRAs saved with
    diffusers / PEFT names (`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`) are matched through it."""
    # the converter strips `net.`; other prefixes (a ComfyUI-saved file) are stripped here, values keep the key
    return converted_names({strip_cosmos(k): k for k in source_keys}, "Cosmos")


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>", storage: str | None = None):
    """ComfyUI's MiniTrainDIT for this file, on meta, configured as `comfy_model_config` says."""
    from .host import build_with_pos_embed

    return build_with_pos_embed(header, compute_dtype, path, comfy_model_config(header)[1], storage=storage)


def conds_of(class_name: str) -> tuple:
    """The keyword inputs (ComfyUI conds) the ranks take: MiniTrainDIT's padding mask (resized to the latent and
    concatenated before the patch embedding: whole on every rank)."""
    return ("padding_mask",)


def install_attention(model, seq_state, backend: str) -> None:
    """Self-attention inside the plan's sequence-attention scope runs Ulysses / Ring: ComfyUI's MiniTrainDIT calls
    the module-level `optimized_attention` of comfy.ldm.cosmos.predict2, wrapped once per rank process."""
    import comfy.ldm.cosmos.predict2 as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)


def pad_to_patch(x: torch.Tensor, patch) -> torch.Tensor:
    """Pad T/H/W up to the patch size as ComfyUI's newer MiniTrainDIT does (common_dit.pad_to_patch_size, circular;
    the output is cropped back; 0.3.75's asserts). Latents from ComfyUI's own nodes are multiples of the patch."""
    pad = []
    for i in range(x.ndim - 2):
        pad = [0, (-x.shape[i + 2]) % patch[i]] + pad
    return F.pad(x, pad, mode="circular") if any(pad) else x


def forward(model, x, timestep, context, fps=None, padding_mask=None, transformer_options=None, **extras):
    """ComfyUI's MiniTrainDIT._forward (its DIFFUSION_MODEL wrappers already ran in the ComfyUI process); a latent
    that is not a multiple of the patch is padded and the output cropped, as newer ComfyUI does."""
    t, h, w = x.shape[2:]
    out = model._forward(pad_to_patch(x, PATCH), timestep, context, fps=fps, padding_mask=padding_mask,
                         transformer_options=transformer_options or {}, **extras)
    return out[:, :, :t, :h, :w]
