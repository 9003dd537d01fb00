"""Synthetic checkpoints with the real key layout of each family, for tests, the demo and bench/.

No model hub is reachable where this pack is developed, so tiny random models (and files of real
shapes with few blocks) are written here in ComfyUI's / the original release's key layout.
"""
from __future__ import annotations

import contextlib
import json
import math

import torch

# name -> ComfyUI / original Wan config
WAN_PRESETS = {
    # 4 heads of 128 (ComfyUI derives heads as dim // 128), 2 blocks: ~10.7 M params
    "tiny": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256),
    "wan2.1-1.3b": dict(dim=1536, ffn_dim=8960, num_layers=30, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256),
    "tiny-i2v": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256,
                     i2v=True),
    "tiny-flf2v": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256,
                       i2v=True, flf2v=True),
    "wan2.1-14b": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256),
    # Wan 2.2 TI2V-5B: 48-channel latent in and out (ComfyUI: out_dim 48 -> WAN22_T2V, per-frame timesteps)
    "tiny-ti2v": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=48, out_dim=48, text_dim=4096, freq_dim=256),
    "wan2.2-ti2v-5b": dict(dim=3072, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48, text_dim=4096,
                           freq_dim=256),
    # Wan 2.2 A14B: two files (high-noise and low-noise expert) of the Wan 2.1 14B architecture; tiny
    # experts are "tiny" written with two seeds
    "wan2.2-a14b": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256),
    # variants ComfyUI detects by their extra keys: VACE (VaceWanModel: hint blocks at every 2nd block here, as the
    # 1.3B / 14B releases put 15 / 8 of them), Fun camera (CameraWanModel; 2.1: an I2V file, 2.2: T2V-like with
    # 36 channels), 2.2 Fun control (a Wan 2.2 14B expert with 48 input channels and the reference convolution)
    "tiny-vace": dict(dim=512, ffn_dim=1024, num_layers=4, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
                      vace_layers=2),
    "wan2.1-vace-14b": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=16, out_dim=16, text_dim=4096,
                            freq_dim=256, vace_layers=8),
    "tiny-camera": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=32, out_dim=16, text_dim=4096, freq_dim=256,
                        i2v=True, camera=True),
    "tiny-camera-2.2": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=36, out_dim=16, text_dim=4096,
                            freq_dim=256, camera=True),
    # HuMo 17B layout (36 input channels: x + ComfyUI's 20 concat channels); the audio projection has fixed sizes
    "tiny-humo": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256,
                      humo=True),
    "tiny-fun-control-2.2": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=48, out_dim=16, text_dim=4096,
                                 freq_dim=256, ref_conv_in_dim=16),
    # classes ComfyUI 0.33 added (0.3.75 lacks them): SCAIL / SCAIL-2 (I2V layout with 20 input channels, the pose
    # patch embedding, SCAIL-2's identity-mask embedding), WanDancer (I2V layout, 36 channels, the global patch
    # embedding and head, a second CLIP projection, the music encoder with its attention fused as the release
    # keeps it, and the music injector's 8 cross-attentions), and three picked by the file's metadata "config"
    # (ComfyUI's repackaged files carry it): Animate 2 (an I2V-layout file), causal forcing and FlowRVS (T2V).
    "tiny-scail": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=20, out_dim=16, text_dim=4096, freq_dim=256,
                       i2v=True, scail=1),
    "tiny-scail2": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=20, out_dim=16, text_dim=4096, freq_dim=256,
                        i2v=True, scail=2),
    "tiny-wandancer": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256,
                           i2v=True, wandancer=True),
    "tiny-animate2": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256,
                          i2v=True, metadata={"model_type": "animate2"}),
    "tiny-causal": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
                        metadata={"causal_ar": True}),
    "tiny-flowrvs": dict(dim=512, ffn_dim=1024, num_layers=2, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
                         metadata={"model_type": "flow_rvs"}),
}


def wan_shapes(dim, ffn_dim, num_layers, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
               patch=(1, 2, 2), i2v=False, clip_dim=1280, flf2v=False, vace_layers=0, vace_in_dim=96,
               camera=False, camera_in_dim=24, ref_conv_in_dim=0, humo=False, scail=0, wandancer=False) -> dict:
    """key -> shape of a Wan 2.x DiT in the original (ComfyUI) layout; with `vace_layers` the VACE blocks and
    hint embedding, with `camera` the Fun camera control adapter, with `ref_conv_in_dim` the 2.2 Fun reference
    convolution, with `scail` 1 / 2 SCAIL's pose (and SCAIL-2's mask) embedding, with `wandancer` WanDancer's music
    modules (the keys ComfyUI's detection reads to pick VaceWanModel / CameraWanModel / ref_conv / ...)."""
    s = {
        "patch_embedding.weight": (dim, in_dim, *patch), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.modulation": (1, 2, dim),
        "head.head.weight": (out_dim * math.prod(patch), dim), "head.head.bias": (out_dim * math.prod(patch),),
    }
    for i in range(num_layers):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                s[f"{b}{attn}.{p}.weight"] = (dim, dim)
                s[f"{b}{attn}.{p}.bias"] = (dim,)
            s[f"{b}{attn}.norm_q.weight"] = (dim,)
            s[f"{b}{attn}.norm_k.weight"] = (dim,)
        if i2v:
            for p in ("k_img", "v_img"):
                s[f"{b}cross_attn.{p}.weight"] = (dim, dim)
                s[f"{b}cross_attn.{p}.bias"] = (dim,)
            s[f"{b}cross_attn.norm_k_img.weight"] = (dim,)
        s[b + "norm3.weight"] = (dim,)
        s[b + "norm3.bias"] = (dim,)
        s[b + "ffn.0.weight"] = (ffn_dim, dim)
        s[b + "ffn.0.bias"] = (ffn_dim,)
        s[b + "ffn.2.weight"] = (dim, ffn_dim)
        s[b + "ffn.2.bias"] = (dim,)
    if i2v:
        s.update({"img_emb.proj.0.weight": (clip_dim,), "img_emb.proj.0.bias": (clip_dim,),
                  "img_emb.proj.1.weight": (clip_dim, clip_dim), "img_emb.proj.1.bias": (clip_dim,),
                  "img_emb.proj.3.weight": (dim, clip_dim), "img_emb.proj.3.bias": (dim,),
                  "img_emb.proj.4.weight": (dim,), "img_emb.proj.4.bias": (dim,)})
        if flf2v:  # first-last-frame: learned positions for two CLIP images of 257 tokens
            s["img_emb.emb_pos"] = (1, 514, clip_dim)
    if vace_layers:
        s["vace_patch_embedding.weight"], s["vace_patch_embedding.bias"] = (dim, vace_in_dim, *patch), (dim,)
        block = {k[len("blocks.0."):]: v for k, v in s.items() if k.startswith("blocks.0.") and "_img" not in k}
        for i in range(vace_layers):
            s.update({f"vace_blocks.{i}.{k}": v for k, v in block.items()})
            for proj in ("before_proj", "after_proj") if i == 0 else ("after_proj",):
                s[f"vace_blocks.{i}.{proj}.weight"], s[f"vace_blocks.{i}.{proj}.bias"] = (dim, dim), (dim,)
    if camera:
        s["control_adapter.conv.weight"] = (dim, camera_in_dim * 64, *patch[1:])
        s["control_adapter.conv.bias"] = (dim,)
        for c in ("conv1", "conv2"):
            s[f"control_adapter.residual_blocks.0.{c}.weight"] = (dim, dim, 3, 3)
            s[f"control_adapter.residual_blocks.0.{c}.bias"] = (dim,)
    if ref_conv_in_dim:
        s["ref_conv.weight"], s["ref_conv.bias"] = (dim, ref_conv_in_dim, *patch[1:]), (dim,)
    if humo:  # HuMo: per-frame audio cross-attention in every block, and the audio projection (ComfyUI's fixed sizes)
        for i in range(num_layers):
            a = f"blocks.{i}.audio_cross_attn_wrapper."
            for p, kv in (("q", dim), ("k", 1536), ("v", 1536), ("o", dim)):
                s[f"{a}audio_cross_attn.{p}.weight"], s[f"{a}audio_cross_attn.{p}.bias"] = (dim, kv), (dim,)
            s[f"{a}audio_cross_attn.norm_q.weight"] = s[f"{a}audio_cross_attn.norm_k.weight"] = (dim,)
            s[f"{a}norm1_audio.weight"] = s[f"{a}norm1_audio.bias"] = (dim,)
        for n, (o, i) in {"1": (512, 8 * 5 * 1280), "2": (512, 512), "3": (16 * 1536, 512)}.items():
            s[f"audio_proj.audio_proj_glob_{n}.layer.weight"] = (o, i)
            s[f"audio_proj.audio_proj_glob_{n}.layer.bias"] = (o,)
        s["audio_proj.audio_proj_glob_norm.layer.weight"] = s["audio_proj.audio_proj_glob_norm.layer.bias"] = (1536,)
    if scail:  # SCAIL: the pose video's patch embedding (input channels as the latent's); SCAIL-2: the masks' (28)
        for name, channels in (("pose", in_dim), ("mask", 28))[:scail]:
            s[f"patch_embedding_{name}.weight"], s[f"patch_embedding_{name}.bias"] = (dim, channels, *patch), (dim,)
    if wandancer:
        s.update(_wandancer_shapes(s, dim, in_dim, patch))
    return s


def _wandancer_shapes(s: dict, dim: int, in_dim: int, patch) -> dict:
    """WanDancer's keys beyond the I2V layout (ComfyUI's WanDancerModel with its fixed music sizes: 35 features,
    256 wide, 4 heads, 2 layers of ffn 1024; 8 injector cross-attentions), its music attention fused."""
    out = {"patch_embedding_global.weight": (dim, in_dim, *patch), "patch_embedding_global.bias": (dim,),
           "music_projection.weight": (256, 35), "music_projection.bias": (256,)}
    out.update({k.replace("img_emb.", "img_emb_refimage.", 1): v for k, v in s.items() if k.startswith("img_emb.")})
    out.update({k.replace("head.", "head_global.", 1): v for k, v in s.items() if k.startswith("head.")})
    for i in range(8):
        a = f"music_injector.injector.{i}."
        for p in "qkvo":
            out[f"{a}{p}.weight"], out[f"{a}{p}.bias"] = (dim, dim), (dim,)
        out[f"{a}norm_q.weight"] = out[f"{a}norm_k.weight"] = (dim,)
    for i in range(2):
        m = f"music_encoder.{i}."
        out[m + "self_attn.in_proj_weight"], out[m + "self_attn.in_proj_bias"] = (768, 256), (768,)
        out[m + "self_attn.out_proj.weight"], out[m + "self_attn.out_proj.bias"] = (256, 256), (256,)
        out[m + "linear1.weight"], out[m + "linear1.bias"] = (1024, 256), (1024,)
        out[m + "linear2.weight"], out[m + "linear2.bias"] = (256, 1024), (256,)
        for n in ("norm1", "norm2"):
            out[f"{m}{n}.weight"], out[f"{m}{n}.bias"] = (256,), (256,)
    return out


