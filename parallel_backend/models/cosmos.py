"""Cosmos Predict2 DiT (2B / 14B; text-to-image / video and video-to-world) on diffusers' CosmosTransformer3DModel.

The checkpoint is the released / ComfyUI layout (`net.blocks.N.self_attn.q_proj.weight`, ... as ComfyUI's
`comfy.ldm.cosmos.predict2.MiniTrainDIT` names them); diffusers' own converter gives the key map, applied to
key names only. The model is configured the way ComfyUI's detection configures MiniTrainDIT (patch 1x2x2,
padding-mask channel, AdaLN-LoRA 256, rope extrapolation by width and channels, fps ignored), except that the
depth and head count are read from the file (ComfyUI fixes them from the width: 2048 -> 28 x 16,
5120 -> 36 x 40) so any width loads.

The top-level forward is our own port of ComfyUI's MiniTrainDIT call (ComfyUI's convention: x (B, C, T, H, W)
with any extra concat channels already added, timesteps (B,) or one per latent frame (B, T), context (B, N, 1024))
on diffusers' submodules; the blocks are diffusers' with a parallel attention processor.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelShape
from ..parallel.attention import local_attention, ulysses_attention
from ..parallel.plan import ParallelPlan, SeqGather, SeqSplit

FAMILY = "cosmos_predict2"
BLOCKS = "transformer_blocks"  # the transformer blocks (what torch.compile compiles, one by one)
PATCH = (1, 2, 2)          # (t, h, w): every Predict2 release; ComfyUI's detection fixes it too
MAX_SIZE = (128, 240, 240)  # ComfyUI: max_frames 128, max_img_h / w 240 (only bounds the learnable embedding)

# Parallel plan as data (see parallel/plan.py). Cosmos' q/k norm is an RMSNorm over each head's own channels,
# so under TP a rank normalises its local heads with the full (head_dim,) weight: no head_norm entry, no collective.
PLAN = ParallelPlan(
    tp={
        "transformer_blocks.*.attn1.to_q": "colwise", "transformer_blocks.*.attn1.to_k": "colwise",
        "transformer_blocks.*.attn1.to_v": "colwise", "transformer_blocks.*.attn1.to_out.0": "rowwise",
        "transformer_blocks.*.attn2.to_q": "colwise", "transformer_blocks.*.attn2.to_k": "colwise",
        "transformer_blocks.*.attn2.to_v": "colwise", "transformer_blocks.*.attn2.to_out.0": "rowwise",
        "transformer_blocks.*.ff.net.0.proj": "colwise", "transformer_blocks.*.ff.net.2": "rowwise",
    },
    # rope gives (cos, sin) of shape (S, D). With one timestep per latent frame (video-to-world: the
    # conditioning frames are clean) the time embeddings are per token, (B, S, 3D) and (B, S, D), and are
    # split with the tokens so every block's modulation and the final norm_out see only the local tokens;
    # a plain (B,) timestep gives (B, 3D) / (B, D), left whole.
    seq_split_outputs={"rope": {0: SeqSplit(0), 1: SeqSplit(0)},
                       "time_tokens": {0: SeqSplit(1, expected_ndim=3), 1: SeqSplit(1, expected_ndim=3)}},
    seq_split_inputs={"transformer_blocks.0": {0: SeqSplit(1)}},
    seq_gather_outputs={"proj_out": SeqGather(1)},
    attention_heads=("transformer_blocks.*.attn1", "transformer_blocks.*.attn2"),
)

_PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.")


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# parts of later releases on the same block layout (Predict2.5's text projection, Transfer2.5's image context)
# that this port does not run: such files are refused rather than run without them
_NOT_PREDICT2 = ("crossattn_proj.", "img_context_proj.")


def detect(shapes: dict) -> bool:
    keys = {_strip(k) for k in shapes}
    # Predict2 (MiniTrainDIT); Cosmos 1 has `blocks.block0.blocks.0.block.attn...` and no `mlp.layer1`
    return ({"x_embedder.proj.1.weight", "blocks.0.mlp.layer1.weight", "blocks.0.self_attn.q_proj.weight",
             "blocks.0.self_attn.q_norm.weight"} <= keys
            and not any(k.startswith(_NOT_PREDICT2) for k in keys))


def _shapes(shapes: dict) -> dict:
    return {_strip(k): tuple(v[0]) for k, v in shapes.items()}


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


def diffusers_config(shapes: dict) -> dict:
    """CosmosTransformer3DModel config from the checkpoint's tensor shapes."""
    s = _shapes(shapes)
    width, patch_in = s["x_embedder.proj.1.weight"]
    head_dim = s["blocks.0.self_attn.q_norm.weight"][0]
    in_channels = patch_in // math.prod(PATCH) - 1  # ComfyUI: concat_padding_mask is always on
    return dict(
        in_channels=in_channels,
        out_channels=s["final_layer.linear.weight"][0] // math.prod(PATCH),
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        num_layers=1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks.")),
        mlp_ratio=s["blocks.0.mlp.layer1.weight"][0] / width,
        text_embed_dim=s["blocks.0.cross_attn.k_proj.weight"][1],
        adaln_lora_dim=s["blocks.0.adaln_modulation_self_attn.1.weight"][0],
        max_size=MAX_SIZE,
        patch_size=PATCH,
        rope_scale=_rope_scale(in_channels, width),
        concat_padding_mask=True,
        extra_pos_embed_type=None,  # ComfyUI never enables Predict2's extra per-block embedding
    )


