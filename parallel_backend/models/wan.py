"""Wan 2.1 / 2.2 DiT on the host's own model class: ComfyUI's `comfy.ldm.wan.model.WanModel` (and the variant
class ComfyUI's detection picks), built in each rank on the meta device; this file is its parallel plan as data.

Covers Wan 2.1 T2V / I2V / FLF2V, Wan 2.2 A14B (each expert is a Wan 2.1 14B-layout file) and Wan 2.2 TI2V-5B
(48-channel latent; ComfyUI passes one timestep per latent frame, which its blocks stretch over the tokens). The
module paths below are ComfyUI's, which are the checkpoint's keys, so no key map exists; the sharded forward runs
ComfyUI's own code (`WanModel._forward`), and ComfyUI's attention function serves every attention that is not
sequence-split (cross-attention, and self-attention on one sequence rank).
"""
from __future__ import annotations

import math

import torch

from ..config import ModelShape
from ..parallel.patch_points import BlockReplace, PatchPoint, Tokens
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit, extend_plan

FAMILY = "wan"
BLOCKS = "blocks"  # the transformer blocks (what torch.compile compiles, one by one)
# the block lists whose weights sharded-weights mode splits over the ranks, one gather per block (those a variant
# lacks are skipped); the rest of the model is held whole
# host classes whose block loop pipeline stages can cut (a plain loop over `blocks`; the variants interleave added
# blocks or inject per-block inputs, and stay on the other axes)
PIPELINE_CLASSES = ("WanModel",)
SHARD_UNITS = ("blocks", "vace_blocks", "face_adapter.fuser_blocks", "audio_injector.injector")
HEAD_DIM = 128  # ComfyUI derives heads as dim // 128 for every Wan release

_ATTN = ("self_attn", "cross_attn")
# Parallel plan as data (see parallel/plan.py), on ComfyUI's WanModel.
PLAN = ParallelPlan(
    # Megatron split of each block: q / k / v (and I2V's image k / v) by output, o by input (all-reduced); Wan's
    # q / k RMSNorm spans all heads, so its sum of squares is all-reduced over TP (head_norm)
    tp={**{f"blocks.*.{a}.{p}": "host_colwise" for a in _ATTN for p in "qkv"},
        "blocks.*.cross_attn.k_img": "host_colwise", "blocks.*.cross_attn.v_img": "host_colwise",
        **{f"blocks.*.{a}.o": "host_rowwise" for a in _ATTN},
        **{f"blocks.*.{a}.norm_{p}": "head_norm" for a in _ATTN for p in "qk"},
        "blocks.*.cross_attn.norm_k_img": "head_norm",
        "blocks.*.ffn.0": "host_colwise", "blocks.*.ffn.2": "host_rowwise"},
    attention_heads=tuple(f"blocks.*.{a}" for a in _ATTN), heads_attr="num_heads",
    # the tokens enter the first block that runs whole and are split there (a block replacement may skip block 0); every block gets the rope table and the time
    # modulation as keywords: both are per token (the modulation per latent frame under TI2V-5B, stretched over the
    # frame's tokens as ComfyUI's repeat_e does), so each rank keeps the entries of its own tokens; the head's
    # modulation likewise; the head's output is gathered back to the full sequence
    # (per-token modulation is (B, T_e, 6, dim) into the blocks and (B, T_e, dim) into the head in WanModel; the
    # VACE / camera classes pass one per row, (B, 6, dim) and (B, dim): those have another ndim and stay whole)
    seq_split_inputs={"blocks.*": {0: SeqSplit(1, first_only=True)},
                      "head": {1: SeqSplit(1, per_token=True, expected_ndim=3)}},
    seq_split_kwargs={"blocks.*": {"e": SeqSplit(1, per_token=True, expected_ndim=4),
                                   "freqs": SeqSplit(1, per_token=True)}},
    seq_gather_outputs={"head": SeqGather(1)},
    sequence_attention=("blocks.*.self_attn",),
)


def _block_tp(prefix: str) -> dict:
    """The Megatron split of WanAttentionBlocks under `prefix` (blocks, VACE's vace_blocks)."""
    return {**{f"{prefix}.{a}.{p}": "host_colwise" for a in _ATTN for p in "qkv"},
            f"{prefix}.cross_attn.k_img": "host_colwise", f"{prefix}.cross_attn.v_img": "host_colwise",
            **{f"{prefix}.{a}.o": "host_rowwise" for a in _ATTN},
            **{f"{prefix}.{a}.norm_{p}": "head_norm" for a in _ATTN for p in "qk"},
            f"{prefix}.cross_attn.norm_k_img": "head_norm",
            f"{prefix}.ffn.0": "host_colwise", f"{prefix}.ffn.2": "host_rowwise"}


