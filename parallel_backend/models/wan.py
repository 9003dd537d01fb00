"""Wan 2.1 / 2.2 DiT on the host's own model class: ComfyUI's `comfy.ldm.wan.model.WanModel` (and the variant
class ComfyUI's detection picks), built in each rank on the meta device; this file is its parallel plan as data.

Covers Wan 2.1 T2V / I2V / FLF2V, Wan 2.2 A14B (each expert is a Wan 2.1 14B-layout file) and Wan 2.2 TI2V-5B
(48-channel latent; ComfyUI passes one timestep per latent frame, which its blocks stretch over the tokens). The
module paths below are ComfyUI's, which are the checkpoint's keys, so no key map exists; the sharded forward runs
ComfyUI's own code (`WanModel._forward`), and ComfyUI's attention function serves every attention that is not
sequence-split (cross-attention, and self-attention on one sequence rank).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types

import torch

from ..config import ModelShape
from ..parallel.patch_points import BlockReplace, PatchPoint, Tokens
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit, extend_plan
from ..weights.checkpoint import strip_prefix, stripped_shapes

FAMILY = "wan"
BLOCKS = "blocks"  # the transformer blocks (what torch.compile compiles, one by one)
# the block lists whose weights sharded-weights mode splits over the ranks, one gather per block (those a variant
# lacks are skipped); the rest of the model is held whole
# host classes whose block loop pipeline stages can cut (a plain loop over `blocks`; the variants interleave added
# blocks or inject per-block inputs, and stay on the other axes)
PIPELINE_CLASSES = ("WanModel",)
SHARD_UNITS = ("blocks", "vace_blocks", "face_adapter.fuser_blocks", "audio_injector.injector",
               "music_injector.injector")
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
#    the head, which gathers first); context_latents (0.33+, in-context references: a list of latents, each
#    embedded and appended as tokens before the first block, cut off after the head);
#  - VACE: vace_context is embedded whole by vace_patch_embedding, then each hint stream `c` and the block input
#    `x` it starts from are split with the tokens at vace block 0 (later vace blocks get c already split); the
#    hints are added to the split x; vace_strength is a list of numbers (whole). VACE blocks are Wan blocks (same
#    TP split); before_proj / after_proj take the full hidden state and give it back, so they are row-parallel on
#    a sliced input (half the bytes on tp2, one all-reduce each, as the attention's output projection);
#  - Camera: camera_conditions go through the control adapter (per-frame 2-D convs, whole frames) and are added
#    to the patch embedding before the split; the adapter's convolutions are split like a Megatron MLP (residual
#    convs out / in channels, the first on a sliced input).
VARIANTS = {
    "WanModel": dict(conds=("clip_fea", "time_dim_concat", "reference_latent", "context_latents")),
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
    # ComfyUI 0.33 (comfy/ldm/wan/model.py, model_animate2.py, model_wandancer.py; the same in Comfy-Org/ComfyUI
    # 0b61ce5b):
    # SCAIL / SCAIL-2: the reference frames are concatenated before the latent's frames and SCAIL-2's identity masks
    # added to their embedding (whole, before the split); the pose video, embedded by its own convolution (at half
    # the latent's size: another plane), follows the frames and is cut off before the head. So the frames are split
    # frame-aligned and the pose tokens held whole by every rank (`rest`, counted once as keys): the model's cut
    # `x[:, :-pose tokens]` then removes exactly them on every rank. No operation looks per frame; the blocks are
    # Wan blocks.
    "SCAILWanModel": dict(
        conds=("clip_fea", "time_dim_concat", "reference_latent", "pose_latents"),
        plan=ParallelPlan(seq_split_inputs={"blocks.*": {0: SeqSplit(1, first_only=True, frames=True, rest=True)}},
                          seq_gather_outputs={"head": SeqGather(1, frames=True)}, plane_from=("patch_embedding",))),
    # WanDancer: the music features run through their own small encoder (whole, before the split) and, after some
    # blocks, the music injector cross-attends from each eighth of a frame's tokens (x[:, :seq_len] reshaped to
    # (B * 8 * frames, tokens an eighth)) to that eighth's music token. So the frames are split in eighths (each
    # rank n tokens of every eighth: `plane_runs` 8) and the injector's seq_len becomes this rank's count; its
    # attention is TP-split like S2V's injector. At fps other than 30 the global patch embedding and head serve.
    "WanDancerModel": dict(
        conds=("clip_fea", "time_dim_concat", "audio_embed", "clip_fea_ref", "fps", "audio_inject_scale"),
        plan=ParallelPlan(
            tp={**{f"music_injector.injector.*.{p}": "host_colwise" for p in "qkv"},
                "music_injector.injector.*.o": "host_rowwise",
                **{f"music_injector.injector.*.norm_{p}": "head_norm" for p in "qk"}},
            attention_heads=("music_injector.injector.[0-9]", "music_injector.injector.[0-9][0-9]"),
            heads_attr="num_heads",
            seq_split_inputs={"blocks.*": {0: SeqSplit(1, first_only=True, frames=True)}},
            seq_gather_outputs={"head": SeqGather(1, frames=True), "head_global": SeqGather(1, frames=True)},
            plane_from=("patch_embedding", "patch_embedding_global"), main_length_args={"music_injector": "seq_len"},
            plane_runs=8)),
}
# WanAnimate2: the pose video's tokens run through every block beside the video's (each block's forward_pose, then
# forward_gen: video frame j's queries attend to every video token and to pose frame j - 1's tokens, frame by
# frame). ComfyUI calls these block methods directly, past the module call the plan's hooks see, so the class gets
# its own plan (no block hooks) and `_FrameStreams` splits both streams where the blocks are entered: each
# frame-aligned over the same plane (each rank n tokens of every frame), so frame j's local queries, its local pose
# frame and the local video tokens line up on every rank, and Ulysses / Ring gather the rest of each frame's keys.
# The head's output is gathered frame by frame as for HuMo.
ANIMATE2_PLAN = dataclasses.replace(
    PLAN, seq_split_inputs={"head": PLAN.seq_split_inputs["head"]}, seq_split_kwargs={}, sequence_attention=(),
    seq_gather_outputs={"head": SeqGather(1, frames=True)}, plane_from=("patch_embedding",))
VARIANTS["WanAnimate2Model"] = dict(
    conds=("clip_fea", "time_dim_concat", "pose_latents", "clip_fea_pose", "context_pose", "pose_strength",
           "reference_strength"),
    whole_plan=ANIMATE2_PLAN, streams=True)
VARIANTS["SCAIL2WanModel"] = dict(
    conds=VARIANTS["SCAILWanModel"]["conds"] + ("ref_mask_latents", "sam_latents", "ref_mask_flag"),
    plan=VARIANTS["SCAILWanModel"]["plan"])

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

# transformer_options of ComfyUI's Wan nodes the ranks cannot honour, each with what to change: refused before a call
REFUSED_OPTIONS = {
    "animate2_cache": "WanAnimate2Cache keeps the pose branch's block inputs in the ComfyUI process across steps, which "
                      "the ranks (each holding its part of them) cannot share yet: remove the WanAnimate2Cache node "
                      "(the pose branch then runs on every step, split like the video)",
}

# host classes this pack does not run yet, with the reason (refused at load, naming the class)
NOT_YET: dict = {  # host class -> why the pack cannot run it yet
    "CausalWanModel": "causal forcing samples a few frames at a time with ComfyUI's ar_video sampler, which keeps "
                      "every past frame's keys and values in a cache it allocates through the model, writes on each "
                      "call and rewinds between calls (transformer_options' ar_state); the ranks would each have to "
                      "hold their part of that cache across calls, which they do not yet",
}


def variant_of(class_name: str) -> dict:
    """The VARIANTS entry of a host class; raises with the class name and the reason for one the pack cannot run."""
    from .host import variant_entry
    return variant_entry(VARIANTS, NOT_YET, class_name, "Wan")


def conds_of(class_name: str) -> tuple:
    """The keyword inputs (ComfyUI conds) the ranks take for this host class."""
    return variant_of(class_name)["conds"]


def plan_for(model) -> ParallelPlan:
    """PLAN with what the model's variant adds (or the variant's own plan)."""
    variant = variant_of(type(model).__name__)
    if "whole_plan" in variant:
        return variant["whole_plan"]
    extra = variant.get("plan")
    return extend_plan(PLAN, extra) if extra is not None else PLAN


def detect(shapes: dict) -> bool:
    keys = {strip_prefix(k) for k in shapes}
    return {"patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight"} <= keys


def config_from_shapes(shapes: dict) -> dict:
    """The model's sizes from the checkpoint's tensor shapes, as ComfyUI detects them (named as diffusers names
    its config)."""
    s = stripped_shapes(shapes)
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


# The class a file asks for, as ComfyUI's detection reads it (comfy/model_detection.py of 0.33.0, unchanged in
# Comfy-Org/ComfyUI 0b61ce5b): a key only that class has (in ComfyUI's order), or, for a file in another class's
# layout, the "transformer" entries of its safetensors metadata's "config". A ComfyUI without the class builds a
# plain WanModel from such a file (the extra keys unused, the metadata unread) and would sample another model.
CLASS_KEYS = (("patch_embedding_mask.weight", "SCAIL2WanModel"), ("patch_embedding_pose.weight", "SCAILWanModel"),
              ("patch_embedding_global.weight", "WanDancerModel"))
CLASS_CONFIGS = ((("model_type", "animate2"), "WanAnimate2Model"), (("causal_ar", True), "CausalWanModel"),
                 (("model_type", "flow_rvs"), "WAN21_FlowRVS"))


def transformer_config(path: str) -> dict:
    """The "transformer" entries of a safetensors file's metadata "config" ({} without them), which ComfyUI's
    detection applies over what the keys say."""
    if not str(path).endswith((".safetensors", ".sft")):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        config = (f.metadata() or {}).get("config")
    try:
        return json.loads(config).get("transformer", {}) if config else {}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: its metadata's 'config' is not a JSON object ({e}); the file is damaged") from None


def file_class(header: dict, config: dict) -> tuple[str, str] | None:
    """(ComfyUI class, what names it) that a file's keys or metadata ask for, beyond ComfyUI 0.3.75's detection."""
    keys = {strip_prefix(k) for k in header}
    for key, cls in CLASS_KEYS:
        if key in keys:
            return cls, f"its key {key}"
    for (name, value), cls in CLASS_CONFIGS:
        if config.get(name) == value:
            return cls, f"its metadata's transformer config {name}={json.dumps(value)}"
    return None


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>", storage: str | None = None):
    """ComfyUI's model for this file (WanModel, or the variant class its detection picks from the keys and the
    metadata), on meta. A file of a class this ComfyUI lacks is refused by name."""
    from .host import build_host_model

    wanted = file_class(header, transformer_config(path))
    try:
        model, model_config, prefix = build_host_model(header, compute_dtype, path, storage=storage)
        built = f"{type(model_config).__name__} / {type(model).__name__}"
    except ValueError:  # not recognised at all (e.g. SCAIL's 20 input channels on an older ComfyUI)
        if wanted is None or host_has_class(wanted[0]):
            raise
        model = model_config = built = None
    if wanted is not None and wanted[0] not in (type(model).__name__, type(model_config).__name__):
        lacks = "did not pick" if host_has_class(wanted[0]) else "does not have"
        raise ValueError(f"{path}: {wanted[1]} makes it ComfyUI's {wanted[0]}, which this ComfyUI {lacks} (it "
                         f"{f'would build {built} and sample another model' if built else 'does not know the file'}"
                         f"): update ComfyUI to a release with {wanted[0]}")
    _read_fused_music_attention(model, header, prefix)
    return model, model_config, prefix


def host_has_class(name: str) -> bool:
    """Whether this ComfyUI defines a Wan model class (in comfy.ldm.wan's modules or comfy.model_base), looked up."""
    import importlib

    for module in ("comfy.ldm.wan.model", "comfy.ldm.wan.model_animate2", "comfy.ldm.wan.model_wandancer",
                   "comfy.ldm.wan.ar_model", "comfy.model_base"):
        try:
            if hasattr(importlib.import_module(module), name):
                return True
        except ImportError:  # a module this ComfyUI does not have yet
            continue
    return False


class _FusedRows(torch.nn.Module):
    """One of q / k / v of a layer that holds them fused (rows [i * d, (i + 1) * d) of its `in_proj_weight`)."""

    def __init__(self, owner, index: int):
        super().__init__()
        self.owner, self.index = [owner], index  # (a list: the owner is not a child of its own projection)

    def forward(self, x):
        owner = self.owner[0]
        d = owner.in_proj_weight.shape[0] // 3
        rows = slice(self.index * d, (self.index + 1) * d)
        return torch.nn.functional.linear(x, owner.in_proj_weight[rows].to(x.dtype),
                                          owner.in_proj_bias[rows].to(x.dtype))


def _read_fused_music_attention(model, header: dict, prefix: str) -> None:
    """WanDancer's files keep each music-encoder layer's q / k / v fused (`self_attn.in_proj_weight` / `_bias`,
    torch's MultiheadAttention layout), which ComfyUI splits while loading (supported_models' WAN22_WanDancer
    process_unet_state_dict); the ranks read the file's tensors as they are, so such a layer holds the fused ones
    and its q / k / v projections take their rows (the same rows ComfyUI splits off)."""
    for i, layer in enumerate(getattr(model, "music_encoder", ())):
        key = f"{prefix}music_encoder.{i}.self_attn.in_proj_weight"
        if key not in header:
            continue
        attn, p = layer.self_attn, layer.self_attn.q_proj.weight
        attn.in_proj_weight = torch.nn.Parameter(torch.empty(3 * p.shape[0], p.shape[1], dtype=p.dtype,
                                                             device=p.device), requires_grad=False)
        attn.in_proj_bias = torch.nn.Parameter(torch.empty(3 * p.shape[0], dtype=p.dtype, device=p.device),
                                               requires_grad=False)
        attn.q_proj, attn.k_proj, attn.v_proj = (_FusedRows(attn, j) for j in range(3))


def install_attention(model, seq_state, backend: str) -> None:
    """Self-attention inside the plan's sequence-attention scope runs Ulysses / Ring: ComfyUI's Wan calls the
    module-level `optimized_attention`, which is wrapped once per rank process (calls outside the scope are
    ComfyUI's own). A class whose blocks run two token streams through methods gets them split (`_FrameStreams`)."""
    import comfy.ldm.wan.model as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)
    if variant_of(type(model).__name__).get("streams"):
        import comfy.ldm.wan.model_animate2 as animate2

        animate2.optimized_attention = _frame_stream_attention(animate2.optimized_attention)
        model._pdit_streams = _FrameStreams(model, seq_state)