def comfy_model_config(shapes: dict) -> tuple[str, dict]:
    """(ComfyUI supported_models class name, unet_config) for this file: ComfyUI's own Predict2 detection,
    with the depth and heads read from the file (ComfyUI only knows the 2B / 14B widths). The MODEL node
    builds ComfyUI's BaseModel (sampling, latent format, video-to-world mask concat) from it."""
    c = diffusers_config(shapes)
    t, h, w = c["rope_scale"]
    unet = dict(image_model="cosmos_predict2", max_img_h=MAX_SIZE[1], max_img_w=MAX_SIZE[2], max_frames=MAX_SIZE[0],
                in_channels=c["in_channels"], out_channels=c["out_channels"], patch_spatial=PATCH[1],
                patch_temporal=PATCH[0], model_channels=c["num_attention_heads"] * c["attention_head_dim"],
                num_blocks=c["num_layers"], num_heads=c["num_attention_heads"], mlp_ratio=c["mlp_ratio"],
                concat_padding_mask=True, crossattn_emb_channels=c["text_embed_dim"], pos_emb_cls="rope3d",
                pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True,
                adaln_lora_dim=c["adaln_lora_dim"], extra_per_block_abs_pos_emb=False,
                rope_h_extrapolation_ratio=h, rope_w_extrapolation_ratio=w, rope_t_extrapolation_ratio=t,
                extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0,
                rope_enable_fps_modulation=False)
    return ("CosmosI2VPredict2" if c["in_channels"] == 17 else "CosmosT2IPredict2"), unet


def model_shape(shapes: dict) -> ModelShape:
    c = diffusers_config(shapes)
    width = c["num_attention_heads"] * c["attention_head_dim"]
    return ModelShape(FAMILY, c["num_attention_heads"], c["attention_head_dim"], int(width * c["mlp_ratio"]),
                      c["num_layers"], c["in_channels"], c["out_channels"], PATCH)


