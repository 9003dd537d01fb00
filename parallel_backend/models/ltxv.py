"""LTX-Video (LTXV 0.9.x, 2B / 13B) on the host's own model class: ComfyUI's `comfy.ldm.lightricks.model.LTXVModel`,
built in each rank on the meta device exactly as ComfyUI's detection builds it for the file; this file is its
parallel plan as data.

The checkpoint's keys are the module paths (ComfyUI's prefix `model.diffusion_model.` stripped), so no key map
exists. ComfyUI's own detection configures the model for any size (it fixes the heads at 32 and reads the head dim
from the width; a file's metadata "config" may override both), so the pack uses it unchanged.

LTXVModel patchifies the latent into flat tokens (B, T * H * W, D) (patch 1 x 1 x 1), with a rope table and (for
image-to-video, keyframes) a timestep per token. The plan splits the tokens where they enter the first block that
runs, cuts each block's per-token keywords (the AdaLN timestep, one entry or one per token; the rope table) to this
rank's tokens, runs attn1 (self-attention) sequence-parallel, and gathers at `norm_out`'s output, before the final
modulation (whose embedded timestep is per token too) and the unpatchify. Guide tokens (LTXVAddGuide, keyframes) are
appended to the sequence before the blocks and scattered back after the head: they split like any token.

Two host versions differ in the rope's layout: ComfyUI 0.33 passes `pe` as a tuple (rotation matrix
(B, N, heads, head_dim / 2, 2, 2), split mode), 0.3.75 as one tensor (B, 1, N, width / 2, 2, 2); `plan_for` picks the
plan of the host the rank runs. Under TP each rank also takes its heads' part of that table (`_TPRope`), and the
q / k RMSNorm, which spans all heads' channels, all-reduces its mean square (head_norm).
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from ..config import ModelShape
from ..parallel.patch_points import BlockReplace, Tokens
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit
from ..weights.checkpoint import strip_prefix, stripped_shapes
from .ltxav import CONDS as AV_CONDS, ROPED as AV_ROPED, VIDEO_PLAN as AV_VIDEO_PLAN  # LTX-2 (models/ltxav.py)
from .ltxav import check_mesh as av_check_mesh, check_rows as av_check_rows, forward as av_forward
from .ltxav import install as av_install, model_shape as av_model_shape
from .ltxav import CROSSING_FLAGS as AV_CROSSING_FLAGS, host_forward as av_host_forward, proxy_attributes as av_proxy_attributes

FAMILY = "ltxv"
BLOCKS = "transformer_blocks"  # the transformer blocks (what torch.compile compiles, one by one)
SHARD_UNITS = (BLOCKS,)  # sharded-weights mode: one gather per block; the rest is held whole
PIPELINE_CLASSES = ("LTXVModel", "LTXAVModel")  # a plain loop over transformer_blocks (LTX-2: of (video, audio))
PATCH = (1, 1, 1)  # SymmetricPatchifier(1): one token per latent voxel
HEADS = 32  # ComfyUI's detection: attention_head_dim = width // 32 (num_attention_heads keeps its default, 32)

_ATTN = ("attn1", "attn2")
_BLOCK = "transformer_blocks.*"  # (in a path with more after it; fnmatch's * also matches dots)
# the blocks themselves, by index (one and two digits): a split entry on "transformer_blocks.*" would also hook
# every module inside the blocks (attn1 takes `pe` as a keyword too, and would cut it twice)
_BLOCKS = ("transformer_blocks.[0-9]", "transformer_blocks.[0-9][0-9]")
_BLOCK_KWARGS = {"timestep": SeqSplit(1, per_token=True, expected_ndim=3),
                 "pe": SeqSplit(1, per_token=True, expected_ndim=6, item=0)}
# Parallel plan as data (see parallel/plan.py), on ComfyUI 0.33's LTXVModel.
PLAN = ParallelPlan(
    # Megatron split of each block: q / k / v by output, the output projection by input (all-reduced), the per-head
    # gate (LTX 2.x files with gated attention) by head; the q / k RMSNorm spans all heads (head_norm)
    tp={**{f"{_BLOCK}.{a}.to_{p}": "host_colwise" for a in _ATTN for p in "qkv"},
        **{f"{_BLOCK}.{a}.to_out.0": "host_rowwise" for a in _ATTN},
        **{f"{_BLOCK}.{a}.to_gate_logits": "host_colwise" for a in _ATTN},
        **{f"{_BLOCK}.{a}.{n}_norm": "head_norm" for a in _ATTN for n in "qk"},
        f"{_BLOCK}.ff.net.0.proj": "host_colwise", f"{_BLOCK}.ff.net.2": "host_rowwise"},
    attention_heads=tuple(f"{_BLOCK}.{a}" for a in _ATTN), heads_attr="heads",
    # the tokens enter the first block that runs whole and are split there (a block replacement may skip block 0);
    # every block gets the AdaLN timestep (B, 1 or N, 6|9 x D) and the rope table per token: each rank keeps the
    # entries of its own tokens; the text, its mask and the prompt timestep stay whole
    seq_split_inputs={b: {0: SeqSplit(1, first_only=True)} for b in _BLOCKS},
    seq_split_kwargs={b: _BLOCK_KWARGS for b in _BLOCKS},
    seq_gather_outputs={"norm_out": SeqGather(1)},
    sequence_attention=(f"{_BLOCK}.attn1",),
)
# ComfyUI 0.3.75's LTXVModel: the rope table is one tensor (B, 1, N, width / 2, 2, 2), tokens at dim 2
PLAN_0375 = dataclasses.replace(
    PLAN, seq_split_kwargs={b: {**_BLOCK_KWARGS, "pe": SeqSplit(2, per_token=True, expected_ndim=6)} for b in _BLOCKS})

# LTXVModel's patch points: only the block replacement (`patches_replace["dit"][("double_block", i)]`, e.g.
# SkipLayerGuidanceDiT): img (B, N, D) in and out; vec / pe stay as the host passes them (the block's own split
# hooks cut them when the original block runs). LTXVModel applies no `patches`.
PATCH_POINTS: dict = {}
BLOCK_REPLACE = {("dit", "double_block"): BlockReplace(args={"img": Tokens(1)}, returns={"img": Tokens(1)})}

# The host classes of this family and the keyword inputs (ComfyUI conds) each takes: the text mask, the frame
# rate (the rope's time scale), the image-to-video / guide denoise mask (0.33: the tokens a guide keeps), the guide
# frames' pixel positions, and 0.33's guide attention entries and generated-keyframe slots.
VARIANTS = {
    "LTXVModel": dict(conds=("attention_mask", "frame_rate", "denoise_mask", "keyframe_idxs",
                             "guide_attention_entries", "generated_keyframes")),
    # LTX-2 audio + video (ComfyUI 0.33): its own plan and forward, models/ltxav.py
    "LTXAVModel": dict(conds=AV_CONDS, av=True),
}
NOT_YET: dict = {}  # host class -> why the pack cannot run it yet


def variant_of(class_name: str) -> dict:
    """The VARIANTS entry of a host class; raises with the class name and the reason for one the pack cannot run."""
    from .host import variant_entry
    return variant_entry(VARIANTS, NOT_YET, class_name, "LTX")


def conds_of(class_name: str) -> tuple:
    return variant_of(class_name)["conds"]


def proxy_attributes(class_name: str) -> dict:
    """What the host's BaseModel reads off its diffusion model in the ComfyUI process: the patchifier (process_timestep
    with a denoise mask: LTXVImgToVideo's start frame, guides), LTX-2's audio one too (models/ltxav.py)."""
    return av_proxy_attributes() if variant_of(class_name).get("av") else {"patchifier": _host_patchifier()}


def _host_patchifier():
    """The host's video patchifier as its LTXVModel builds it (0.33: start_end=True; 0.3.75's class has no such
    option)."""
    import inspect

    from comfy.ldm.lightricks.symmetric_patchifier import SymmetricPatchifier
    if "start_end" in inspect.signature(SymmetricPatchifier.__init__).parameters:
        return SymmetricPatchifier(1, start_end=True)
    return SymmetricPatchifier(1)


def host_forward(host_class, proxy, args, kwargs):
    """The host class's forward called on the proxy (LTX-2's splits its timestep pair first: models/ltxav.py)."""
    if variant_of(host_class.__name__).get("av"):
        return av_host_forward(host_class, proxy, args, kwargs)
    return host_class.forward(proxy, *args, **kwargs)


CROSSING_FLAGS = AV_CROSSING_FLAGS  # extra_conds flags that cross as conds (the proxy's BaseModel adds them)
FLOAT32_CONDS = ("a_timestep",)  # LTX-2's audio timestep, float32 as ComfyUI hands it


def check_mesh(model, config, path: str) -> None:
    """LTX-2's heads as built from the file's metadata (audio; LTX-2.5's video) must split by ulysses x tp."""
    if variant_of(type(model).__name__).get("av"):
        av_check_mesh(model, config, path)


def check_rows(class_name: str, timestep, extras: dict, rows: slice) -> None:
    if variant_of(class_name).get("av"):
        av_check_rows(timestep, extras, rows)


def _host_passes_rope_tuple(model) -> bool:
    """ComfyUI 0.33's LTX code (LTXBaseModel) hands the blocks `pe` as (rotation, split mode); 0.3.75's a tensor."""
    return hasattr(sys.modules["comfy.ldm.lightricks.model"], "LTXBaseModel")  # (LTX-2's class lives in av_model)


def plan_for(model) -> ParallelPlan:
    if variant_of(type(model).__name__).get("av"):
        return AV_VIDEO_PLAN
    return PLAN if _host_passes_rope_tuple(model) else PLAN_0375


def detect(shapes: dict) -> bool:
    keys = {strip_prefix(k) for k in shapes}
    return {"adaln_single.emb.timestep_embedder.linear_1.bias", "patchify_proj.weight",
            "transformer_blocks.0.attn1.to_q.weight"} <= keys


def _sizes(shapes: dict) -> dict:
    s = stripped_shapes(shapes)
    width, in_channels = s["patchify_proj.weight"]
    return dict(width=width, in_channels=in_channels, out_channels=s["proj_out.weight"][0],
                ffn=s["transformer_blocks.0.ff.net.0.proj.weight"][0],
                layers=1 + max(int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")))


def model_shape(shapes: dict) -> ModelShape:
    c = _sizes(shapes)
    video = ModelShape(FAMILY, HEADS, c["width"] // HEADS, c["ffn"], c["layers"], c["in_channels"],
                       c["out_channels"], PATCH)
    return av_model_shape(video, shapes) if file_class(shapes) == "LTXAVModel" else video


def diffusers_names(source_keys) -> dict:
    """diffusers parameter name -> checkpoint key: diffusers' LTX transformer uses ComfyUI's module names (its
    converter only renames `patchify_proj` / `adaln_single` / `q_norm` / `k_norm`), run on key names."""
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

    converted = convert_ltx_transformer_checkpoint_to_diffusers({k: k for k in source_keys})
    return {k: v for k, v in converted.items() if isinstance(v, str)}


AUDIO_KEY = "audio_adaln_single.linear.weight"  # ComfyUI 0.33's detection: "ltxav" where the file has it


def file_class(header: dict) -> str:
    """The LTX class a file asks for, as ComfyUI 0.33's detection reads its keys."""
    return "LTXAVModel" if AUDIO_KEY in {strip_prefix(k) for k in header} else "LTXVModel"


def host_has_class(name: str) -> bool:
    """Whether this ComfyUI defines the LTX model class (comfy.ldm.lightricks.model / av_model)."""
    import importlib

    for module in ("comfy.ldm.lightricks.model", "comfy.ldm.lightricks.av_model"):
        try:
            if hasattr(importlib.import_module(module), name):
                return True
        except ImportError:  # 0.3.75 has no av_model
            continue
    return False


def check_file_class(header: dict) -> str:
    """The LTX class the file asks for; refused where this ComfyUI lacks it (0.3.75 would build a video-only
    LTXVModel of an LTX-2 file, its audio unused). An LTX-2 GGUF is refused: ComfyUI builds LTX-2 from the
    safetensors file's metadata config (connector and audio layout), which a GGUF does not carry."""
    wanted = file_class(header)
    if wanted == "LTXAVModel" and getattr(header, "architecture", None) is not None:
        raise ValueError("it is an LTX-2 GGUF, which carries no metadata config (ComfyUI builds LTX-2's connectors and "
                         "audio stream from the safetensors file's), so the pack cannot build the model ComfyUI "
                         "would: load the LTX-2 safetensors or fp8 file (both run on every axis)")
    if not host_has_class(wanted):
        raise ValueError(f"its key {AUDIO_KEY} makes it ComfyUI's {wanted} (LTX-2 audio + video), which "
                         f"this ComfyUI does not have (it would build LTXVModel and sample another model): update "
                         f"ComfyUI to a release with {wanted}")
    return wanted


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>", storage: str | None = None):
    """ComfyUI's model for this file, on meta, as its detection builds it; a class the pack cannot run is refused."""
    from .host import build_host_model

    try:
        wanted = check_file_class(header)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if wanted not in VARIANTS:
        variant_of(wanted)
    model, model_config, prefix = build_host_model(header, compute_dtype, path, storage=storage)
    try:
        variant_of(type(model).__name__)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model, model_config, prefix


def install_attention(model, seq_state, backend: str) -> None:
    """Self-attention inside the plan's sequence-attention scope runs Ulysses / Ring: LTX's CrossAttention looks up
    `comfy.ldm.modules.attention.optimized_attention` at call time, which is wrapped once per rank process (calls
    outside the scope, the text cross-attention, are ComfyUI's own). Under TP each attention takes its heads' rope.
    A guide attention mask (LTXVAddGuide with strength < 1 or a pixel mask, 0.33) on a split sequence is refused."""
    import comfy.ldm.modules.attention as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)
    rope_dim = 2 if _host_passes_rope_tuple(model) else 3  # heads / channel pairs of the rope table
    roped = AV_ROPED if variant_of(type(model).__name__).get("av") else ("attn1",)
    for name, module in model.named_modules():
        to_q = getattr(module, "to_q", None)
        if name.rpartition(".")[2] in roped and getattr(to_q, "tp_size", 1) > 1:
            module.register_forward_pre_hook(_TPRope(rope_dim, to_q.tp_rank, to_q.tp_size), with_kwargs=True)
    _refuse_guide_mask_when_split(model, seq_state)
    if variant_of(type(model).__name__).get("av"):
        av_install(model, seq_state)


class _TPRope:
    """An attention's rope tables (`pe`, and LTX-2's cross-attention `k_pe`) cut to this TP rank's heads: ComfyUI
    applies a table over the full width (0.33: reshaping q to the table's head count), where a TP rank holds
    width / tp of q and k."""

    def __init__(self, dim: int, rank: int, size: int):
        self.dim, self.rank, self.size = dim, rank, size

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[self.dim] // self.size
        return t.narrow(self.dim, self.rank * n, n)

    def __call__(self, _module, args, kwargs):
        tables = {k: kwargs[k] for k in ("pe", "k_pe") if kwargs.get(k) is not None}
        if not tables:
            return None
        cut = {k: (self._local(pe[0]), *pe[1:]) if isinstance(pe, tuple) else self._local(pe) for k, pe in tables.items()}
        return args, {**kwargs, **cut}


def _refuse_guide_mask_when_split(model, seq_state) -> None:
    """ComfyUI 0.33 attenuates guide attention with a mask over the whole sequence (GuideAttentionMask: the guide
    tokens' columns and rows), which a rank's share of the queries and keys cannot apply: refused on a split call."""
    build_mask = getattr(model, "_build_guide_self_attention_mask", None)
    if build_mask is None:
        return

    def checked(*args, **kwargs):
        mask = build_mask(*args, **kwargs)
        if mask is not None and seq_state.degree > 1:
            raise ValueError("a guide with strength below 1 or a pixel mask (LTXVAddGuide / LTXVImgToVideoInplace "
                             "attention strength) masks the self-attention over the whole sequence, which the "
                             "sequence split (ulysses / ring) cannot apply: set ulysses and ring to 1 (use cfg / tp), "
                             "or set the guide's strength to 1")
        return mask

    model._build_guide_self_attention_mask = checked


def forward(model, x, timestep, context, attention_mask=None, frame_rate=25, transformer_options=None, **extras):
    """ComfyUI's LTXVModel._forward (its DIFFUSION_MODEL wrappers already ran in the ComfyUI process), with the
    patches that crossed from the ComfyUI process; LTX-2's through models/ltxav.py."""
    if variant_of(type(model).__name__).get("av"):
        return av_forward(model, x, timestep, context, attention_mask, frame_rate, transformer_options, **extras)
    return model._forward(x, timestep, context, attention_mask, frame_rate, transformer_options or {}, **extras)
