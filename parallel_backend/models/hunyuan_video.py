"""HunyuanVideo 1.5 (and 1.0, its I2V variants) on the host's own model class: ComfyUI's
`comfy.ldm.hunyuan_video.model.HunyuanVideo` (supported_models HunyuanVideo, HunyuanVideoI2V, HunyuanVideoSkyreelsI2V,
HunyuanVideo15, HunyuanVideo15_SR_Distilled), built in each rank on the meta device; this file is its plan as data.

The checkpoint is the released layout (`double_blocks.N.img_attn_qkv.weight`, `img_mod.linear`, `txt_in.c_embedder.
linear_1`, ...), which ComfyUI renames to its module paths at load (supported_models.HunyuanVideo.
process_unet_state_dict; 0.3.75 names the q / k norms `.scale`, 0.33 `.weight`): the ranks read each parameter under
the file key the host's own renaming maps it from (`key_map`). Files already in a host's module names load as well.

How the tokens flow (Flux-style): the text is refined once per call (the token refiner, whole on every rank), then
`double_blocks` take the image tokens and the text as two streams with their own weights, joined in one attention;
`single_blocks` run on the joined sequence; the final layer takes the image tokens. ComfyUI 0.33 joins them text
first, 0.3.75 image first (`flipped_img_txt`). The plan splits the image tokens over the sequence ranks at the first
double block and keeps the text whole on every rank, counted once as attention keys (xDiT's joint attention:
`SeqSplit(joint=...)`); the rope table over both streams keeps its text rows whole and cuts its image rows (text
rows are position 0: no rotation); the host's text key mask (`attention_mask`) masks the text keys where they
count. The image tokens are gathered before the final layer (0.3.75 cuts them by the whole length first: a rank's
share plus some text, which the gather drops). Modulation is per row (one vector per sample), so it needs no cut.

TP: the fused q / k / v projections of both streams are split by thirds (each rank its heads of q, of k, of v), their
output projections and MLPs Megatron-style; the single blocks' fused linear1 [q | k | v | 4 x MLP] is split in 7
equal blocks and linear2 [attention | 4 x MLP] in 5 (mlp_ratio 4, ComfyUI's detection fixes it); the per-head q / k
RMSNorms act on head_dim and stay whole, as do the token refiner, the embedders and the final layer; the modulations
are split by their input features (row-parallel on the whole `vec`, one row per sample all-reduced).

1.5's distilled files run as they are: the SR distilled file (HunyuanVideo15_SR_Distilled) is 98 channels into the
patch embedding (whole on every rank, before the split), and its meanflow embedding (`time_r_in`, also in the
step-distilled files) reads the schedule's next sigma from the call's transformer_options (`sigmas`,
`sample_sigmas`), which cross to the ranks with each call (a cfg replica gets its rows' sigmas).

Refused by name: `guiding_frame_index` (1.0 I2V "v2 replace": modulation rows by token position) and `ref_latent`
(reference tokens cut off by position after the blocks), both conds the ranks do not take; the transformer_options
patches the class applies (attn1_patch / attn1_output_patch on 0.33, the `dit` double / single block replacements)
are not described here, so the ranks refuse them where the tokens are split. Pipeline stages cut the double and the
single blocks as one sequence (img and txt pass between double blocks, the joined sequence between single blocks).
"""
from __future__ import annotations

import torch

from ..config import ModelShape
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit

FAMILY = "hunyuan_video"
GGUF_ARCHITECTURES = ("hyvid",)  # city96's GGUF files name HunyuanVideo 1.0 and 1.5 "hyvid"
BLOCKS = "double_blocks"  # what torch.compile compiles block by block (the single blocks run eager)
SHARD_UNITS = ("double_blocks", "single_blocks")
# the planner's block bytes: a double block and the single block of the same index count as one (total exact)
BLOCK_PATTERN = r"(^|\.)(?:double|single)_blocks\.([0-9]+)\."
CLASSES = ("HunyuanVideo",)
# pipeline stages cut the double blocks, then the single blocks (1.0; 1.5 has none) as one sequence: a double
# block is called by keyword and passes img and txt on, a single block the joined sequence
PIPELINE_CLASSES = CLASSES
PIPELINE_BLOCKS = (("double_blocks", ("img", "txt")), ("single_blocks", ()))
HEAD_DIM = 128  # ComfyUI derives the heads as hidden // 128 and the rope as axes (16, 56, 56)

_STREAMS = ("img", "txt")
_DOUBLE = ("double_blocks.[0-9]", "double_blocks.[0-9][0-9]")
_SINGLE = ("single_blocks.[0-9]", "single_blocks.[0-9][0-9]")


