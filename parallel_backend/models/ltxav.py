"""LTX-2 (audio + video) on the host's own model class: ComfyUI 0.33's `comfy.ldm.lightricks.av_model.LTXAVModel`,
built by the LTX family (ltxv.py: detection, build, refusals) and run with this plan.

LTXAVModel's blocks take the pair (video tokens, audio tokens) and run, per stream, self-attention, text
cross-attention and a feed-forward, and between the streams two cross-attentions (video queries on audio keys and
audio queries on video keys). Both streams are split over the same sequence ranks, each by its own sequence state:
every rank holds a share of the video tokens and a share of the audio tokens, so every rank works on every call.
Each self-attention runs Ulysses / Ring on its own stream (the audio's heads are its own: ulysses x tp must divide
them too, see `model_shape`); each audio <-> video cross-attention gathers its keys / values (the other stream's
local tokens, projected, normed and roped on their own rank) to the whole stream and attends with the local
queries (the plans' `key_gather_attention`). Video gathers at `norm_out`, audio at `audio_norm_out`.

The video's per-token modulation arrives as ComfyUI's CompressedTimestep (one row per frame stretched over the
frame's tokens); each block gets it as `_RankTimestep`, the same rows and this rank's tokens' index into them, so the
ada values are the host's sums, picked per token.

LTX-2.3 files (LTX-2.5's are the same layout at other widths) set, in their metadata config, a per-head gate on every
attention (`to_gate_logits`: one output a head, column-split with the heads under TP like q / k / v), the text
cross-attention modulated by three more AdaLN rows of the stream's own timestep (cut per token with it) and by a prompt
timestep (one row per batch row: whole on every rank), gated text connectors (run whole on every rank) and split rope
(cut by token, and by head under TP, like the interleaved one): the plan is the same. Not run split (refused with what to change): reference audio
(ID-LoRA's `ref_audio`, trimmed off the whole stream before the audio head) is not a cond the ranks take; guide
attention masks as on LTXV.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelShape
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit, apply_sequence_parallel
from ..weights.checkpoint import stripped_shapes

# the blocks by index (one and two digits): fnmatch's * matches dots, so "transformer_blocks.*.attn1" would also
# name audio_attn1
_BLOCKS = ("transformer_blocks.[0-9]", "transformer_blocks.[0-9][0-9]")


def _in_blocks(suffix: str) -> tuple:
    return tuple(f"{b}.{suffix}" for b in _BLOCKS)



_ATTN = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
ROPED = ("attn1", "audio_attn1", "audio_to_video_attn", "video_to_audio_attn")  # the attentions given rope tables
_ROPE = SeqSplit(1, per_token=True, expected_ndim=6, item=0)  # 0.33's (rotation (B, N, heads, ...), split mode)
_PER_TOKEN = SeqSplit(1, per_token=True, expected_ndim=3)
_FF = ("ff", "audio_ff")

_TP_STYLES = {**{f"{a}.to_{p}": "host_colwise" for a in _ATTN for p in "qkv"},
              **{f"{a}.to_out.0": "host_rowwise" for a in _ATTN},
              **{f"{a}.to_gate_logits": "host_colwise" for a in _ATTN},  # gated attention (LTX 2.3 files): per head
              **{f"{a}.{n}_norm": "head_norm" for a in _ATTN for n in "qk"},  # spans all heads: all-reduced
              **{f"{f}.net.0.proj": "host_colwise" for f in _FF}, **{f"{f}.net.2": "host_rowwise" for f in _FF}}
_TP = {p: style for suffix, style in _TP_STYLES.items() for p in _in_blocks(suffix)}

# The video stream's plan (the rank's main sequence state): the first item of the blocks' (video, audio) input, the
# video's rope tables; its per-token modulation (CompressedTimestep) is cut by `_cut_video_timesteps`. The TP layers
# of both streams are here (TP is one transform); the video -> audio cross-attention's keys are video tokens.
VIDEO_PLAN = ParallelPlan(
    tp=_TP, attention_heads=tuple(p for a in _ATTN for p in _in_blocks(a)), heads_attr="heads",
    seq_split_inputs={b: {0: SeqSplit(1, first_only=True, item=0)} for b in _BLOCKS},
    seq_split_kwargs={b: {"v_pe": _ROPE, "v_cross_pe": _ROPE} for b in _BLOCKS},
    seq_gather_outputs={"norm_out": SeqGather(1)},
    sequence_attention=_in_blocks("attn1"),
    key_gather_attention=_in_blocks("video_to_audio_attn"),
)
# The audio stream's plan (a second sequence state over the same ranks): the second item of the blocks' input, its
# rope tables and its per-token timesteps (plain tensors, one entry per audio token or one for all).
AUDIO_PLAN = ParallelPlan(
    seq_split_inputs={b: {0: SeqSplit(1, first_only=True, item=1)} for b in _BLOCKS},
    seq_split_kwargs={b: {"a_pe": _ROPE, "a_cross_pe": _ROPE, "a_timestep": _PER_TOKEN,
                          "a_cross_scale_shift_timestep": _PER_TOKEN, "a_cross_gate_timestep": _PER_TOKEN}
                      for b in _BLOCKS},
    seq_gather_outputs={"audio_norm_out": SeqGather(1)},
    sequence_attention=_in_blocks("audio_attn1"),
    key_gather_attention=_in_blocks("audio_to_video_attn"),
)
_VIDEO_TIMESTEPS = ("v_timestep", "v_cross_scale_shift_timestep", "v_cross_gate_timestep")

# ComfyUI conds LTXAVModel takes: LTXV's, the audio timestep the proxy hands on (LTXAVModel.forward's
# (video, audio) timestep pair), the audio denoise mask, and the stream shapes of the packed latent
CONDS = ("attention_mask", "frame_rate", "denoise_mask", "keyframe_idxs", "guide_attention_entries",
         "generated_keyframes", "a_timestep", "audio_denoise_mask", "latent_shapes", "unprocessed_ltxav_embeds")
# the text encoder's flag the host's LTXAV BaseModel reads in extra_conds (LTX 2.3's raw text is as wide as processed
# text): the proxy has no text connectors, so the flag crosses as a constant cond and the ranks run them
CROSSING_FLAGS = ("unprocessed_ltxav_embeds",)


def proxy_attributes() -> dict:
    """What ComfyUI's LTXAV BaseModel reads off its diffusion model in the ComfyUI process: the patchifiers
    (process_timestep with denoise masks, context windows), the host's own as LTXAVModel builds them."""
    from comfy.ldm.lightricks.symmetric_patchifier import AudioPatchifier, SymmetricPatchifier

    return {"patchifier": SymmetricPatchifier(1, start_end=True), "a_patchifier": AudioPatchifier(1, start_end=True)}