_PER_TOKEN_KWARGS = {"e": SeqSplit(1, per_token=True, expected_ndim=4), "freqs": SeqSplit(1, per_token=True)}

# The host classes this family runs (ComfyUI's detection picks them from the file's keys), each with the keyword
# inputs (ComfyUI conds) it takes and what its plan adds to PLAN. Inputs consumed before the tokens are split
# (concatenated to the latent, embedded with it, or prepended as tokens) need no entry: every rank computes them
# whole, so operations that work per frame see whole frames.
#  - clip_fea (I2V / FLF2V CLIP tokens: context, whole); time_dim_concat (frames concatenated before the patch
#    embedding); reference_latent (2.2 Fun: ref_conv tokens prepended to x before the first block, cut off after
#    the head, which gathers first);
#  - VACE: vace_context is embedded whole by vace_patch_embedding, then each hint stream `c` and the block input
#    `x` it starts from are split with the tokens at vace block 0 (later vace blocks get c already split); the
#    hints are added to the split x; vace_strength is a list of numbers (whole). VACE blocks are Wan blocks (same
#    TP split); before_proj / after_proj take the full hidden state and give it back, so they are row-parallel on
#    a sliced input (half the bytes on tp2, one all-reduce each, as the attention's output projection);
#  - Camera: camera_conditions go through the control adapter (per-frame 2-D convs, whole frames) and are added
#    to the patch embedding before the split; the adapter's convolutions are split like a Megatron MLP (residual
#    convs out / in channels, the first on a sliced input).
VARIANTS = {
    "WanModel": dict(conds=("clip_fea", "time_dim_concat", "reference_latent")),
    "VaceWanModel": dict(
        conds=("clip_fea", "time_dim_concat", "vace_context", "vace_strength"),
        plan=ParallelPlan(
            tp={**_block_tp("vace_blocks.*"), "vace_blocks.*.before_proj": "host_rowwise_sliced_input",
                "vace_blocks.*.after_proj": "host_rowwise_sliced_input"},
            attention_heads=tuple(f"vace_blocks.*.{a}" for a in _ATTN), heads_attr="num_heads",
            seq_split_inputs={"vace_blocks.0": {0: SeqSplit(1)}},
            seq_split_kwargs={"vace_blocks.0": {"x": SeqSplit(1)}, "vace_blocks.*": _PER_TOKEN_KWARGS},
            sequence_attention=("vace_blocks.*.self_attn",))),
    # HuMo: every block also cross-attends, frame by frame, from the frame's video tokens to that frame's 16 audio
    # tokens (its queries reshaped to (B * frames, tokens a frame)); so the tokens are split frame-aligned (each rank
    # n tokens of every frame, reference frames included: `frames` split on the patch grid's plane) instead of in
    # one run, and the per-frame reshape holds on every rank. The audio projection runs whole (per frame, before the
    # blocks); the audio cross-attention is TP-split like the block's.
    "HumoWanModel": dict(
        conds=("audio_embed", "reference_latent"),
        plan=ParallelPlan(
            tp={**{f"blocks.*.audio_cross_attn_wrapper.audio_cross_attn.{p}": "host_colwise" for p in "qkv"},
                "blocks.*.audio_cross_attn_wrapper.audio_cross_attn.o": "host_rowwise",
                **{f"blocks.*.audio_cross_attn_wrapper.audio_cross_attn.norm_{p}": "head_norm" for p in "qk"}},
            attention_heads=("blocks.*.audio_cross_attn_wrapper.audio_cross_attn",), heads_attr="num_heads",
            seq_split_inputs={"blocks.*": {0: SeqSplit(1, first_only=True, frames=True)}},
            seq_gather_outputs={"head": SeqGather(1, frames=True)},
            plane_from=("patch_embedding",))),
    # Animate: the pose latents and the face encoder's motion vectors are computed whole (before the split, per
    # frame); every 5th block a face block cross-attends, frame by frame, from the frame's tokens to its motion tokens
    # (queries reshaped to (B * frames, tokens a frame)): so the tokens are split frame-aligned, as for HuMo. The face
    # adapter's blocks are TP-split by head: q by output, the fused k / v projection by each rank's heads of k and of
    # v (two blocks of its output), the output projection by input; q / k norms are per head.
    "AnimateWanModel": dict(
        conds=("clip_fea", "time_dim_concat", "pose_latents", "face_pixel_values"),
        plan=ParallelPlan(tp={"face_adapter.fuser_blocks.*.linear1_q": "host_colwise",
                              "face_adapter.fuser_blocks.*.linear1_kv": "host_colwise_kv",
                              "face_adapter.fuser_blocks.*.linear2": "host_rowwise"},
                          attention_heads=(("face_adapter.fuser_blocks.[0-9]", "heads_num"),
                                           ("face_adapter.fuser_blocks.[0-9][0-9]", "heads_num")),
                          seq_split_inputs={"blocks.*": {0: SeqSplit(1, first_only=True, frames=True)}},
                          seq_gather_outputs={"head": SeqGather(1, frames=True)},
                          plane_from=("patch_embedding",))),
    # S2V: the latent's frames are followed by a reference frame and frame-pack motion tokens of coarser grids; the
    # audio injector after some blocks cross-attends, frame by frame, from the frames' tokens (x[:, :seq_len]) to the
    # frame's audio tokens. So the frames are split frame-aligned and the tokens after them (reference, motion) are
    # held whole by every rank, counted once as attention keys; the injector's seq_len becomes this rank's frame
    # tokens. The audio / motion encoders run whole (before the split); the injector's attention is TP-split.
    "WanModel_S2V": dict(
        conds=("audio_embed", "reference_latent", "reference_motion", "control_video"),
        plan=ParallelPlan(
            tp={**{f"audio_injector.injector.*.{p}": "host_colwise" for p in "qkv"},
                "audio_injector.injector.*.o": "host_rowwise",
                **{f"audio_injector.injector.*.norm_{p}": "head_norm" for p in "qk"}},
            # (fnmatch's * also matches dots: the injectors by index, one and two digits)
            attention_heads=("audio_injector.injector.[0-9]", "audio_injector.injector.[0-9][0-9]"),
            heads_attr="num_heads",
            seq_split_inputs={"blocks.*": {0: SeqSplit(1, first_only=True, frames=True, rest=True)}},
            seq_gather_outputs={"head": SeqGather(1, frames=True)},
            plane_from=("patch_embedding",), main_length_args={"audio_injector": 4})),
    "CameraWanModel": dict(
        conds=("clip_fea", "camera_conditions"),
        plan=ParallelPlan(tp={"control_adapter.conv": "host_rowwise_sliced_input",
                              "control_adapter.residual_blocks.*.conv1": "host_colwise",
                              "control_adapter.residual_blocks.*.conv2": "host_rowwise"})),
}
# ComfyUI's patch points in Wan's classes (transformer_options["patches"] / ["patches_replace"]; those a host version
# lacks are never called), with the layout of what the host hands the patch there: each patch sees the whole
# sequence (parallel/patch_points.py). Read in ComfyUI 0.33.0 comfy/ldm/wan/model.py (0.3.75 has the block
# replacement only).
PATCH_POINTS = {
    # WanSelfAttention, after the attention, before the output projection: x (B, S, heads * head_dim) and q, k
    # (B, S, heads, head_dim); under TP a rank holds its heads (x: their channels)
    "attn1_patch": PatchPoint(args={("dict", "x"): Tokens(1, tp_dim=2), ("dict", "q"): Tokens(1, tp_dim=2),
                                    ("dict", "k"): Tokens(1, tp_dim=2)},
                              returns={("value", None): Tokens(1, tp_dim=2)}),
    # WanAttentionBlock, after the cross-attention's residual (InfiniteTalk's audio cross-attention): x (B, S, dim)
    "attn2_patch": PatchPoint(args={("dict", "x"): Tokens(1)}, returns={("value", None): Tokens(1)}),
    # the model's block loop, after each block (Uni3C's residuals): img (B, S, dim); x is the input latent (whole)
    "double_block": PatchPoint(args={("dict", "img"): Tokens(1)}, returns={("dict", "img"): Tokens(1)},
                               between_blocks=True),
}
# a block replacement (SkipLayerGuidanceDiT): img (B, S, dim) in and out; vec / pe stay as the host passes them (the
# block's own split hooks cut them when the original block runs)
BLOCK_REPLACE = {("dit", "double_block"): BlockReplace(args={"img": Tokens(1)}, returns={"img": Tokens(1)})}