def key_map(source_keys) -> dict:
    """diffusers parameter name -> checkpoint key, from diffusers' own converter run on key names."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    # the converter strips `net.`; other prefixes (a ComfyUI-saved file) are stripped here, values keep the key
    converted = convert_cosmos_transformer_checkpoint_to_diffusers({_strip(k): k for k in source_keys})
    bad = [k for k, v in converted.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"Cosmos key conversion needs tensor values for {bad[:3]}: unsupported variant")
    return dict(converted)


class CosmosRope(nn.Module):
    """ComfyUI's VideoRopePosition3DEmb (fps modulation off, as ComfyUI runs Predict2) in diffusers' (cos, sin)
    form, (S, head_dim) each; no length limit (diffusers' CosmosRotaryPosEmbed stops at max_size)."""

    def __init__(self, head_dim: int, rope_scale):
        super().__init__()
        self.dim_h = self.dim_w = head_dim // 6 * 2
        self.dim_t = head_dim - 2 * self.dim_h
        t, h, w = rope_scale
        self.theta = (10000.0 * t ** (self.dim_t / (self.dim_t - 2)), 10000.0 * h ** (self.dim_h / (self.dim_h - 2)),
                      10000.0 * w ** (self.dim_w / (self.dim_w - 2)))

    def forward(self, grid: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = grid
        seq = torch.arange(max(grid), dtype=torch.float32, device=device)

        def freqs(n, dim, theta):
            r = torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim
            return torch.outer(seq[:n], 1.0 / (theta ** r))

        ft, fh, fw = freqs(t, self.dim_t, self.theta[0]), freqs(h, self.dim_h, self.theta[1]), freqs(w, self.dim_w,
                                                                                                 self.theta[2])
        emb = torch.cat([ft[:, None, None, :].expand(t, h, w, -1), fh[None, :, None, :].expand(t, h, w, -1),
                         fw[None, None, :, :].expand(t, h, w, -1)], dim=-1).reshape(t * h * w, -1)
        emb = torch.cat([emb, emb], dim=-1)
        return torch.cos(emb), torch.sin(emb)


class TimeTokens(nn.Module):
    """Per-frame time embeddings (B*T, C) -> per token (B, T*H*W, C); a single timestep per row stays (B, C).
    A module so the plan can split its output with the tokens."""

    def forward(self, temb, embedded, batch: int, grid: tuple):
        t, h, w = grid
        if temb.shape[0] == batch:
            return temb, embedded
        return tuple(x.view(batch, t, 1, 1, -1).expand(-1, -1, h, w, -1).flatten(1, 3) for x in (temb, embedded))


def build(config: dict, device="meta"):
    """The diffusers model with no weights (meta); rope and the time-token expansion are our own modules."""
    from diffusers import CosmosTransformer3DModel

    with torch.device("meta"):
        model = CosmosTransformer3DModel(**config)
    model.rope = CosmosRope(config["attention_head_dim"], config["rope_scale"])  # holds no tensors
    model.time_tokens = TimeTokens()
    for block in model.transformer_blocks:
        for attn in (block.attn1, block.attn2):
            attn.norm_q.eps = attn.norm_k.eps = 1e-6  # ComfyUI's / the release's q/k RMSNorm eps (diffusers: 1e-5)
    return model


def keep_fp32(param_name: str) -> bool:
    """Modules diffusers keeps in fp32 whatever the compute dtype (its _keep_in_fp32_modules)."""
    from diffusers import CosmosTransformer3DModel

    parts = set(param_name.split("."))
    return any(m in parts for m in CosmosTransformer3DModel._keep_in_fp32_modules)


def _rotate(x, cos, sin):
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-2) = ComfyUI's apply_rotary_pos_emb, on
    (B, S, H, D) with cos / sin (S, D)."""
    x1, x2 = x.float().unflatten(-1, (2, -1)).unbind(-2)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None] + rotated * sin[:, None]).type_as(x)


class CosmosParallelAttnProcessor:
    """diffusers' CosmosAttnProcessor2_0 with the sequence split (Ulysses / Ring) on self-attention and local
    heads under tensor parallelism (`attn.heads` is already heads / tp; q/k norms are per head)."""

    def __init__(self, seq_state, backend: str):
        self.seq_state, self.backend = seq_state, backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        is_self = encoder_hidden_states is None
        ctx = hidden_states if is_self else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(ctx).unflatten(2, (attn.heads, -1)))
        v = attn.to_v(ctx).unflatten(2, (attn.heads, -1))
        if image_rotary_emb is not None:
            q, k = _rotate(q, *image_rotary_emb), _rotate(k, *image_rotary_emb)
        if is_self and self.seq_state is not None and self.seq_state.degree > 1:
            out = ulysses_attention(q, k, v, self.seq_state.groups, self.seq_state.key_valid_len)
        else:
            out = local_attention(q, k, v, self.backend)
        out = attn.to_out[0](out.flatten(2, 3).type_as(q))
        return attn.to_out[1](out)


def install_attention(model, seq_state, backend: str) -> None:
    for block in model.transformer_blocks:
        for attn in (block.attn1, block.attn2):
            attn.set_processor(CosmosParallelAttnProcessor(seq_state, backend))


def pad_to_patch(x: torch.Tensor, patch) -> torch.Tensor:
    """Pad T/H/W up to the patch size as ComfyUI's MiniTrainDIT does (common_dit.pad_to_patch_size, circular;
    the output is cropped back). Latents from ComfyUI's own nodes are multiples of the patch already."""
    pad = []
    for i in range(x.ndim - 2):
        pad = [0, (-x.shape[i + 2]) % patch[i]] + pad
    return F.pad(x, pad, mode="circular") if any(pad) else x