def _plan(text_at: str) -> ParallelPlan:
    """The plan for a host that joins the text `text_at` ("before" / "after") the image tokens."""
    return ParallelPlan(
        tp={**{f"double_blocks.*.{s}_attn.qkv": "host_colwise_qkv" for s in _STREAMS},
            **{f"double_blocks.*.{s}_attn.proj": "host_rowwise" for s in _STREAMS},
            **{f"double_blocks.*.{s}_mlp.0": "host_colwise" for s in _STREAMS},
            **{f"double_blocks.*.{s}_mlp.2": "host_rowwise" for s in _STREAMS},
            "single_blocks.*.linear1": "host_colwise_7chunks", "single_blocks.*.linear2": "host_rowwise_5chunks",
            # the modulations (hidden -> 6 / 3 x hidden: a third of a 1.5 double block's weights) split by their
            # input features, their one row per sample all-reduced
            **{f"double_blocks.*.{s}_mod.lin": "host_rowwise_sliced_input" for s in _STREAMS},
            "single_blocks.*.modulation.lin": "host_rowwise_sliced_input"},
        # a double block views its qkv by num_heads; a single block splits linear1's output by hidden_size and
        # mlp_hidden_dim_first and views by num_heads: all three become this rank's share
        attention_heads=tuple((p, "num_heads") for p in _DOUBLE + _SINGLE)
        + tuple((p, a) for p in _SINGLE for a in ("hidden_size", "mlp_hidden_dim_first")),
        # block(img=, txt=, vec=, pe=, attn_mask=, ...): the image tokens split at the first double block, the text
        # recorded (whole), the rope table (B, 1, txt + img, 64, 2, 2) cut to [text | this rank's image tokens];
        # single blocks get the joined sequence already local, and the same table
        seq_split_kwargs={"double_blocks.*": {"img": SeqSplit(1, first_only=True), "txt": SeqSplit(1, joint=text_at),
                                              "pe": SeqSplit(2, per_token=True)},
                          "single_blocks.*": {"pe": SeqSplit(2, per_token=True)}},
        seq_gather_inputs={"final_layer": {0: SeqGather(1, share_first=True)}},
        sequence_attention=tuple(_DOUBLE + _SINGLE),
    )


PLAN = _plan("before")          # ComfyUI 0.33 (and newer): text first
PLAN_IMAGE_FIRST = _plan("after")  # ComfyUI 0.3.75: image first (DoubleStreamBlock.flipped_img_txt)


def plan_for(model) -> ParallelPlan:
    """The plan for the class as this host built it (which stream its joined sequence starts with)."""
    blocks = getattr(model, "double_blocks", None) or []
    return PLAN_IMAGE_FIRST if blocks and getattr(blocks[0], "flipped_img_txt", False) else PLAN


# what the host's BaseModel reads off its diffusion model in the ComfyUI process: HunyuanVideo15.concat_cond sizes the
# image / mask channels from img_in.proj.weight's shape (the proxy's patch embedding, same shape)
PATCH_EMBEDDING_ALIASES = ("img_in.proj",)
PATCH_POINTS: dict = {}  # attn1_patch / attn1_output_patch (0.33) see the joint sequence: refused where split
REFUSED_CONDS = ("guiding_frame_index", "ref_latent")


# ---- the file: detection, ComfyUI's config and names --------------------------------------------------------------
def _stripped(shapes: dict) -> dict:
    """key -> shape, ComfyUI's diffusion-model prefix stripped (a header's values are (shape, dtype))."""
    out = {}
    for k, v in shapes.items():
        shape = v[0] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (tuple, list)) else v
        out[k.removeprefix("model.diffusion_model.")] = tuple(shape)
    return out


def detect(shapes: dict) -> bool:
    keys = set(_stripped(shapes))
    return {"img_in.proj.weight", "txt_in.individual_token_refiner.blocks.0.norm1.weight",
            "final_layer.linear.weight"} <= keys and any(k.startswith("double_blocks.0.") for k in keys)


def _count(keys, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)), default=-1)


def comfy_model_config(shapes: dict) -> tuple[str, dict]:
    """(ComfyUI supported_models class name, unet_config) as ComfyUI's own HunyuanVideo detection reads the shapes
    (comfy/model_detection.py; the class by its unet_config match: 1.5 has vision_in 1152, SR-distilled 98
    input channels, 1.0 I2V 33, SkyReels I2V 32)."""
    s = _stripped(shapes)
    keys = set(s)
    in_w, out_w = s["img_in.proj.weight"], s["final_layer.linear.weight"]
    patch = list(in_w[2:])
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    c = dict(image_model="hunyuan_video", in_channels=in_w[1], patch_size=patch,
             out_channels=out_w[0] // int(torch.tensor(patch).prod()), vec_in_dim=768 if has("vector_in.") else None,
             axes_dim=[64, 64] if len(patch) == 2 else [16, 56, 56], meanflow=has("time_r_in."),
             context_in_dim=s["txt_in.input_embedder.weight"][1], hidden_size=in_w[0], mlp_ratio=4.0,
             num_heads=in_w[0] // HEAD_DIM, depth=_count(keys, "double_blocks."),
             depth_single_blocks=_count(keys, "single_blocks."), theta=256, qkv_bias=True,
             byt5="byt5_in.fc1.weight" in keys, guidance_embed=has("guidance_in."),
             use_cond_type_embedding="cond_type_embedding.weight" in keys,
             vision_in_dim=s["vision_in.proj.0.weight"][0] if "vision_in.proj.0.weight" in keys else None)
    if "meanflow_sum" in _host_params():  # ComfyUI 0.33 (not 0.3.75): 1.5's meanflow sums its two time vectors
        c["meanflow_sum"] = c["vision_in_dim"] is not None
    if c["vision_in_dim"] == 1152:
        name = "HunyuanVideo15_SR_Distilled" if c["in_channels"] == 98 else "HunyuanVideo15"
    else:
        name = {33: "HunyuanVideoI2V", 32: "HunyuanVideoSkyreelsI2V"}.get(c["in_channels"], "HunyuanVideo")
    return name, c