def host_forward(host_class, proxy, args, kwargs):
    """LTXAVModel.forward on the proxy: the (video, audio) timestep pair becomes `a_timestep` as the host's forward
    makes it, then its parent's forward runs (the DIFFUSION_MODEL wrappers around the proxy's `_forward`): the host's
    own `super()` cannot bind to the proxy, which is no LTXAVModel."""
    import inspect

    bound = inspect.signature(host_class.forward).bind(proxy, *args, **kwargs)
    bound.apply_defaults()  # the host passes its own defaults on (attention_mask=None, frame_rate=25, ...)
    a = dict(bound.arguments)
    extra = a.pop("kwargs", {})
    timestep = a["timestep"]
    if isinstance(timestep, (tuple, list)) and len(timestep) == 2:
        timestep, extra["a_timestep"] = timestep
    else:
        extra["a_timestep"] = timestep
    return host_class.__mro__[1].forward(proxy, a["x"], timestep, a["context"], a["attention_mask"], a["frame_rate"],
                                         a["transformer_options"], a["keyframe_idxs"], **extra)


def audio_heads(shapes: dict) -> tuple[int, int]:
    """(heads, head dim) of the audio stream: ComfyUI reads them from the file's metadata config (defaults 32 x 64)."""
    import json

    config = json.loads((getattr(shapes, "metadata", None) or {}).get("config", "{}")).get("transformer", {})
    width = stripped_shapes(shapes)["audio_patchify_proj.weight"][0]
    heads = config.get("audio_num_attention_heads", 32)
    return heads, width // heads


def model_shape(video: ModelShape, shapes: dict) -> ModelShape:
    """The video's shape with the heads both streams split by: ulysses x tp must divide the video's and the audio's
    heads, so validation sees their common divisor (the video width stays what TP checks)."""
    a_heads, _ = audio_heads(shapes)
    heads = math.gcd(video.num_heads, a_heads)
    return ModelShape(video.family, heads, video.dim // heads, video.ffn_dim, video.num_layers,
                      video.in_channels, video.out_channels, video.patch_size)


def check_mesh(model, config, path: str) -> None:
    """Both streams' heads as ComfyUI built them from the file's metadata (the audio's; LTX-2.5's video heads, 24
    where the pack's shape assumes ComfyUI's default 32) must divide by ulysses x tp."""
    split = config.ulysses * config.tp
    for stream, heads in (("video", model.num_attention_heads), ("audio", model.audio_num_attention_heads)):
        if heads % split:
            raise ValueError(f"{path}: LTX-2's {stream} stream has {heads} attention heads, which do not divide by "
                             f"ulysses x tp = {config.ulysses} x {config.tp}: choose ulysses x tp among "
                             f"{[d for d in range(1, heads + 1) if heads % d == 0]}, and use ring for the rest")


