"""Wan 2.1 / 2.2 DiT: detection, build, key map and parallel plan, on diffusers' WanTransformer3DModel.

Covers Wan 2.1 T2V / I2V / FLF2V, Wan 2.2 A14B (each expert is a Wan 2.1 14B-layout file) and Wan 2.2
TI2V-5B (48-channel latent; ComfyUI's per-frame timesteps are mapped to diffusers' per-token ones).

The checkpoint is ComfyUI's / the original Wan key layout (`blocks.N.self_attn.q.weight`, ...);
diffusers' own converter gives the key map, applied to key names only so no tensor is read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelShape
from ..parallel.attention import local_attention, ulysses_attention
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit

FAMILY = "wan"
BLOCKS = "blocks"  # the transformer blocks (what torch.compile compiles, one by one)
HEAD_DIM = 128  # ComfyUI derives heads as dim // 128 for every Wan release

# Parallel plan as data (see parallel/plan.py).
PLAN = ParallelPlan(
    tp={
        "blocks.*.attn1.to_q": "colwise", "blocks.*.attn1.to_k": "colwise", "blocks.*.attn1.to_v": "colwise",
        "blocks.*.attn1.norm_q": "head_norm", "blocks.*.attn1.norm_k": "head_norm",
        "blocks.*.attn1.to_out.0": "rowwise",
        "blocks.*.attn2.to_q": "colwise", "blocks.*.attn2.to_k": "colwise", "blocks.*.attn2.to_v": "colwise",
        "blocks.*.attn2.add_k_proj": "colwise", "blocks.*.attn2.add_v_proj": "colwise",
        "blocks.*.attn2.norm_q": "head_norm", "blocks.*.attn2.norm_k": "head_norm",
        "blocks.*.attn2.norm_added_k": "head_norm",
        "blocks.*.attn2.to_out.0": "rowwise",
        "blocks.*.ffn.net.0.proj": "colwise", "blocks.*.ffn.net.2": "rowwise",
    },
    # rope gives (cos, sin) of shape (1, S, 1, D); blocks take (hidden, context, timestep_proj, rope).
    # Wan 2.2 TI2V-5B conditions every token on its own timestep: the condition embedder then returns
    # temb (B, S, D) and timestep_proj (B, S, 6D) (Wan 2.1 / A14B: (B, D) and (B, 6D), left whole).
    # Both are split with the tokens right there, so the blocks' modulation *and* the final norm_out
    # modulation each see only the local tokens; only proj_out's narrow output is gathered.
    seq_split_outputs={"rope": {0: SeqSplit(1), 1: SeqSplit(1)},
                       "condition_embedder": {0: SeqSplit(1, expected_ndim=3), 1: SeqSplit(1, expected_ndim=3)}},
    seq_split_inputs={"blocks.0": {0: SeqSplit(1)}},
    seq_gather_outputs={"proj_out": SeqGather(1)},
    attention_heads=("blocks.*.attn1", "blocks.*.attn2"),
)


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


def diffusers_config(shapes: dict) -> dict:
    """WanTransformer3DModel config from the checkpoint's tensor shapes (as ComfyUI detects it)."""
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
    c = diffusers_config(shapes)
    return ModelShape(FAMILY, c["num_attention_heads"], c["attention_head_dim"], c["ffn_dim"], c["num_layers"],
                      c["in_channels"], c["out_channels"], tuple(c["patch_size"]))


def key_map(source_keys) -> dict:
    """diffusers parameter name -> checkpoint key, from diffusers' own converter run on key names."""
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