# frame-stream states of the blocks now running under `_FrameStreams` (pushed / popped around each routed call)
ACTIVE_FRAME_STREAMS: list = []


def _frame_stream_attention(original):
    """model_animate2's attention, every call of which is a self-attention of split tokens: a stream's frames, or
    frame j's queries against the video and pose frame j - 1. Each rank's keys are whole frames of its part of the
    plane, so the padding is masked frame by frame (as many frames as the keys hold)."""
    if getattr(original, "_pdit_original", None) is not None:
        return original
    from ..parallel.attention import ulysses_attention

    def attention(q, k, v, heads, *args, **kwargs):
        state = ACTIVE_FRAME_STREAMS[-1] if ACTIVE_FRAME_STREAMS else None
        if state is None or state.degree == 1 or state.grid is None or args or kwargs.get("mask") is not None:
            return original(q, k, v, heads, *args, **kwargs)
        key_valid = functools.partial(state.key_valid, frames=k.shape[1] * state.grid[0] // state.main_local_len)
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        return ulysses_attention(q, k, v, state.groups, key_valid=key_valid).flatten(2)

    attention._pdit_original = original
    return attention


class _FrameStreams:
    """Splits WanAnimate2's two token streams where its blocks' methods are entered (each routed through the block's
    own call, so hooks on the block, such as sharded weights' gathers, still run): the video's T frames
    (forward_gen) and the pose video's T - 1 (forward_pose), each frame-aligned over the plane of the patch
    embedding, once per forward; the rope tables per token, the frame length `hw` and the attention buffers to this
    rank's tokens and heads. The pose stream is split first (block 0 runs it first), so the sequence state ends on
    the video's layout, which the head's gather uses."""

    def __init__(self, model, state):
        self.state, self.pending, self.buffers = state, set(), None
        for block in model.blocks:
            _route(block, "forward_pose", self, self.pose)
            _route(block, "forward_gen", self, self.gen)

    def begin_forward(self) -> None:
        self.pending, self.buffers = {"pose", "gen"}, None

    def pose(self, block, args):
        x, e, freqs, *rest = args
        s = self.state
        if "pose" in self.pending:
            self.pending.discard("pose")
            x = s.split_frames(x, 1)
        frames = freqs.shape[1] // s.plane  # the pose's frames: its rope table is per token
        return (x, e, freqs.index_select(1, s.local_positions(freqs.device, frames=frames)), *rest)

    def gen(self, block, args):
        x, e, freqs, context, k_pose, v_pose, frames, _hw, buffers, *rest = args
        s = self.state
        if "gen" in self.pending:
            self.pending.discard("gen")
            x = s.split_frames(x, 1)
        if buffers is not None:
            buffers = self._buffers(x, block.self_attn)
        e, freqs = s.split_per_token(e, 1), s.split_per_token(freqs, 1)
        return (x, e, freqs, context, k_pose, v_pose, frames, s.main_local_len // frames, buffers, *rest)

    def _buffers(self, x, attn):
        """ComfyUI's per-forward key / value / output buffers of forward_gen, for this rank's tokens and heads."""
        b, n, heads, d = x.shape[0], x.shape[1], attn.num_heads, attn.head_dim
        hw = self.state.main_local_len // self.state.grid[0]
        if self.buffers is None or self.buffers[2].shape != (b, n, heads * d):
            kv = (b, n + hw, heads, d)
            self.buffers = (x.new_empty(kv), x.new_empty(kv), x.new_empty(b, n, heads * d))
        return self.buffers


def _route(block, name: str, streams: _FrameStreams, split_args) -> None:
    """`block.<name>(...)` through `block(...)` (its forward that method for the call), its positional arguments cut
    by `split_args(block, args)` first and the streams' sequence state active for its attention."""
    bound = types.MethodType(getattr(type(block), name), block)

    def call(*args, **kwargs):
        args = split_args(block, args) if streams.state.degree > 1 else args
        block.forward = bound
        ACTIVE_FRAME_STREAMS.append(streams.state)
        try:
            return block(*args, **kwargs)
        finally:
            ACTIVE_FRAME_STREAMS.pop()
            del block.forward

    setattr(block, name, call)


def forward(model, x, timestep, context, clip_fea=None, transformer_options=None, **extras):
    """ComfyUI's WanModel._forward (its DIFFUSION_MODEL wrappers already ran in the ComfyUI process), with the
    patches that crossed from the ComfyUI process (block replacements such as SkipLayerGuidanceDiT's), which
    ComfyUI's own code applies or ignores exactly as natively."""
    transformer_options = transformer_options or {}
    streams = getattr(model, "_pdit_streams", None)
    if streams is not None:
        streams.begin_forward()
    return model._forward(x, timestep, context, clip_fea=clip_fea, transformer_options=transformer_options,
                          **extras)