def _host_params() -> tuple:
    """The fields of this host's HunyuanVideoParams (the class takes exactly these) where the host's model code is
    already imported (the ComfyUI process), else (). Never imported from here: a rank imports ComfyUI only once its
    device and flags are set."""
    import dataclasses
    import sys

    host = sys.modules.get("comfy.ldm.hunyuan_video.model")
    return tuple(f.name for f in dataclasses.fields(host.HunyuanVideoParams)) if host is not None else ()


def model_shape(shapes: dict) -> ModelShape:
    c = comfy_model_config(shapes)[1]
    return ModelShape(FAMILY, c["num_heads"], HEAD_DIM, int(c["hidden_size"] * c["mlp_ratio"]),
                      c["depth"] + c["depth_single_blocks"], c["in_channels"], c["out_channels"],
                      tuple(c["patch_size"]))


def variant_of(class_name: str | None) -> dict:
    """The host class the pack runs for this family; anything else (or a host without it) is refused by name."""
    if class_name in CLASSES:
        return {}
    seen = ("this ComfyUI has no model class for this HunyuanVideo file" if class_name is None
            else f"ComfyUI detects this HunyuanVideo file as {class_name}")
    raise ValueError(f"{seen}; the parallel loader runs ComfyUI's own HunyuanVideo class "
                     f"(comfy.ldm.hunyuan_video.model): update ComfyUI to a release that has it for this file")


def host_class_name() -> str | None:
    """The supported_models class name of HunyuanVideo 1.5 on this host, or None where it has none."""
    import comfy.supported_models
    return "HunyuanVideo15" if hasattr(comfy.supported_models, "HunyuanVideo15") else None


def diffusers_names(source_keys) -> dict:
    """diffusers names of PEFT LoRAs: not mapped for this family (only ComfyUI's own LoRA names match)."""
    return {}


def file_keys(model_config, header: dict, prefix: str) -> dict:
    """parameter name -> checkpoint key: the host's own renaming (process_unet_state_dict) run on the file's key
    names, inverted."""
    names = {k[len(prefix):]: k for k in header if k.startswith(prefix)}
    return model_config.process_unet_state_dict(dict(names))


def key_map(model, prefix: str) -> dict:
    """The ranks' loader and LoRA merge read each parameter under this file key (set by `build`)."""
    return {n: model.file_key_of.get(n, prefix + n) for n, _ in model.named_parameters()}


def build(header: dict, compute_dtype: torch.dtype, path: str = "<file>", storage: str | None = None):
    """ComfyUI's HunyuanVideo for this file, on meta, as its detection builds it (the host's renaming of the file's
    keys kept for the load)."""
    from .host import build_host_model

    model, model_config, prefix = build_host_model(header, compute_dtype, path, storage=storage)
    variant_of(type(model).__name__)
    model.file_key_of = file_keys(model_config, header, prefix)
    return model, model_config, prefix


def conds_of(class_name: str) -> tuple:
    """The keyword inputs (ComfyUI conds) the ranks take: the pooled CLIP vector (1.0's `y`), the ByT5 glyph text
    (1.5), the SigLIP image tokens (1.5 I2V), the guidance number, the text key mask, the SR model's meanflow
    switch. All join the text or the per-row vector, whole on every rank. (guiding_frame_index and ref_latent are
    not taken: refused by name.)"""
    variant_of(class_name)
    return ("y", "txt_byt5", "clip_fea", "guidance", "attention_mask", "disable_time_r")


def install_attention(model, seq_state, backend: str) -> None:
    """The joint attention of both block kinds runs Ulysses / Ring inside the plan's scope: ComfyUI's Flux-style
    blocks call comfy.ldm.flux.math.attention, which calls that module's `optimized_attention`, wrapped once per
    rank process (the token refiner calls its own module's, untouched: the text is whole)."""
    import comfy.ldm.flux.math as host

    from ..parallel.attention import sequence_parallel_attention

    host.optimized_attention = sequence_parallel_attention(host.optimized_attention)


def forward(model, x, timestep, context, transformer_options=None, **conds):
    """ComfyUI's HunyuanVideo._forward (its DIFFUSION_MODEL wrappers already ran in the ComfyUI process)."""
    return model._forward(x, timestep, context, transformer_options=transformer_options or {}, **conds)