def build(config: dict, device="meta"):
    """The diffusers model with no weights (meta), plus buffers computed for real."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    # rope tables are non-persistent buffers: recompute them where they will live
    model.rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], 1024).to(device)
    return model


# Modules diffusers keeps in fp32 whatever the compute dtype (its _keep_in_fp32_modules).
def keep_fp32(param_name: str) -> bool:
    from diffusers import WanTransformer3DModel

    parts = set(param_name.split("."))
    return any(m in parts for m in WanTransformer3DModel._keep_in_fp32_modules)


def _rotate(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanParallelAttnProcessor:
    """diffusers' WanAttnProcessor with the sequence split (Ulysses / Ring) on self-attention and
    local heads under tensor parallelism (`attn.heads` is already heads / tp)."""

    def __init__(self, seq_state, backend: str, call_state: dict):
        self.seq_state, self.backend, self.call_state = seq_state, backend, call_state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        img = None
        n_img = self.call_state.get("image_tokens", 0)
        if attn.add_k_proj is not None and n_img:
            # diffusers assumes a 512-token text context here; ComfyUI's varies, so count image tokens instead
            img, encoder_hidden_states = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
        is_self = encoder_hidden_states is None
        ctx = hidden_states if is_self else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(ctx)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(ctx).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        if is_self and self.seq_state is not None and self.seq_state.degree > 1:
            out = ulysses_attention(q, k, v, self.seq_state.groups, self.seq_state.key_valid_len)
        else:
            out = local_attention(q, k, v, self.backend)
        out = out.flatten(2, 3).type_as(q)
        if img is not None:
            k_img = attn.norm_added_k(attn.add_k_proj(img)).unflatten(2, (attn.heads, -1))
            v_img = attn.add_v_proj(img).unflatten(2, (attn.heads, -1))
            out = out + local_attention(q, k_img, v_img, self.backend).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def install_attention(model, seq_state, backend: str) -> None:
    model._pdit_call_state = {}  # per-call facts the processors read (image token count)
    for block in model.blocks:
        for attn in (block.attn1, block.attn2):
            attn.set_processor(WanParallelAttnProcessor(seq_state, backend, model._pdit_call_state))


def pad_to_patch(x: torch.Tensor, patch) -> torch.Tensor:
    """Pad T/H/W up to the patch size the way ComfyUI's Wan does (circular), so results match it."""
    pad = []
    for i in range(x.ndim - 2):
        pad = [0, (-x.shape[i + 2]) % patch[i]] + pad
    return F.pad(x, pad, mode="circular") if any(pad) else x


def per_token_timestep(timestep: torch.Tensor, tokens: int) -> torch.Tensor:
    """ComfyUI's timestep convention -> diffusers'. ComfyUI's WAN22 passes (B, n) timesteps (one per
    latent frame when the first frame is a clean image, TI2V-5B) and its WanModel stretches each over
    the tokens with `repeat_e`; diffusers' WanTransformer3DModel wants (B,) or one per token (B, S)."""
    if timestep.ndim < 2:
        return timestep
    timestep = timestep.flatten(1)
    n = timestep.shape[1]
    if n == 1:
        return timestep[:, 0]
    repeats = tokens // n
    if repeats * n == tokens:
        return timestep.repeat_interleave(repeats, dim=1) if repeats > 1 else timestep
    return timestep.repeat_interleave(repeats + 1, dim=1)[:, :tokens]  # as repeat_e: the tail is cut


def forward(model, x, timestep, context, clip_fea=None):
    """ComfyUI's WanModel call convention on the diffusers model: pad, run, crop."""
    t, h, w = x.shape[2:]
    x = pad_to_patch(x, model.config.patch_size)
    tokens = math.prod(s // p for s, p in zip(x.shape[2:], model.config.patch_size))
    timestep = per_token_timestep(timestep, tokens)
    state = getattr(model, "_pdit_call_state", {})
    state["image_tokens"] = 0
    if clip_fea is not None:
        if model.condition_embedder.image_embedder is None:
            clip_fea = None  # a T2V model ignores CLIP vision input, as ComfyUI's does
        else:
            state["image_tokens"] = clip_fea.shape[1]
            pos = model.condition_embedder.image_embedder.pos_embed
            if pos is not None:  # FLF2V: ComfyUI passes (B, 2*257, C); diffusers views (2B, 257, C) in pairs
                clip_fea = clip_fea[:, :pos.shape[1]].reshape(-1, pos.shape[1] // 2, clip_fea.shape[-1])
    out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=context,
                encoder_hidden_states_image=clip_fea, return_dict=False)[0]
    return out[:, :, :t, :h, :w]