def forward(model, x, timestep, context, fps=None, padding_mask=None):
    """ComfyUI's MiniTrainDIT call (x, timesteps, context, fps, padding_mask) on the diffusers modules.

    fps is accepted and ignored, as ComfyUI's Predict2 ignores it (rope_enable_fps_modulation off).
    padding_mask: (B, 1, h, w), resized to the latent (nearest) as ComfyUI does; None = zeros (every caller
    in ComfyUI passes None)."""
    t, h, w = x.shape[2:]
    cfg = model.config
    x = pad_to_patch(x, cfg.patch_size)
    b, _, tp_, hp, wp = x.shape
    if cfg.concat_padding_mask:
        if padding_mask is None:
            padding_mask = torch.zeros(b, 1, hp, wp, dtype=x.dtype, device=x.device)
        else:
            from torchvision import transforms
            padding_mask = transforms.functional.resize(padding_mask.to(x.dtype), [hp, wp],
                                                        interpolation=transforms.InterpolationMode.NEAREST)
        x = torch.cat([x, padding_mask.unsqueeze(2).expand(-1, -1, tp_, -1, -1)], dim=1)
    p_t, p_h, p_w = cfg.patch_size
    grid = (tp_ // p_t, hp // p_h, wp // p_w)
    rope = model.rope(grid, x.device)
    hidden = model.patch_embed(x).flatten(1, 3)  # (B, S, D)

    if timestep.ndim == 1:
        timestep = timestep[:, None]
    timestep = timestep.flatten(1)
    if timestep.shape[1] not in (1, grid[0]):
        raise ValueError(f"Cosmos takes one timestep per row or one per latent frame ({grid[0]}), "
                         f"got timesteps of shape {tuple(timestep.shape)}")
    if timestep.shape[1] > 1 and bool((timestep == timestep[:, :1]).all()):
        timestep = timestep[:, :1]  # one value per row: the same embedding, without a per-token expansion
    temb, embedded = model.time_embed(hidden, timestep.flatten())  # (B*Tt, 3D), (B*Tt, D)
    temb, embedded = model.time_tokens(temb, embedded, b, grid)

    for block in model.transformer_blocks:
        hidden = block(hidden, context, embedded, temb, rope, None, None)
    hidden = model.norm_out(hidden, embedded, temb)
    hidden = model.proj_out(hidden)  # gathered to the full sequence here under sequence parallelism

    hidden = hidden.unflatten(2, (p_h, p_w, p_t, -1)).unflatten(1, grid)
    hidden = hidden.permute(0, 7, 1, 6, 2, 4, 3, 5).flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return hidden[:, :, :t, :h, :w]