# host classes this pack does not run yet, with the reason (refused at load, naming the class)
NOT_YET: dict = {}  # host class -> why the pack cannot run it yet (every Wan class of ComfyUI 0.3.75 runs)


def variant_of(class_name: str) -> dict:
    """The VARIANTS entry of a host class; raises with the class name and the reason for one the pack cannot run."""
    if class_name in VARIANTS:
        return VARIANTS[class_name]
    why = NOT_YET.get(class_name, "the pack has no parallel plan for this class")
    raise ValueError(f"ComfyUI detects this file as {class_name}, which the parallel loader cannot run yet: {why}. "
                     f"Sample it with the native Load Diffusion Model (UNETLoader); supported Wan classes: "
                     f"{', '.join(VARIANTS)}")


def conds_of(class_name: str) -> tuple:
    """The keyword inputs (ComfyUI conds) the ranks take for this host class."""
    return variant_of(class_name)["conds"]


def plan_for(model) -> ParallelPlan:
    """PLAN with what the model's variant adds."""
    extra = variant_of(type(model).__name__).get("plan")
    return extend_plan(PLAN, extra) if extra is not None else PLAN


def _strip(key: str) -> str:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def detect(shapes: dict) -> bool:
    keys = {_strip(k) for k in shapes}
    return {"patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight"} <= keys