def check_rows(timestep, extras: dict, rows: slice) -> None:
    """LTXAVModel gates each audio <-> video cross-attention by the largest timestep of the other stream over the
    whole call (every row and token): a replica's share of the rows sees the same only where every row's largest
    value is the batch's (cond and uncond at one sigma)."""
    for t in (timestep, extras.get("a_timestep", timestep)):  # every replica refuses alike
        if t.dim() and bool((t.reshape(t.shape[0], -1).amax(1) != t.max()).any()):
            raise ValueError("LTX-2 gates its audio <-> video cross-attention by the largest timestep of the whole "
                             "batch, and this call's rows differ in it, which splitting the rows over cfg / dp "
                             "replicas would change: set cfg and dp to 1 (use ulysses / ring / tp)")


def install(model, video_state) -> None:
    """The audio stream's plan on its own sequence state (kept in step with the video's by `forward`), the video
    timesteps' cut to this rank's tokens, the heads' rope under TP."""
    from ..parallel.plan import SequenceState

    audio_state = SequenceState(video_state.groups, video_state.index)
    apply_sequence_parallel(model, AUDIO_PLAN, audio_state, max_degree=2)  # every call that splits runs them
    model._pdit_audio_state = (audio_state, video_state)
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(_VideoTimesteps(video_state), with_kwargs=True)


class _VideoTimesteps:
    """Each block's video timesteps (CompressedTimestep: rows per frame or per token) as this rank's tokens' rows."""

    def __init__(self, state):
        self.state = state

    def __call__(self, _module, args, kwargs):
        s = self.state
        if not s.is_split or s.degree == 1:
            return None
        return args, {**kwargs, **{k: _rank_timestep(kwargs[k], s) for k in _VIDEO_TIMESTEPS if k in kwargs}}


def _rank_timestep(ct, state):
    """A CompressedTimestep cut to the tokens this rank holds (padding takes the last token's row)."""
    if ct is None or ct.data.shape[1] == 1:  # one row for every token
        return ct
    full = state.valid_len
    if ct.num_frames * ct.patches_per_frame != full:
        raise ValueError(f"LTX-2's video timestep has {ct.num_frames} x {ct.patches_per_frame} rows for {full} "
                         f"tokens, which the sequence split cannot cut: set ulysses and ring to 1 (use cfg / tp)")
    n = state.local_len
    tokens = torch.arange(state.index * n, state.index * n + n, device=ct.data.device).clamp(max=full - 1)
    return _rank_timestep_class()(ct.data, tokens // ct.patches_per_frame)


_RANK_TIMESTEP = None


def _rank_timestep_class():
    """`_RankTimestep`, a CompressedTimestep (the blocks test for the class), made once the host is imported."""
    global _RANK_TIMESTEP
    if _RANK_TIMESTEP is None:
        from comfy.ldm.lightricks.av_model import CompressedTimestep

        class _RankTimestep(CompressedTimestep):
            """Rows per frame (or token) and, per token of this rank, the index of its row: the host's sums on the
            rows, then picked per token (ComfyUI's own arithmetic, element by element)."""
            __slots__ = ("rows",)

            def __init__(self, data: torch.Tensor, rows: torch.Tensor):
                self.batch_size, self.num_frames, self.feature_dim = data.shape
                self.data, self.rows, self.patches_per_frame = data, rows, 1

            def expand(self):
                return self.data.index_select(1, self.rows)

            def expand_for_computation(self, scale_shift_table, batch_size, indices=slice(None, None)):
                values = super().expand_for_computation(scale_shift_table, batch_size, indices)
                return tuple(v.index_select(1, self.rows) for v in values)

        _RANK_TIMESTEP = _RankTimestep
    return _RANK_TIMESTEP


def forward(model, x, timestep, context, attention_mask=None, frame_rate=25, transformer_options=None,
            latent_shapes=None, **extras):
    """ComfyUI's LTXAVModel._forward on the [video, audio] pair packed in `x` (the proxy packs it as comfy.utils
    does), its output packed alike; the audio timestep is LTXAVModel.forward's (the video's where none came)."""
    import comfy.utils

    audio_state, video_state = model._pdit_audio_state
    audio_state.use(video_state.groups, video_state.index)
    audio_state.begin_forward()
    if latent_shapes and len(latent_shapes) > 1:
        x = comfy.utils.unpack_latents(x, latent_shapes)
    if not isinstance(x, (list, tuple)):
        x = [x]  # a video-only call: LTXAVModel runs with an empty audio stream
    extras.setdefault("a_timestep", timestep)
    # the text connectors run here (the proxy has none): ComfyUI's LTXAV.extra_conds step, with its flag
    context = model.preprocess_text_embeds(context, unprocessed=bool(extras.pop("unprocessed_ltxav_embeds", False)))
    out = model._forward(list(x), timestep, context, attention_mask, frame_rate, transformer_options or {}, **extras)
    return comfy.utils.pack_latents(out)[0] if isinstance(out, (list, tuple)) else out