def random_tensor(key: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Values of a plausible scale for each kind of tensor, so activations stay O(1)."""
    t = torch.randn(shape, generator=generator)
    if "modulation" in key:
        return t / math.sqrt(shape[-1])
    if key.endswith("bias"):
        return t * 0.02
    if len(shape) == 1:  # norm weights
        return 1.0 + 0.1 * t
    fan_in = math.prod(shape[1:])
    return t / math.sqrt(fan_in)


def write_checkpoint(path: str, shapes: dict, dtype=torch.float32, seed: int = 0, prefix: str = "",
                     metadata: dict | None = None, fill: float | None = None) -> str:
    """Write a random checkpoint with these keys and shapes (safetensors), one tensor at a time: a file
    of real model shapes never has to fit in memory at once. `fill`: every value is this number instead
    (seconds instead of a minute for files of real sizes, where only memory and time are measured)."""
    g = torch.Generator().manual_seed(seed)

    def make(k, v):
        return torch.full(v, fill, dtype=dtype) if fill is not None else random_tensor(k, v, g).to(dtype)

    entries = [(prefix + k, tuple(v), dtype, (lambda k=k, v=v: make(k, v))) for k, v in shapes.items()]
    return write_safetensors_stream(path, entries, metadata)


def preset_shapes(preset: str, **overrides) -> dict:
    """wan_shapes of a preset (its `metadata` is the file's, not a shape)."""
    return wan_shapes(**{k: v for k, v in {**WAN_PRESETS[preset], **overrides}.items() if k != "metadata"})


def write_tiny_wan(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", fill: float | None = None,
                   **overrides) -> str:
    """A random Wan checkpoint of a preset's layout; a preset's `metadata` goes into the file's metadata "config" as
    its "transformer" entries, as ComfyUI's repackaged files carry it."""
    cfg = {**WAN_PRESETS[preset], **overrides}
    transformer = cfg.pop("metadata", None)
    metadata = {"config": json.dumps({"transformer": transformer})} if transformer else None
    return write_checkpoint(path, wan_shapes(**cfg), dtype=dtype, seed=seed, fill=fill, metadata=metadata)


# ---- Cosmos Predict2 (ComfyUI's MiniTrainDIT / the original release: `net.`-prefixed keys) ----------------
# name -> width, blocks, heads (head dim = width // heads), latent channels in (16: text-to-image / video,
# 17: video-to-world, whose extra channel is ComfyUI's "mask_inverted" concat)
COSMOS_PRESETS = {
    # 4 heads of 128 (the real head dim), 2 blocks: ~11 M params
    "tiny": dict(model_channels=512, num_blocks=2, num_heads=4, in_channels=16),
    "tiny-v2w": dict(model_channels=512, num_blocks=2, num_heads=4, in_channels=17),
    "cosmos-predict2-2b-t2i": dict(model_channels=2048, num_blocks=28, num_heads=16, in_channels=16),
    "cosmos-predict2-2b-v2w": dict(model_channels=2048, num_blocks=28, num_heads=16, in_channels=17),
    "cosmos-predict2-14b-t2i": dict(model_channels=5120, num_blocks=36, num_heads=40, in_channels=16),
    "cosmos-predict2-14b-v2w": dict(model_channels=5120, num_blocks=36, num_heads=40, in_channels=17),
}


def cosmos_predict2_shapes(model_channels, num_blocks, num_heads, in_channels=16, out_channels=16,
                           crossattn_emb_channels=1024, mlp_ratio=4.0, adaln_lora_dim=256, patch_spatial=2,
                           patch_temporal=1, concat_padding_mask=True) -> dict:
    """key -> shape of a Cosmos Predict2 DiT (ComfyUI's MiniTrainDIT names, without the `net.` prefix)."""
    d, head_dim, ffn = model_channels, model_channels // num_heads, int(model_channels * mlp_ratio)
    patch = patch_spatial * patch_spatial * patch_temporal
    s = {
        "x_embedder.proj.1.weight": (d, (in_channels + int(concat_padding_mask)) * patch),
        "t_embedder.1.linear_1.weight": (d, d),
        "t_embedder.1.linear_2.weight": (3 * d, d),
        "t_embedding_norm.weight": (d,),
        "final_layer.linear.weight": (patch * out_channels, d),
        "final_layer.adaln_modulation.1.weight": (adaln_lora_dim, d),
        "final_layer.adaln_modulation.2.weight": (2 * d, adaln_lora_dim),
    }
    for i in range(num_blocks):
        b = f"blocks.{i}."
        for attn, ctx in (("self_attn", d), ("cross_attn", crossattn_emb_channels)):
            s[f"{b}{attn}.q_proj.weight"] = (d, d)
            s[f"{b}{attn}.k_proj.weight"] = (d, ctx)
            s[f"{b}{attn}.v_proj.weight"] = (d, ctx)
            s[f"{b}{attn}.output_proj.weight"] = (d, d)
            s[f"{b}{attn}.q_norm.weight"] = (head_dim,)
            s[f"{b}{attn}.k_norm.weight"] = (head_dim,)
        s[b + "mlp.layer1.weight"] = (ffn, d)
        s[b + "mlp.layer2.weight"] = (d, ffn)
        for m in ("self_attn", "cross_attn", "mlp"):
            s[f"{b}adaln_modulation_{m}.1.weight"] = (adaln_lora_dim, d)
            s[f"{b}adaln_modulation_{m}.2.weight"] = (3 * d, adaln_lora_dim)
    return s


def cosmos_rope_ranges(head_dim: int) -> dict:
    """The rope frequency ranges the original Predict2 saves as buffers (diffusers detects Predict2 files by
    `net.pos_embedder.dim_spatial_range`); ComfyUI and the pack recompute them and ignore these."""
    dim_h = head_dim // 6 * 2
    dim_t = head_dim - 2 * dim_h
    return {"pos_embedder.dim_spatial_range": torch.arange(0, dim_h, 2)[: dim_h // 2].float() / dim_h,
            "pos_embedder.dim_temporal_range": torch.arange(0, dim_t, 2)[: dim_t // 2].float() / dim_t}


def write_tiny_cosmos(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", **overrides) -> str:
    """A random Cosmos Predict2 checkpoint in the released file layout: `net.`-prefixed keys (as ComfyUI's
    diffusion_models folder holds them), plus the two rope buffers the release carries."""
    cfg = {**COSMOS_PRESETS[preset], **overrides}
    g = torch.Generator().manual_seed(seed)
    entries = [("net." + k, tuple(v), dtype, (lambda k=k, v=v: random_tensor(k, v, g).to(dtype)))
               for k, v in cosmos_predict2_shapes(**cfg).items()]
    for k, t in cosmos_rope_ranges(cfg["model_channels"] // cfg["num_heads"]).items():
        entries.append(("net." + k, tuple(t.shape), torch.float32, lambda t=t: t))
    return write_safetensors_stream(path, entries)


# ---- Cosmos 1.0 (ComfyUI's GeneralDIT / the original release: `net.`-prefixed keys) ------------------------
# name -> width, blocks, heads (head dim = width // heads), latent channels in (16: text-to-world, 17:
# video-to-world, whose extra channel is ComfyUI's "mask_inverted" concat)
COSMOS1_PRESETS = {
    # 4 heads of 128 (the real head dim), 2 blocks
    "tiny": dict(model_channels=512, num_blocks=2, num_heads=4, in_channels=16),
    "tiny-v2w": dict(model_channels=512, num_blocks=2, num_heads=4, in_channels=17),
    "cosmos-1.0-7b-t2w": dict(model_channels=4096, num_blocks=28, num_heads=32, in_channels=16),
    "cosmos-1.0-7b-v2w": dict(model_channels=4096, num_blocks=28, num_heads=32, in_channels=17),
    "cosmos-1.0-14b-t2w": dict(model_channels=5120, num_blocks=36, num_heads=40, in_channels=16),
    "cosmos-1.0-14b-v2w": dict(model_channels=5120, num_blocks=36, num_heads=40, in_channels=17),
}


def cosmos1_shapes(model_channels, num_blocks, num_heads, in_channels=16, out_channels=16, crossattn_emb_channels=1024,
                   mlp_ratio=4.0, adaln_lora_dim=256, patch_spatial=2, patch_temporal=1, max_size=(128, 240, 240),
                   concat_padding_mask=True) -> dict:
    """key -> shape of a Cosmos 1.0 DiT (ComfyUI's GeneralDIT names, without the `net.` prefix): blocks `blockN`,
    each of three sub-blocks (self-attention, cross-attention, MLP) with their own AdaLN-LoRA modulation."""
    d, head_dim, ffn = model_channels, model_channels // num_heads, int(model_channels * mlp_ratio)
    patch = patch_spatial * patch_spatial * patch_temporal
    s = {
        "x_embedder.proj.1.weight": (d, (in_channels + int(concat_padding_mask)) * patch),
        "extra_pos_embedder.pos_emb_h": (max_size[1] // patch_spatial, d),
        "extra_pos_embedder.pos_emb_w": (max_size[2] // patch_spatial, d),
        "extra_pos_embedder.pos_emb_t": (max_size[0] // patch_temporal, d),
        "t_embedder.1.linear_1.weight": (d, d),
        "t_embedder.1.linear_2.weight": (3 * d, d),
    }
    for i in range(num_blocks):
        for j, ctx in ((0, d), (1, crossattn_emb_channels)):
            a = f"blocks.block{i}.blocks.{j}.block.attn."
            s[a + "to_q.0.weight"] = (d, d)
            s[a + "to_q.1.weight"] = (head_dim,)
            s[a + "to_k.0.weight"] = (d, ctx)
            s[a + "to_k.1.weight"] = (head_dim,)
            s[a + "to_v.0.weight"] = (d, ctx)
            s[a + "to_out.0.weight"] = (d, d)
            s[f"blocks.block{i}.blocks.{j}.adaLN_modulation.1.weight"] = (adaln_lora_dim, d)
            s[f"blocks.block{i}.blocks.{j}.adaLN_modulation.2.weight"] = (3 * d, adaln_lora_dim)
        s[f"blocks.block{i}.blocks.2.block.layer1.weight"] = (ffn, d)
        s[f"blocks.block{i}.blocks.2.block.layer2.weight"] = (d, ffn)
        s[f"blocks.block{i}.blocks.2.adaLN_modulation.1.weight"] = (adaln_lora_dim, d)
        s[f"blocks.block{i}.blocks.2.adaLN_modulation.2.weight"] = (3 * d, adaln_lora_dim)
    s.update({
        "affline_norm.weight": (d,),
        "final_layer.linear.weight": (patch * out_channels, d),
        "final_layer.adaLN_modulation.1.weight": (adaln_lora_dim, d),
        "final_layer.adaLN_modulation.2.weight": (2 * d, adaln_lora_dim),
    })
    return s


def write_tiny_cosmos1(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", **overrides) -> str:
    """A random Cosmos 1.0 checkpoint in the released file layout (`net.`-prefixed keys)."""
    cfg = {**COSMOS1_PRESETS[preset], **overrides}
    return write_checkpoint(path, cosmos1_shapes(**cfg), dtype=dtype, seed=seed, prefix="net.")


# ---- MiniMax H3 (ComfyUI 0.33's MiniMaxH3Model: joint audio + video, one packed stream) -------------------
# name -> sizes; the real release: 50 blocks of 5376 wide, 56 heads of 128, a 2-block text refiner on Qwen3-VL states
MINIMAX_PRESETS = {
    # 6 heads of 64 (divide by 2, 3, 6), 2 blocks, a rope of 8 frequencies per axis (rotates 48 of 64 channels)
    "tiny": dict(hidden=384, num_layers=2, refiner_layers=1, heads=6, head_dim=64, ffn=512, text_dim=96,
                 time_hidden=128, time_dim=64, rope_len=8),
    "minimax-h3": dict(hidden=5376, num_layers=50, refiner_layers=2, heads=56, head_dim=128, ffn=14336,
                       text_dim=5120, time_hidden=5376, time_dim=2688, rope_len=16),
}


def _minimax_block(prefix: str, hidden: int, inner: int, head_dim: int, ffn: int) -> dict:
    return {prefix + "norm1.weight": (hidden,), prefix + "norm2.weight": (hidden,),
            prefix + "attn.qkv_proj.weight": (3 * inner, hidden), prefix + "attn.q_norm.weight": (head_dim,),
            prefix + "attn.k_norm.weight": (head_dim,), prefix + "attn.out_proj.weight": (hidden, inner),
            prefix + "mlp.fc1.weight": (2 * ffn, hidden), prefix + "mlp.fc2.weight": (hidden, ffn)}


def minimax_shapes(hidden, num_layers, refiner_layers, heads, head_dim, ffn, text_dim, time_hidden, time_dim,
                   rope_len, latents=24, audio=32, time_in=256) -> dict:
    """key -> shape of a MiniMax H3 DiT (ComfyUI's MiniMaxH3Model names; the video patch is 1 x 2 x 2)."""
    inner = heads * head_dim
    s = {"video_patch_proj.weight": (hidden, 4 * latents), "video_patch_proj.bias": (hidden,),
         "audio_patch_proj.weight": (hidden, audio), "audio_patch_proj.bias": (hidden,),
         "condition_proj.weight": (hidden, text_dim), "condition_proj.bias": (hidden,),
         "time_embedder.proj_in.weight": (time_hidden, time_in), "time_embedder.proj_in.bias": (time_hidden,),
         "time_embedder.proj_out.weight": (time_dim, time_hidden), "time_embedder.proj_out.bias": (time_dim,),
         "rope.inv_freq": (rope_len,)}
    for i in range(refiner_layers):
        s.update(_minimax_block(f"token_refiner.blocks.{i}.", hidden, inner, head_dim, ffn))
    s["token_refiner.final_norm.weight"] = (hidden,)
    for i in range(num_layers):
        s.update(_minimax_block(f"blocks.{i}.", hidden, inner, head_dim, ffn))
        s[f"blocks.{i}.adaln_proj.linear.weight"] = (18 * hidden, time_dim)
        s[f"blocks.{i}.adaln_proj.linear.bias"] = (18 * hidden,)
    s.update({"final_layer.norm.weight": (hidden,), "final_layer.adaln_proj.linear.weight": (2 * hidden, time_dim),
              "final_layer.adaln_proj.linear.bias": (2 * hidden,), "final_layer.video_out.weight": (4 * latents, hidden),
              "final_layer.video_out.bias": (4 * latents,), "final_layer.audio_out.weight": (audio, hidden),
              "final_layer.audio_out.bias": (audio,)})
    return s


def write_tiny_minimax(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", **overrides) -> str:
    """A random MiniMax H3 checkpoint in ComfyUI's layout; the rope's inverse frequencies are a real geometric
    ladder (random ones would rotate far faster than any release)."""
    cfg = {**MINIMAX_PRESETS[preset], **overrides}
    g = torch.Generator().manual_seed(seed)
    n = cfg["rope_len"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(n, dtype=torch.float32) / n))
    entries = [(k, tuple(v), torch.float32 if k == "rope.inv_freq" else dtype,
                (lambda: inv_freq) if k == "rope.inv_freq" else (lambda k=k, v=v: random_tensor(k, v, g).to(dtype)))
               for k, v in minimax_shapes(**cfg).items()]
    return write_safetensors_stream(path, entries)
# ---- LTX-Video (ComfyUI's LTXVModel; the release's files hold these keys under `model.diffusion_model.`) --------
# name -> width (32 heads: ComfyUI's detection reads the head dim as width // 32), blocks, latent channels, text width
LTXV_PRESETS = {
    # 32 heads of 8, 2 blocks: ~3.8 M params
    "tiny": dict(width=256, num_layers=2, in_channels=128, caption_channels=4096),
    "ltxv-2b": dict(width=2048, num_layers=28, in_channels=128, caption_channels=4096),
    "ltxv-13b": dict(width=4096, num_layers=48, in_channels=128, caption_channels=4096),
}


def ltxv_shapes(width, num_layers, in_channels=128, caption_channels=4096, ffn_mult=4) -> dict:
    """key -> shape of an LTX-Video DiT (ComfyUI's LTXVModel names, without the `model.diffusion_model.` prefix)."""
    d, ffn = width, width * ffn_mult
    s = {"patchify_proj.weight": (d, in_channels), "patchify_proj.bias": (d,),
         "adaln_single.emb.timestep_embedder.linear_1.weight": (d, 256),
         "adaln_single.emb.timestep_embedder.linear_1.bias": (d,),
         "adaln_single.emb.timestep_embedder.linear_2.weight": (d, d),
         "adaln_single.emb.timestep_embedder.linear_2.bias": (d,),
         "adaln_single.linear.weight": (6 * d, d), "adaln_single.linear.bias": (6 * d,),
         "caption_projection.linear_1.weight": (d, caption_channels), "caption_projection.linear_1.bias": (d,),
         "caption_projection.linear_2.weight": (d, d), "caption_projection.linear_2.bias": (d,),
         "scale_shift_table": (2, d), "proj_out.weight": (in_channels, d), "proj_out.bias": (in_channels,)}
    for i in range(num_layers):
        b = f"transformer_blocks.{i}."
        for attn in ("attn1", "attn2"):
            for n in ("q_norm", "k_norm"):
                s[f"{b}{attn}.{n}.weight"] = (d,)
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{b}{attn}.{p}.weight"], s[f"{b}{attn}.{p}.bias"] = (d, d), (d,)
        s[b + "ff.net.0.proj.weight"], s[b + "ff.net.0.proj.bias"] = (ffn, d), (ffn,)
        s[b + "ff.net.2.weight"], s[b + "ff.net.2.bias"] = (d, ffn), (d,)
        s[b + "scale_shift_table"] = (6, d)
    return s


def write_tiny_ltxv(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", fill: float | None = None,
                    metadata: dict | None = None, **overrides) -> str:
    """A random LTX-Video checkpoint in the release's layout (`model.diffusion_model.` keys); `metadata`: the
    "transformer" entries of the file's metadata "config", as the release carries them."""
    cfg = {**LTXV_PRESETS[preset], **overrides}
    meta = {"config": json.dumps({"transformer": metadata})} if metadata else None
    return write_checkpoint(path, ltxv_shapes(**cfg), dtype=dtype, seed=seed, prefix="model.diffusion_model.",
                            metadata=meta, fill=fill)


# ---- HunyuanVideo (1.5 / 1.0): ComfyUI's HunyuanVideo class, saved in the released layout ---------------------------
# name -> sizes; HunyuanVideo 1.5 (8.3B): 54 double blocks of 2048 (16 heads of 128), no single blocks, Qwen2.5-VL text
# (3584), ByT5 glyph text, SigLIP image tokens (1152), a 32-channel latent (+ 32 image + 1 mask for I2V = 65 in)
HUNYUAN_PRESETS = {
    # 2 heads of 128 (ComfyUI derives heads as hidden // 128), one block of each kind, the 1.5 extras
    "tiny": dict(hidden=256, depth=1, single=1, text_dim=64, in_channels=65, out_channels=32, patch=(1, 1, 1),
                 byt5=True, vision=True, meanflow=False, guidance=False),
    "hunyuan-video-1.5": dict(hidden=2048, depth=54, single=0, text_dim=3584, in_channels=65, out_channels=32,
                              patch=(1, 1, 1), byt5=True, vision=True, meanflow=False, guidance=False),
    "hunyuan-video-1.0": dict(hidden=3072, depth=20, single=40, text_dim=4096, in_channels=16, out_channels=16,
                              patch=(1, 2, 2), byt5=False, vision=False, meanflow=False, guidance=True, vector=True),
    # 1.5's distilled releases at the tiny sizes. SR distilled (720p / 1080p_sr_distilled, ComfyUI's
    # HunyuanVideo15_SR_Distilled): 98 input channels (32 noise + HunyuanVideo15SuperResolution's 66: image, mask,
    # low-res latent, mask) and the meanflow `time_r_in`; step distilled (480p_i2v_step_distilled): `time_r_in` on the
    # 65-channel layout. (1.5's cfg-distilled files have the base layout: no guidance_in, cfg 1 in the sampler.)
    "tiny-sr-distilled": dict(hidden=256, depth=1, single=1, text_dim=64, in_channels=98, out_channels=32,
                              patch=(1, 1, 1), byt5=True, vision=True, meanflow=True, guidance=False),
    "tiny-step-distilled": dict(hidden=256, depth=1, single=1, text_dim=64, in_channels=65, out_channels=32,
                                patch=(1, 1, 1), byt5=True, vision=True, meanflow=True, guidance=False),
}
# ComfyUI's module names -> the released names (the inverse of supported_models.HunyuanVideo's renaming at load)
_HUNYUAN_RELEASED = (("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."),  # (first: the embedders' own names keep mlp.0)
                     ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."),
                     ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
                     ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
                     ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
                     ("time_in.in_layer.", "time_in.mlp.0."), ("time_in.out_layer.", "time_in.mlp.2."),
                     ("guidance_in.in_layer.", "guidance_in.mlp.0."), ("guidance_in.out_layer.", "guidance_in.mlp.2."),
                     ("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                     ("_attn.norm.query_norm.", "_attn_q_norm."), ("_attn.norm.key_norm.", "_attn_k_norm."),
                     (".norm.query_norm.", ".q_norm."), (".norm.key_norm.", ".k_norm."),
                     (".modulation.lin.", ".modulation.linear."))


def hunyuan_released_name(name: str) -> str:
    for comfy_name, released in _HUNYUAN_RELEASED:
        name = name.replace(comfy_name, released)
    return name


def _hunyuan_block_shapes(hidden: int) -> dict:
    """ComfyUI names of one double block's and one single block's tensors (mlp_ratio 4, q / k norms per head)."""
    d = {}
    for s in ("img", "txt"):
        d.update({f"{s}_mod.lin.weight": (6 * hidden, hidden), f"{s}_mod.lin.bias": (6 * hidden,),
                  f"{s}_attn.qkv.weight": (3 * hidden, hidden), f"{s}_attn.qkv.bias": (3 * hidden,),
                  f"{s}_attn.norm.query_norm.weight": (128,), f"{s}_attn.norm.key_norm.weight": (128,),
                  f"{s}_attn.proj.weight": (hidden, hidden), f"{s}_attn.proj.bias": (hidden,),
                  f"{s}_mlp.0.weight": (4 * hidden, hidden), f"{s}_mlp.0.bias": (4 * hidden,),
                  f"{s}_mlp.2.weight": (hidden, 4 * hidden), f"{s}_mlp.2.bias": (hidden,)})
    single = {"linear1.weight": (7 * hidden, hidden), "linear1.bias": (7 * hidden,),
              "linear2.weight": (hidden, 5 * hidden), "linear2.bias": (hidden,), "norm.query_norm.weight": (128,),
              "norm.key_norm.weight": (128,), "modulation.lin.weight": (3 * hidden, hidden),
              "modulation.lin.bias": (3 * hidden,)}
    return d, single


def _mlp_embedder(prefix: str, n_in: int, hidden: int) -> dict:
    return {prefix + "in_layer.weight": (hidden, n_in), prefix + "in_layer.bias": (hidden,),
            prefix + "out_layer.weight": (hidden, hidden), prefix + "out_layer.bias": (hidden,)}


def _hunyuan_refiner_shapes(hidden: int, text_dim: int) -> dict:
    s = {"txt_in.input_embedder.weight": (hidden, text_dim), "txt_in.input_embedder.bias": (hidden,),
         **_mlp_embedder("txt_in.t_embedder.", 256, hidden), **_mlp_embedder("txt_in.c_embedder.", text_dim, hidden)}
    for i in range(2):  # ComfyUI builds the refiner with 2 blocks
        b = f"txt_in.individual_token_refiner.blocks.{i}."
        s.update({b + "adaLN_modulation.1.weight": (2 * hidden, hidden), b + "adaLN_modulation.1.bias": (2 * hidden,),
                  b + "norm1.weight": (hidden,), b + "norm1.bias": (hidden,), b + "norm2.weight": (hidden,),
                  b + "norm2.bias": (hidden,), b + "self_attn.qkv.weight": (3 * hidden, hidden),
                  b + "self_attn.qkv.bias": (3 * hidden,), b + "self_attn.proj.weight": (hidden, hidden),
                  b + "self_attn.proj.bias": (hidden,), b + "mlp.0.weight": (4 * hidden, hidden),
                  b + "mlp.0.bias": (4 * hidden,), b + "mlp.2.weight": (hidden, 4 * hidden), b + "mlp.2.bias": (hidden,)})
    return s


def hunyuan_video_shapes(hidden, depth, single, text_dim, in_channels, out_channels, patch, byt5, vision, meanflow,
                         guidance, vector=False) -> dict:
    """ComfyUI module name -> shape of a HunyuanVideo DiT (its class's state dict; `hunyuan_released_name` gives the
    file's key)."""
    s = {"img_in.proj.weight": (hidden, in_channels, *patch), "img_in.proj.bias": (hidden,),
         **_mlp_embedder("time_in.", 256, hidden), **_hunyuan_refiner_shapes(hidden, text_dim)}
    if vector:
        s.update(_mlp_embedder("vector_in.", 768, hidden))
    if guidance:
        s.update(_mlp_embedder("guidance_in.", 256, hidden))
    double, single_block = _hunyuan_block_shapes(hidden)
    s.update({f"double_blocks.{i}.{k}": v for i in range(depth) for k, v in double.items()})
    s.update({f"single_blocks.{i}.{k}": v for i in range(single) for k, v in single_block.items()})
    if byt5:
        s.update({"byt5_in.layernorm.weight": (1472,), "byt5_in.layernorm.bias": (1472,),
                  "byt5_in.fc1.weight": (2048, 1472), "byt5_in.fc1.bias": (2048,),
                  "byt5_in.fc2.weight": (2048, 2048), "byt5_in.fc2.bias": (2048,),
                  "byt5_in.fc3.weight": (hidden, 2048), "byt5_in.fc3.bias": (hidden,)})
    if meanflow:
        s.update(_mlp_embedder("time_r_in.", 256, hidden))
    s.update({"final_layer.linear.weight": (out_channels * math.prod(patch), hidden),
              "final_layer.linear.bias": (out_channels * math.prod(patch),),
              "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
              "final_layer.adaLN_modulation.1.bias": (2 * hidden,)})
    if vision:
        s.update({"vision_in.proj.0.weight": (1152,), "vision_in.proj.0.bias": (1152,),
                  "vision_in.proj.1.weight": (1152, 1152), "vision_in.proj.1.bias": (1152,),
                  "vision_in.proj.3.weight": (hidden, 1152), "vision_in.proj.3.bias": (hidden,),
                  "vision_in.proj.4.weight": (hidden,), "vision_in.proj.4.bias": (hidden,),
                  "cond_type_embedding.weight": (3, hidden)})
    return s


def write_tiny_hunyuan_video(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", **overrides) -> str:
    """A random HunyuanVideo checkpoint in the released layout (the names ComfyUI renames at load)."""
    shapes = hunyuan_video_shapes(**{**HUNYUAN_PRESETS[preset], **overrides})
    return write_checkpoint(path, {hunyuan_released_name(k): v for k, v in shapes.items()}, dtype=dtype, seed=seed)


def write_hunyuan_video_lora(path: str, model_path: str, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                             magnitude: float = 0.1) -> None:
    """A random LoRA for the HunyuanVideo file `model_path` on every linear of its double blocks (q / k / v fused,
    projections, MLPs of both streams) and single blocks (fused linear1 / linear2), in the diffusion-pipe / musubi
    layout ComfyUI reads for this class: `diffusion_model.<released name>.lora_A.weight` / `lora_B` / `.alpha`."""
    from ..weights.reads import read_header

    header = read_header(model_path)
    layers = [k[:-len(".weight")] for k in header if k.endswith(".weight") and len(header[k][0]) == 2
              and k.startswith(("double_blocks.", "single_blocks.")) and "_mod." not in k and "modulation" not in k]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in sorted(layers):
        out_f, in_f = header[m + ".weight"][0]
        tensors[f"diffusion_model.{m}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * magnitude / rank ** 0.5
        tensors[f"diffusion_model.{m}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
        tensors[f"diffusion_model.{m}.alpha"] = torch.tensor(float(alpha))
    from safetensors.torch import save_file
    save_file(tensors, path)


def write_module_lora(path: str, model_path: str, modules, key_prefix: str = "", rank: int = 4, seed: int = 9) -> str:
    """A random rank-`rank` LoRA on `modules` of the file `model_path` (whose keys are `key_prefix` + module), in
    ComfyUI's names: `diffusion_model.<module>.lora_up.weight` / `lora_down` / `.alpha` (alpha 2)."""
    from safetensors.torch import save_file

    from ..weights.reads import read_header
    header, g, out = read_header(model_path), torch.Generator().manual_seed(seed), {}
    for m in modules:
        rows, cols = header[key_prefix + m + ".weight"][0]
        out[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.05
        out[f"diffusion_model.{m}.lora_down.weight"] = torch.randn(rank, cols, generator=g) / cols ** 0.5
        out[f"diffusion_model.{m}.alpha"] = torch.tensor(2.0)
    save_file(out, path)
    return path


# ---- Kandinsky 5 (ComfyUI 0.33's Kandinsky5 class: its module names are the file's keys) ----------------------------
# name -> sizes; ComfyUI's detection reads the width, time width, ffn, patch input and block counts (the text widths
# 3584 / 768 and 16 output channels are the class defaults); heads = width // sum(axes_dims), 64 below 1792 wide
KANDINSKY5_PRESETS = {
    # 6 heads of 64 (divide by 2, 3, 6), 1 text and 2 visual blocks, a video patch input (16 + 16 image + 1 mask) x 4
    "tiny": dict(model_dim=384, time_dim=64, ff_dim=512, visual_embed_dim=132, text_blocks=1, visual_blocks=2),
    "kandinsky5-lite-video": dict(model_dim=1792, time_dim=512, ff_dim=7168, visual_embed_dim=132, text_blocks=2,
                                  visual_blocks=32),
    "kandinsky5-pro-video": dict(model_dim=4096, time_dim=1024, ff_dim=16384, visual_embed_dim=132, text_blocks=4,
                                 visual_blocks=60),
    "kandinsky5-lite-image": dict(model_dim=2560, time_dim=512, ff_dim=10240, visual_embed_dim=64, text_blocks=2,
                                  visual_blocks=50),
}


def _kandinsky5_attention(prefix: str, d: int, head_dim: int) -> dict:
    s = {f"{prefix}{p}.weight": (d, d) for p in ("to_query", "to_key", "to_value", "out_layer")}
    s.update({f"{prefix}{p}.bias": (d,) for p in ("to_query", "to_key", "to_value", "out_layer")})
    s.update({prefix + "query_norm.weight": (head_dim,), prefix + "key_norm.weight": (head_dim,)})
    return s


def _kandinsky5_block(prefix: str, d: int, t: int, ff: int, head_dim: int, visual: bool) -> dict:
    mod = prefix + ("visual_modulation" if visual else "text_modulation") + ".out_layer."
    s = {mod + "weight": ((9 if visual else 6) * d, t), mod + "bias": ((9 if visual else 6) * d,),
         prefix + "feed_forward.in_layer.weight": (ff, d), prefix + "feed_forward.out_layer.weight": (d, ff),
         **_kandinsky5_attention(prefix + "self_attention.", d, head_dim)}
    if visual:
        s.update(_kandinsky5_attention(prefix + "cross_attention.", d, head_dim))
    return s


def kandinsky5_shapes(model_dim, time_dim, ff_dim, visual_embed_dim, text_blocks, visual_blocks) -> dict:
    """key -> shape of a Kandinsky 5 DiT (ComfyUI's Kandinsky5 names; patch 1 x 2 x 2, 16 output channels)."""
    d, t = model_dim, time_dim
    head_dim = 128 if d in (4096, 2560) else 64  # ComfyUI's detection: axes (32, 48, 48) or (16, 24, 24)
    s = {"time_embeddings.in_layer.weight": (t, d), "time_embeddings.in_layer.bias": (t,),
         "time_embeddings.out_layer.weight": (t, t), "time_embeddings.out_layer.bias": (t,),
         "text_embeddings.in_layer.weight": (d, 3584), "text_embeddings.in_layer.bias": (d,),
         "text_embeddings.norm.weight": (d,), "text_embeddings.norm.bias": (d,),
         "pooled_text_embeddings.in_layer.weight": (t, 768), "pooled_text_embeddings.in_layer.bias": (t,),
         "pooled_text_embeddings.norm.weight": (t,), "pooled_text_embeddings.norm.bias": (t,),
         "visual_embeddings.in_layer.weight": (d, visual_embed_dim), "visual_embeddings.in_layer.bias": (d,)}
    for i in range(text_blocks):
        s.update(_kandinsky5_block(f"text_transformer_blocks.{i}.", d, t, ff_dim, head_dim, False))
    for i in range(visual_blocks):
        s.update(_kandinsky5_block(f"visual_transformer_blocks.{i}.", d, t, ff_dim, head_dim, True))
    s.update({"out_layer.modulation.out_layer.weight": (2 * d, t), "out_layer.modulation.out_layer.bias": (2 * d,),
              "out_layer.out_layer.weight": (64, d), "out_layer.out_layer.bias": (64,)})
    return s


def write_tiny_kandinsky5(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny",
                          fill: float | None = None, **overrides) -> str:
    """A random Kandinsky 5 checkpoint in ComfyUI's layout (its module names, no prefix)."""
    shapes = kandinsky5_shapes(**{**KANDINSKY5_PRESETS[preset], **overrides})
    return write_checkpoint(path, shapes, dtype=dtype, seed=seed, fill=fill)


# ---- safetensors written tensor by tensor ---------------------------------------------------------
# ---- LTX-2 audio + video (ComfyUI 0.33's LTXAVModel; same `model.diffusion_model.` layout) -------------------------
# name -> video width (32 heads), audio width (32 heads: ComfyUI's default audio head count), blocks, text width
# (= the text connectors' width: heads x head dim), connector heads / layers; the release's metadata config carries
# what ComfyUI's detection cannot read from the keys
LTXAV_PRESETS = {
    # video 32 heads of 8, audio 32 heads of 4, 2 blocks, text 32 wide: 4.7 M params
    "tiny": dict(width=256, audio_width=128, num_layers=2, caption_channels=32, connector_heads=2, connector_layers=1),
    "ltx-2-19b": dict(width=4096, audio_width=2048, num_layers=48, caption_channels=3840, connector_heads=30,
                      connector_layers=2),
    # the LTX-2.3 layout (LTX-2.5's too, at other widths) at the tiny widths: gated attention, cross-attention AdaLN,
    # the text connectors as wide as their streams (2 heads of 128 / 64), split rope in float64
    "tiny_2_3": dict(width=256, audio_width=128, num_layers=2, caption_channels=32, connector_heads=2,
                     connector_layers=1, version="2.3"),
}
# the "transformer" metadata entries of the LTX-2.3 layout (its release's flags; ComfyUI's LTXAVModel reads them)
LTXAV_2_3_FLAGS = {"apply_gated_attention": True, "cross_attention_adaln": True,
                   "connector_apply_gated_attention": True, "caption_proj_before_connector": True,
                   "caption_projection_first_linear": False, "caption_projection_second_linear": False,
                   "caption_proj_input_norm": False, "rope_type": "split", "frequencies_precision": "float64",
                   "text_encoder_norm_type": "per_token_rms", "use_middle_indices_grid": True}


def _adaln(prefix: str, d: int, coefficient: int) -> dict:
    s = {f"{prefix}.emb.timestep_embedder.linear_1.weight": (d, 256), f"{prefix}.emb.timestep_embedder.linear_1.bias": (d,),
         f"{prefix}.emb.timestep_embedder.linear_2.weight": (d, d), f"{prefix}.emb.timestep_embedder.linear_2.bias": (d,)}
    return {**s, f"{prefix}.linear.weight": (coefficient * d, d), f"{prefix}.linear.bias": (coefficient * d,)}


def _ltx_attention(prefix: str, query: int, inner: int, context: int, gated_heads: int = 0) -> dict:
    """An LTX CrossAttention's keys; `gated_heads`: its per-head gate (to_gate_logits: query -> heads)."""
    s = {f"{prefix}.q_norm.weight": (inner,), f"{prefix}.k_norm.weight": (inner,)}
    for p, (o, i) in {"to_q": (inner, query), "to_k": (inner, context), "to_v": (inner, context),
                      "to_out.0": (query, inner), **({"to_gate_logits": (gated_heads, query)} if gated_heads else {})
                      }.items():
        s[f"{prefix}.{p}.weight"], s[f"{prefix}.{p}.bias"] = (o, i), (o,)
    return s


def _ltx_ff(prefix: str, d: int, mult: int = 4) -> dict:
    return {f"{prefix}.net.0.proj.weight": (mult * d, d), f"{prefix}.net.0.proj.bias": (mult * d,),
            f"{prefix}.net.2.weight": (d, mult * d), f"{prefix}.net.2.bias": (d,)}


def _ltx_connector(prefix: str, d: int, layers: int, registers: int = 128, gated_heads: int = 0) -> dict:
    s = {f"{prefix}.learnable_registers": (registers, d)}
    for i in range(layers):
        s.update(_ltx_attention(f"{prefix}.transformer_1d_blocks.{i}.attn1", d, d, d, gated_heads))
        s.update(_ltx_ff(f"{prefix}.transformer_1d_blocks.{i}.ff", d))
    return s


def ltxav_shapes(width, audio_width, num_layers, caption_channels, connector_heads, connector_layers,
                 in_channels=128, audio_in_channels=128, version="2.0") -> dict:
    """key -> shape of an LTX-2 audio + video DiT (ComfyUI's LTXAVModel names, without `model.diffusion_model.`);
    version "2.3": the 2.3 layout (`_ltxav_2_3_shapes`)."""
    if version == "2.3":
        return _ltxav_2_3_shapes(width, audio_width, num_layers, connector_heads, connector_layers, in_channels,
                                 audio_in_channels)
    v, a = width, audio_width
    s = {k: x for k, x in ltxv_shapes(v, 0, in_channels, caption_channels).items()}
    s.update({**_ltxav_audio_in(v, a, audio_in_channels, 6),
              "audio_caption_projection.linear_1.weight": (a, caption_channels),
              "audio_caption_projection.linear_1.bias": (a,), "audio_caption_projection.linear_2.weight": (a, a),
              "audio_caption_projection.linear_2.bias": (a,),
              **_ltx_connector("audio_embeddings_connector", caption_channels, connector_layers),
              **_ltx_connector("video_embeddings_connector", caption_channels, connector_layers),
              **_ltxav_audio_out(a, audio_in_channels)})
    for i in range(num_layers):
        s.update(_ltxav_block(f"transformer_blocks.{i}.", v, a, 6))
    return s


def _ltxav_audio_in(v: int, a: int, audio_in_channels: int, coefficient: int) -> dict:
    """The audio stream's input and AdaLN keys and the audio <-> video cross-attention AdaLNs."""
    return {"audio_patchify_proj.weight": (a, audio_in_channels), "audio_patchify_proj.bias": (a,),
            **_adaln("audio_adaln_single", a, coefficient), **_adaln("av_ca_video_scale_shift_adaln_single", v, 4),
            **_adaln("av_ca_a2v_gate_adaln_single", v, 1), **_adaln("av_ca_audio_scale_shift_adaln_single", a, 4),
            **_adaln("av_ca_v2a_gate_adaln_single", a, 1)}


def _ltxav_audio_out(a: int, audio_in_channels: int) -> dict:
    return {"audio_scale_shift_table": (2, a), "audio_proj_out.weight": (audio_in_channels, a),
            "audio_proj_out.bias": (audio_in_channels,)}


def _ltxav_block(b: str, v: int, a: int, coefficient: int, gated: bool = False) -> dict:
    """One BasicAVTransformerBlock (32 heads a stream; `gated`: each attention's per-head gate; coefficient 9: the
    cross-attention AdaLN's rows and the prompt tables)."""
    s = {}
    for name, (q, inner, ctx) in {"attn1": (v, v, v), "attn2": (v, v, v), "audio_attn1": (a, a, a),
                                  "audio_attn2": (a, a, a), "audio_to_video_attn": (v, a, a),
                                  "video_to_audio_attn": (a, a, v)}.items():
        s.update(_ltx_attention(b + name, q, inner, ctx, 32 if gated else 0))
    s.update({**_ltx_ff(b + "ff", v), **_ltx_ff(b + "audio_ff", a), b + "scale_shift_table": (coefficient, v),
              b + "audio_scale_shift_table": (coefficient, a), b + "scale_shift_table_a2v_ca_audio": (5, a),
              b + "scale_shift_table_a2v_ca_video": (5, v)})
    if coefficient == 9:
        s.update({b + "prompt_scale_shift_table": (2, v), b + "audio_prompt_scale_shift_table": (2, a)})
    return s


def _ltxav_2_3_shapes(v, a, num_layers, connector_heads, connector_layers, in_channels, audio_in_channels) -> dict:
    """The LTX-2.3 layout: every attention gated per head (to_gate_logits), the blocks' text cross-attention
    modulated (9 AdaLN rows, the prompt AdaLNs and tables), no caption projections (the text encoder projects to the
    streams' widths: the connectors are as wide as their streams, gated too)."""
    s = {"patchify_proj.weight": (v, in_channels), "patchify_proj.bias": (v,), **_adaln("adaln_single", v, 9),
         **_adaln("prompt_adaln_single", v, 2), **_adaln("audio_prompt_adaln_single", a, 2),
         "scale_shift_table": (2, v), "proj_out.weight": (in_channels, v), "proj_out.bias": (in_channels,),
         **_ltxav_audio_in(v, a, audio_in_channels, 9), **_ltxav_audio_out(a, audio_in_channels),
         **_ltx_connector("audio_embeddings_connector", a, connector_layers, gated_heads=connector_heads),
         **_ltx_connector("video_embeddings_connector", v, connector_layers, gated_heads=connector_heads)}
    for i in range(num_layers):
        s.update(_ltxav_block(f"transformer_blocks.{i}.", v, a, 9, gated=True))
    return s


def ltxav_metadata(width, audio_width, caption_channels, connector_heads, connector_layers, version="2.0",
                   **_) -> dict:
    """The "transformer" entries of an LTX-2 file's metadata config that a tiny file needs (ComfyUI's detection
    reads the rest from the keys; audio heads stay ComfyUI's default 32); 2.3: its flags, the connectors as wide as
    their streams."""
    meta = {"audio_attention_head_dim": audio_width // 32, "audio_cross_attention_dim": audio_width,
            "caption_channels": caption_channels, "connector_num_attention_heads": connector_heads,
            "connector_attention_head_dim": caption_channels // connector_heads,
            "connector_num_layers": connector_layers}
    if version == "2.3":
        meta.update(LTXAV_2_3_FLAGS, connector_attention_head_dim=width // connector_heads,
                    audio_connector_num_attention_heads=connector_heads,
                    audio_connector_attention_head_dim=audio_width // connector_heads)
    return meta


def write_tiny_ltxav(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", fill: float | None = None,
                     **overrides) -> str:
    """A random LTX-2 audio + video checkpoint in the release's layout, with its metadata config."""
    cfg = {**LTXAV_PRESETS[preset], **overrides}
    meta = {"config": json.dumps({"transformer": ltxav_metadata(**cfg)})}
    return write_checkpoint(path, ltxav_shapes(**cfg), dtype=dtype, seed=seed, prefix="model.diffusion_model.",
                            metadata=meta, fill=fill)


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32"}


def write_safetensors_stream(path: str, entries, metadata: dict | None = None) -> str:
    """Write a safetensors file from [(key, shape, dtype, make_tensor), ...], calling each `make_tensor()`
    only when its bytes are written (in list order), so at most one tensor is held at a time."""
    header, offset = {}, 0
    for key, shape, dtype, _ in entries:
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, dtype, make in entries:
            t = make()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{key}: made {tuple(t.shape)} {t.dtype}, announced {tuple(shape)} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
            del t
    return path


# ---- fp8 variants of a checkpoint ---------------------------------------------------------------------
FP8_MAX = 448.0  # largest float8_e4m3fn


def _is_linear_weight(key: str, shape) -> bool:
    return key.endswith(".weight") and len(shape) == 2


def write_fp8_variant(src: str, dst: str, scaled: bool = True, fp8_dtype=torch.float8_e4m3fn,
                      fp8_biases: bool = False, keep_metadata: bool = False) -> str:
    """An fp8 copy of checkpoint `src`, tensor by tensor.

    scaled=True: ComfyUI's "fp8_scaled" layout: every Linear weight (2-D `.weight`) becomes
    fp8(weight / s) with s = max|weight| / 448, stored as the float32 scalar `<layer>.scale_weight`
    beside it, plus the `scaled_fp8` marker key (an empty fp8 tensor, as ComfyUI saves it); other
    tensors keep their dtype.
    scaled=False: a plain fp8 file (e.g. "..._fp8_e4m3fn.safetensors"): every weight of 2 or more dims
    (linears and the patch-embedding convolution) is cast to fp8 as is; norms, biases, modulation keep
    their dtype.
    fp8_biases=True: the biases of the quantized linears are cast to fp8 too (unscaled), as in files
    ComfyUI saves from a scaled-fp8 model (its fp8 Linear holds the bias in fp8 as well).
    keep_metadata=True: the source's safetensors metadata copied (LTX-2's config, which ComfyUI reads its widths
    from).
    """
    from safetensors import safe_open

    with safe_open(src, framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        src_dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
        metadata = f.metadata() if keep_metadata else None
    names = {v: k for k, v in _ST_NAMES.items()}
    entries = []

    def read(k):
        with safe_open(src, framework="pt") as f:
            return f.get_tensor(k).clone()

    quantized_biases = set()
    if fp8_biases:
        quantized_biases = {k[:-len("weight")] + "bias" for k in keys if _is_linear_weight(k, shapes[k])}
    for k in keys:
        shape, dt = shapes[k], names[src_dtypes[k]]
        quantize = _is_linear_weight(k, shape) if scaled else (k.endswith(".weight") and len(shape) >= 2)
        if k in quantized_biases:
            entries.append((k, shape, fp8_dtype, lambda k=k: read(k).to(fp8_dtype)))
        elif not quantize:
            entries.append((k, shape, dt, lambda k=k: read(k)))
        elif not scaled:
            entries.append((k, shape, fp8_dtype, lambda k=k: read(k).to(fp8_dtype)))
        else:
            held = {}

            def quantized(k=k, held=held):
                w = read(k).float()
                held["s"] = s = (w.abs().amax().clamp(min=1e-12) / FP8_MAX).reshape(())
                return (w / s).clamp(-FP8_MAX, FP8_MAX).to(fp8_dtype)

            entries.append((k, shape, fp8_dtype, quantized))  # written just before its scale
            entries.append((k[:-len("weight")] + "scale_weight", (), torch.float32, lambda held=held: held.pop("s")))
    if scaled:
        prefix = "model.diffusion_model." if all(k.startswith("model.diffusion_model.") for k in keys) else ""
        entries.append((prefix + "scaled_fp8", (0,), fp8_dtype, lambda: torch.empty(0, dtype=fp8_dtype)))
    return write_safetensors_stream(dst, entries, metadata=metadata)


def write_dequantized(src: str, dst: str, dtype=torch.float32, fp8_unet_keep: tuple | None = None) -> str:
    """The weights an fp8 / fp8_scaled checkpoint stands for, as ComfyUI loads it, written as a plain `dtype`
    file: every fp8 tensor becomes fp8.to(float32) * its per-tensor scale (1 without one); in a scaled-fp8
    file (marker key present) the linears' other tensors (biases) are rounded through the marker's fp8 dtype,
    as ComfyUI's scaled-fp8 layers hold them; scales and the marker are dropped. The reference an fp8 load is
    compared with. `fp8_unet_keep`: the file is a plain fp8 one that ComfyUI holds as an fp8 unet (every tensor in
    fp8) except the tensors whose keys start with these prefixes (those the model builds in fp32 regardless)."""
    from safetensors import safe_open

    from ..weights.fp8 import AUX_SUFFIXES, MARKER_KEYS, scaled_fp8_dtype, weight_scale_key
    from ..weights.reads import read_header

    with safe_open(src, framework="pt") as f:
        header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    keep = [k for k in header if not k.endswith(AUX_SUFFIXES) and k.rpartition(".")[2] not in MARKER_KEYS]
    scaled = scaled_fp8_dtype(read_header(src))
    linear_biases = {k[:-len("weight")] + "bias" for k in keep if _is_linear_weight(k, header[k][0])}

    def make(k):
        with safe_open(src, framework="pt") as f:
            t = f.get_tensor(k)
            if scaled is not None and (k in linear_biases or _is_linear_weight(k, header[k][0])):
                t = t.to(scaled)
            elif fp8_unet_keep is not None and t.is_floating_point() and not k.startswith(fp8_unet_keep):
                t = t.to(torch.float8_e4m3fn)
            if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                return t.to(dtype)
            sk = weight_scale_key(header, k)
            s = f.get_tensor(sk).float().reshape(()) if sk else torch.tensor(1.0)
            return (t.float() * s).to(dtype)

    return write_safetensors_stream(dst, [(k, header[k][0], dtype, lambda k=k: make(k)) for k in keep])


QUANT_LAYOUTS = ("comfy_quant", "metadata")


def host_quantized(weight: torch.Tensor, fmt: str) -> dict:
    """`weight` quantized by the running ComfyUI's own code (comfy.quant_ops: the format's layout class), as the
    tensors its mixed-precision layer stores and loads: {"weight": stored data, "weight_scale": scale(s), ...}."""
    import comfy.quant_ops as quant_ops

    qt = quant_ops.QuantizedTensor.from_float(weight, quant_ops.QUANT_ALGOS[fmt]["comfy_tensor_layout"])
    if hasattr(qt, "state_dict"):  # (0.33+: the layout's own serialization)
        return dict(qt.state_dict("weight"))
    data, scale = quant_ops.LAYOUTS[qt.layout_type].get_plain_tensors(qt)  # 0.3.75: per-tensor fp8 only
    return {"weight": data, "weight_scale": scale}


def write_quantized_variant(src: str, dst: str, layout: str = "comfy_quant", fmt: str = "float8_e4m3fn",
                            only: tuple | None = None) -> str:
    """A copy of checkpoint `src` in ComfyUI's mixed-precision layout, its linears quantized by ComfyUI's own code
    (host_quantized; needs ComfyUI importable). Every Linear weight (2-D `.weight`; with `only`, those whose keys
    start with one of these prefixes) is stored as ComfyUI's layer stores it in format `fmt` (float8_e4m3fn: fp8 data
    + a per-tensor `weight_scale`; mxfp8 / nvfp4: block scales), the rest as in `src`. The quantized layers are named:
      comfy_quant: by a `<layer>.comfy_quant` tensor each (json bytes {"format": fmt}), as ComfyUI 0.33 saves them;
      metadata:    by the file's `_quantization_metadata` ({"format_version": "1.0", "layers": {layer: {...}}}), as
                   ComfyUI 0.3.75 reads them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if layout not in QUANT_LAYOUTS:
        raise ValueError(f"layout must be one of {QUANT_LAYOUTS}")
    out, layers = {}, {}
    with safe_open(src, framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if not (_is_linear_weight(k, t.shape) and (only is None or k.startswith(only))):
                out[k] = t
                continue
            layer = k[:-len(".weight")]
            for name, v in host_quantized(t.float(), fmt).items():
                out[f"{layer}.{name}"] = v.contiguous()
            layers[layer] = {"format": fmt}
    if layout == "comfy_quant":
        for layer, conf in layers.items():
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        metadata = None
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, dst, metadata=metadata)
    return dst


# ---- LoRA files in the usual formats -------------------------------------------------------------------
LORA_FORMATS = ("comfy", "kohya", "peft")


def write_wan_lora(path: str, model_path: str, fmt: str = "comfy", rank: int = 4, alpha: float | None = 2.0,
                   seed: int = 0, blocks=None, extras: bool = False, magnitude: float = 0.1) -> dict:
    """A random LoRA for the Wan checkpoint `model_path`, on every attention and ffn linear of `blocks`
    (default all), written in one of the usual key formats:

      comfy: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `lora_up` / `.alpha`
             (extras=True adds ComfyUI's `.diff` on a norm weight and `.diff_b` on two biases)
      kohya: `lora_unet_blocks_0_self_attn_q.lora_down.weight` / `lora_up` / `.alpha`
      peft:  `transformer.blocks.0.attn1.to_q.lora_A.weight` / `lora_B` (diffusers names, no alpha)

    Returns {checkpoint key: fp32 delta at strength 1}, worked out here in the checkpoint's own key
    space (alpha / rank * up @ down), for a merge by hand.
    """
    from ..weights.reads import read_header

    if fmt not in LORA_FORMATS:
        raise ValueError(f"fmt must be one of {LORA_FORMATS}")
    header = read_header(model_path)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in header if k.startswith("blocks."))
    blocks = list(range(n_blocks) if blocks is None else blocks)
    modules = [f"blocks.{b}.{a}.{p}" for b in blocks for a in ("self_attn", "cross_attn") for p in "qkvo"]
    modules += [f"blocks.{b}.ffn.{i}" for b in blocks for i in (0, 2)]
    if fmt == "peft":
        from ..models.wan import diffusers_names
        to_diffusers = {v: k for k, v in diffusers_names(list(header)).items()}
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    scale = 1.0 if (alpha is None or fmt == "peft") else alpha / rank
    for m in modules:
        out_f, in_f = header[m + ".weight"][0]
        up = torch.randn(out_f, rank, generator=g) * (magnitude / math.sqrt(rank))
        down = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        deltas[m + ".weight"] = scale * (up @ down)
        if fmt == "comfy":
            name = "diffusion_model." + m
            tensors[name + ".lora_up.weight"], tensors[name + ".lora_down.weight"] = up, down
        elif fmt == "kohya":
            name = "lora_unet_" + m.replace(".", "_")
            tensors[name + ".lora_up.weight"], tensors[name + ".lora_down.weight"] = up, down
        else:
            name = "transformer." + to_diffusers[m + ".weight"][:-len(".weight")]
            tensors[name + ".lora_B.weight"], tensors[name + ".lora_A.weight"] = up, down
        if alpha is not None and fmt != "peft":
            tensors[name + ".alpha"] = torch.tensor(float(alpha))
    if extras and fmt == "comfy":
        b = blocks[0]
        for key in (f"blocks.{b}.self_attn.norm_q.weight", f"blocks.{b}.self_attn.q.bias", f"blocks.{b}.ffn.2.bias"):
            d = torch.randn(header[key][0], generator=g) * 0.05
            suffix = ".diff" if key.endswith(".weight") else ".diff_b"
            tensors["diffusion_model." + key.rpartition(".")[0] + suffix] = d
            deltas[key] = d
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return deltas


ADAPTER_FORMATS = ("loha", "lokr", "lokr_full", "dora")


def write_wan_adapter(path: str, model_path: str, kind: str, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                      blocks=None, magnitude: float = 0.1, factor: int = 4) -> dict:
    """A random LyCORIS-style adapter for the Wan checkpoint `model_path` on every attention and ffn linear of
    `blocks` (default all), in the key layout ComfyUI reads:

      loha:      `diffusion_model.<m>.hada_w1_a` / `hada_w1_b` / `hada_w2_a` / `hada_w2_b` / `.alpha`
                 delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
      lokr:      `diffusion_model.<m>.lokr_w1_a` / `lokr_w1_b` / `lokr_w2_a` / `lokr_w2_b` / `.alpha` (both factors
                 factorised): delta = kron(w1_a @ w1_b, w2_a @ w2_b) * alpha / rank
      lokr_full: `lora_unet_<m with _>.lokr_w1` / `lokr_w2` / `.alpha` (kohya names, unfactorised):
                 delta = kron(w1, w2); ComfyUI ignores alpha when neither factor is factorised
      dora:      `diffusion_model.<m>.lora_up.weight` / `lora_down.weight` / `.alpha` / `.dora_scale`: the first
                 block's scales are per input column (shape (1, in), LyCORIS' default), the others' per output row
                 ((out, 1)); W' = W + alpha / rank * up @ down, normalised by W''s column norms (per input) or
                 W's row norms (per output: ComfyUI normalises by the base weight there), times dora_scale

    Returns {checkpoint key: fp32 (patched weight at strength 1) - base weight}: every format above is merged by
    ComfyUI as W + strength * that, so a merge by hand scales it. Worked out here independently of ComfyUI.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..weights.reads import read_header

    if kind not in ADAPTER_FORMATS:
        raise ValueError(f"kind must be one of {ADAPTER_FORMATS}")
    header = read_header(model_path)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in header if k.startswith("blocks."))
    blocks = list(range(n_blocks) if blocks is None else blocks)
    modules = [f"blocks.{b}.{a}.{p}" for b in blocks for a in ("self_attn", "cross_attn") for p in "qkvo"]
    modules += [f"blocks.{b}.ffn.{i}" for b in blocks for i in (0, 2)]
    g = torch.Generator().manual_seed(seed)
    rn = lambda *shape: torch.randn(*shape, generator=g)
    tensors, deltas = {}, {}
    with safe_open(model_path, framework="pt") as f:
        for m in modules:
            out_f, in_f = header[m + ".weight"][0]
            name = ("lora_unet_" + m.replace(".", "_")) if kind == "lokr_full" else "diffusion_model." + m
            small = magnitude / math.sqrt(in_f)
            if kind == "loha":
                w1a, w1b = rn(out_f, rank) / math.sqrt(rank), rn(rank, in_f)
                w2a, w2b = rn(out_f, rank) / math.sqrt(rank), rn(rank, in_f) * small
                tensors.update({name + ".hada_w1_a": w1a, name + ".hada_w1_b": w1b, name + ".hada_w2_a": w2a,
                                name + ".hada_w2_b": w2b})
                delta = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank)
            elif kind == "lokr":
                o2, i2 = out_f // factor, in_f // factor
                w1a, w1b = rn(factor, rank) / math.sqrt(rank), rn(rank, factor)
                w2a, w2b = rn(o2, rank) / math.sqrt(rank), rn(rank, i2) * small
                tensors.update({name + ".lokr_w1_a": w1a, name + ".lokr_w1_b": w1b, name + ".lokr_w2_a": w2a,
                                name + ".lokr_w2_b": w2b})
                delta = torch.kron(w1a @ w1b, w2a @ w2b) * (alpha / rank)
            elif kind == "lokr_full":
                w1, w2 = rn(factor, factor), rn(out_f // factor, in_f // factor) * small
                tensors.update({name + ".lokr_w1": w1, name + ".lokr_w2": w2})
                delta = torch.kron(w1, w2)
            else:
                up, down = rn(out_f, rank) * (magnitude / math.sqrt(rank)), rn(rank, in_f) / math.sqrt(in_f)
                w = f.get_tensor(m + ".weight").float()
                calc = w + (alpha / rank) * (up @ down)
                eps = torch.finfo(torch.float32).eps
                if m.startswith(f"blocks.{blocks[0]}."):  # per input column, norms of W'
                    norm = calc.norm(dim=0, keepdim=True) + eps
                    scale = norm * (1 + 0.2 * rn(1, in_f))
                else:  # per output row, norms of the base W (as ComfyUI computes them)
                    norm = w.norm(dim=1, keepdim=True) + eps
                    scale = calc.norm(dim=1, keepdim=True) * (1 + 0.2 * rn(out_f, 1))
                tensors.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down,
                                name + ".dora_scale": scale})
                delta = calc * (scale / norm) - w
            if kind != "lokr_full" or seed % 2:  # (lokr_full: an alpha ComfyUI ignores, on odd seeds)
                tensors[name + ".alpha"] = torch.tensor(float(alpha))
            deltas[m + ".weight"] = delta
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return deltas


# ---- VAEs (the host's own classes: written from a meta instance's state dict, so the key layout is the host's) ----
TINY_WAN22_VAE = {"dim": 16, "dec_dim": 32}  # ComfyUI's detection fixes the Wan 2.2 VAE's widths (160 / 256)


def write_tiny_wan_vae(path: str, version: str = "2.1", dim: int = 16, seed: int = 11) -> str:
    """A random Wan VAE of ComfyUI's class: 2.1 (comfy.ldm.wan.vae.WanVAE, its width read from the file by ComfyUI's
    detection) at width `dim`, or 2.2 (comfy.ldm.wan.vae2_2.WanVAE, 48 latent channels) at TINY_WAN22_VAE's widths:
    ComfyUI builds that one at its release widths whatever the file says (wan22_vae_width narrows it)."""
    kwargs = dict(z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
    if version == "2.1":
        import comfy.ldm.wan.vae as wan_vae
        cls, kwargs = wan_vae.WanVAE, {**kwargs, "dim": dim}
    else:
        import comfy.ldm.wan.vae2_2 as wan_vae
        cls, kwargs = wan_vae.WanVAE, {**kwargs, **TINY_WAN22_VAE, "z_dim": 48}
    with torch.device("meta"):
        vae = cls(**kwargs)
    g = torch.Generator().manual_seed(seed)

    def make(k, s):  # RMS_norm gammas are (C, 1, 1[, 1]): ones plus noise, like any norm weight
        return 1.0 + 0.1 * torch.randn(s, generator=g) if k.endswith("gamma") else random_tensor(k, s, g)

    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    return write_safetensors_stream(path, [(k, s, torch.float32, lambda k=k, s=s: make(k, s)) for k, s in shapes.items()])


def wan22_vae_width():
    """Within: ComfyUI's detection builds the Wan 2.2 VAE at TINY_WAN22_VAE's widths (its own class and code
    otherwise), so a tiny file of write_tiny_wan_vae(version="2.2") loads through comfy.sd.VAE. Tests only."""
    from unittest import mock

    import comfy.ldm.wan.vae2_2 as wan_vae
    real = wan_vae.WanVAE

    def narrow(**kwargs):
        return real(**{**kwargs, **TINY_WAN22_VAE})
    return mock.patch.object(wan_vae, "WanVAE", narrow)


# HunyuanVideo's VAEs: ComfyUI's detection fixes their widths too (1.0, Kandinsky 5's: AutoencoderKL with 3-D convs,
# ch 128, 246 M parameters; 1.5: AutoencodingEngine with the vae_refiner encoder / decoder, 1024 wide)
TINY_HUNYUAN_VIDEO_VAE = {"ch": 32}  # GroupNorm's 32 groups: widths 32, 64, 128, 128
TINY_HUNYUAN_VIDEO15_VAE = {"block_out_channels": [8, 8, 16, 32, 64]}


def _hunyuan_vae(version: str, **narrow):
    """ComfyUI's class for a HunyuanVideo VAE, built as its detection builds it (comfy.sd) with `narrow` widths."""
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
    if version == "1.0":
        ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                    "conv3d": True, "time_compress": 4, **narrow}
        return AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    ddconfig = {"block_out_channels": [128, 256, 512, 1024, 1024], "in_channels": 3, "out_channels": 3,
                "num_res_blocks": 2, "ffactor_spatial": 16, "ffactor_temporal": 4, "downsample_match_channel": True,
                "upsample_match_channel": True, "z_channels": 32, **narrow}
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.EmptyRegularizer"},
        encoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Decoder", "params": ddconfig})


def write_tiny_hunyuan_video_vae(path: str, version: str = "1.5", seed: int = 13) -> str:
    """A random HunyuanVideo VAE of ComfyUI's class at TINY_HUNYUAN_VIDEO_VAE's / TINY_HUNYUAN_VIDEO15_VAE's widths
    (1.0, also Kandinsky 5's; or 1.5): loads through comfy.sd.VAE within tiny_vae_widths()."""
    narrow = TINY_HUNYUAN_VIDEO_VAE if version == "1.0" else TINY_HUNYUAN_VIDEO15_VAE
    with torch.device("meta"):
        vae = _hunyuan_vae(version, **narrow)
    g = torch.Generator().manual_seed(seed)

    def make(k, s):  # norm weights (GroupNorm / RMS_norm gamma) are ones plus noise
        norm = k.endswith("gamma") or (".norm" in k and k.endswith("weight"))
        return 1.0 + 0.1 * torch.randn(s, generator=g) if norm else random_tensor(k, s, g)

    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    entries = [(k, s, torch.float32, lambda k=k, s=s: make(k, s)) for k, s in shapes.items()]
    return write_safetensors_stream(path, entries)


# Cosmos 1.0's tokenizer VAE (CV8x8x8): comfy.sd's detection builds it with this config whatever the file holds (128
# wide, ~100 M parameters); the tiny file is 16 wide. Its wavelet patchers' buffers are not in the module's state dict
# but are in the release file (the detection's key), so the writer adds them.
COSMOS1_VAE_CONFIG = {"z_channels": 16, "latent_channels": 16, "z_factor": 1, "resolution": 1024, "in_channels": 3,
                      "out_channels": 3, "channels": 128, "channels_mult": [2, 4, 4], "num_res_blocks": 2,
                      "attn_resolutions": [32], "dropout": 0.0, "patch_size": 4, "num_groups": 1,
                      "temporal_compression": 8, "spacial_compression": 8}
TINY_COSMOS1_VAE = {"channels": 16}


def write_tiny_cosmos1_vae(path: str, seed: int = 17) -> str:
    """A random Cosmos 1.0 tokenizer VAE of ComfyUI's class at TINY_COSMOS1_VAE's width, with the release's wavelet
    buffers: loads through comfy.sd.VAE within tiny_vae_widths()."""
    from comfy.ldm.cosmos.cosmos_tokenizer.patching import _WAVELETS
    from comfy.ldm.cosmos.vae import CausalContinuousVideoTokenizer
    vae = CausalContinuousVideoTokenizer(**{**COSMOS1_VAE_CONFIG, **TINY_COSMOS1_VAE})  # (cannot build on meta)
    g = torch.Generator().manual_seed(seed)

    def make(k, s):  # GroupNorm weights and the latent std are ones plus noise
        near_one = k == "latent_std" or (".norm" in k and k.endswith("weight"))
        return 1.0 + 0.1 * torch.randn(s, generator=g) if near_one else random_tensor(k, s, g)

    entries = [(k, tuple(v.shape), torch.float32, lambda k=k, s=tuple(v.shape): make(k, s))
               for k, v in vae.state_dict().items()]
    for part in ("encoder.patcher3d", "decoder.unpatcher3d"):
        haar = _WAVELETS["haar"].float()
        arange = torch.arange(haar.shape[0])
        entries += [(f"{part}.wavelets", tuple(haar.shape), torch.float32, lambda t=haar: t),
                    (f"{part}._arange", tuple(arange.shape), torch.int64, lambda t=arange: t)]
    return write_safetensors_stream(path, entries)


# LTX's video VAEs: ComfyUI builds them from the file's own config (metadata "config" -> "vae"), so a tiny file is a
# tiny config of the release's layout: LTX-2's (2.3 / 2.5 alike: pixel norm, compress_space / time / all blocks, 8x
# time and 32x space, no timestep conditioning) at base width 8; LTX-Video 0.9.1+'s decoder is timestep-conditioned.
def tiny_ltx_vae_config(timestep_conditioning: bool = False) -> dict:
    def res():
        return ["res_x", {"num_layers": 1}]
    return {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
            "latent_channels": 128, "patch_size": 4, "norm_layer": "pixel_norm", "latent_log_var": "uniform",
            "encoder_blocks": [res(), ["compress_space_res", {"multiplier": 2}], res(),
                               ["compress_time_res", {"multiplier": 2}], res(), ["compress_all_res", {"multiplier": 2}],
                               res(), ["compress_all_res", {"multiplier": 2}], res()],
            "decoder_blocks": [res(), ["compress_space", {"multiplier": 2}], res(), ["compress_time", {"multiplier": 2}],
                               res(), ["compress_all", {"multiplier": 1}], res(), ["compress_all", {"multiplier": 2}],
                               res()],
            "scaling_factor": 1.0, "use_quant_conv": False, "causal_decoder": False,
            "timestep_conditioning": timestep_conditioning, "normalize_latent_channels": False,
            "encoder_base_channels": 8, "decoder_base_channels": 8, "spatial_padding_mode": "zeros"}


def write_tiny_ltx_vae(path: str, timestep_conditioning: bool = False, seed: int = 19) -> str:
    """A random LTX video VAE of ComfyUI's class (VideoVAE) with tiny_ltx_vae_config in its metadata, as the release
    files carry theirs: loads through comfy.sd.VAE (and Load VAE) as it is."""
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE
    config = tiny_ltx_vae_config(timestep_conditioning)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VideoVAE(config=config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)

    def make(k, s):  # the latent statistics' std (and any scale) near one
        near_one = k.endswith(("std-of-means", "scale1", "scale2", "gamma"))
        return 1.0 + 0.1 * torch.randn(s, generator=g) if near_one else random_tensor(k, s, g)
    entries = [(k, s, torch.float32, lambda k=k, s=s: make(k, s)) for k, s in shapes.items()]
    return write_safetensors_stream(path, entries, metadata={"config": json.dumps({"vae": config})})


def write_all_in_one(path: str, dit_path: str, vae_path: str) -> str:
    """One file of a DiT checkpoint's tensors and a VAE file's under `vae.`, their metadata configs joined ({"transformer":
    ..., "vae": ...}), as LTX-2's release ships them (CheckpointLoaderSimple reads both from it)."""
    from safetensors import safe_open

    from ..weights.reads import read_metadata
    entries, config = [], {}
    for src, prefix in ((dit_path, ""), (vae_path, "vae.")):
        config.update(json.loads(read_metadata(src).get("config", "{}")))
        with safe_open(src, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                entries.append((prefix + k, tuple(t.shape), t.dtype, lambda t=t: t))
    return write_safetensors_stream(path, entries, metadata={"config": json.dumps(config)})


@contextlib.contextmanager
def tiny_vae_widths():
    """Within: ComfyUI's detection builds the Wan 2.2, HunyuanVideo 1.0 / 1.5 and Cosmos 1.0 VAEs at the tiny writers'
    widths (its own classes and code otherwise), so their tiny files load through comfy.sd.VAE. Tests only."""
    from unittest import mock

    import comfy.sd
    kl, engine = comfy.sd.AutoencoderKL, comfy.sd.AutoencodingEngine

    def narrow_kl(ddconfig, **kwargs):
        if ddconfig.get("conv3d"):
            ddconfig = {**ddconfig, **TINY_HUNYUAN_VIDEO_VAE}
        return kl(ddconfig=ddconfig, **kwargs)

    def narrow_engine(**kwargs):
        for part in ("encoder_config", "decoder_config"):
            if kwargs[part]["target"].startswith("comfy.ldm.hunyuan_video.vae_refiner."):
                kwargs[part] = {**kwargs[part], "params": {**kwargs[part]["params"], **TINY_HUNYUAN_VIDEO15_VAE}}
        return engine(**kwargs)
    import comfy.ldm.cosmos.vae as cosmos_vae
    tokenizer = cosmos_vae.CausalContinuousVideoTokenizer

    def narrow_cosmos1(**kwargs):
        return tokenizer(**{**kwargs, **TINY_COSMOS1_VAE})
    with wan22_vae_width(), mock.patch.object(comfy.sd, "AutoencoderKL", narrow_kl), \
            mock.patch.object(comfy.sd, "AutoencodingEngine", narrow_engine), \
            mock.patch.object(cosmos_vae, "CausalContinuousVideoTokenizer", narrow_cosmos1):
        yield