def _shapes(shapes: dict) -> dict:
    return {_strip(k): tuple(v[0]) for k, v in shapes.items()}


def config_from_shapes(shapes: dict) -> dict:
    """The model's sizes from the checkpoint's tensor shapes, as ComfyUI detects them (named as diffusers names
    its config)."""
    s = _shapes(shapes)
    dim, in_ch = s["patch_embedding.weight"][:2]
    patch = tuple(s["patch_embedding.weight"][2:])
    num_layers = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    cfg = dict(
        patch_size=patch,
        num_attention_heads=dim // HEAD_DIM,
        attention_head_dim=HEAD_DIM,
        in_channels=in_ch,
        out_channels=s["head.head.weight"][0] // math.prod(patch),
        text_dim=s["text_embedding.0.weight"][1],
        freq_dim=s["time_embedding.0.weight"][1],
        ffn_dim=s["blocks.0.ffn.0.weight"][0],
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in s,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in s else None,
        eps=1e-6,
    )
    if "img_emb.proj.0.weight" in s:  # Wan 2.1 I2V / FLF2V: CLIP vision tokens
        cfg["image_dim"] = s["img_emb.proj.0.weight"][0]
        cfg["added_kv_proj_dim"] = dim
        if "img_emb.emb_pos" in s:
            cfg["pos_embed_seq_len"] = s["img_emb.emb_pos"][1]
    return cfg


def model_shape(shapes: dict) -> ModelShape:
    c = config_from_shapes(shapes)
    return ModelShape(FAMILY, c["num_attention_heads"], c["attention_head_dim"], c["ffn_dim"], c["num_layers"],
                      c["in_channels"], c["out_channels"], tuple(c["patch_size"]))


def diffusers_names(source_keys) -> dict:
    """diffusers parameter name -> checkpoint key, from diffusers' own converter run on key names: LoRAs saved with
    diffusers / PEFT names (`transformer.blocks.0.attn1.to_q.lora_A.weight`) are matched through it."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({k: k for k in source_keys})
    bad = [k for k, v in converted.items() if not isinstance(v, str)]
    if bad:  # the converter computed on values (a split): this layout needs a real tensor pass
        raise ValueError(f"Wan key conversion needs tensor values for {bad[:3]}: unsupported variant")
    mapping = dict(converted)
    # I2V: diffusers names the CLIP position embedding differently
    for k in list(mapping):
        if k.endswith("img_emb.emb_pos") or k == "condition_embedder.image_embedder.emb_pos":
            mapping["condition_embedder.image_embedder.pos_embed"] = mapping.pop(k)
    return mapping


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>"):
    """ComfyUI's model for this file (WanModel, or the variant class its detection picks), on meta."""
    from .host import build_host_model

    return build_host_model(header, compute_dtype, path)


def install_attention(model, seq_state, backend: str) -> None:
    """Self-attention inside the plan's sequence-attention scope runs Ulysses / Ring: ComfyUI's Wan calls the
    module-level `optimized_attention`, which is wrapped once per rank process (calls outside the scope are
    ComfyUI's own)."""
    import comfy.ldm.wan.model as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)


def forward(model, x, timestep, context, clip_fea=None, transformer_options=None, **extras):
    """ComfyUI's WanModel._forward (its DIFFUSION_MODEL wrappers already ran in the ComfyUI process), with the
    patches that crossed from the ComfyUI process (block replacements such as SkipLayerGuidanceDiT's), which
    ComfyUI's own code applies or ignores exactly as natively."""
    return model._forward(x, timestep, context, clip_fea=clip_fea, transformer_options=transformer_options or {},
                          **extras)
