"""Synthetic checkpoints with the real key layout of each family, for tests, the demo and bench/.

No model hub is reachable where this pack is developed, so tiny random models (and files of real
shapes with few blocks) are written here in ComfyUI's / the original release's key layout.
"""
from __future__ import annotations

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
}


def wan_shapes(dim, ffn_dim, num_layers, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
               patch=(1, 2, 2), i2v=False, clip_dim=1280, flf2v=False) -> dict:
    """key -> shape of a Wan 2.x DiT in the original (ComfyUI) layout."""
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
    return s


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
                     metadata: dict | None = None) -> str:
    """Write a random checkpoint with these keys and shapes (safetensors)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {prefix + k: random_tensor(k, v, g).to(dtype) for k, v in shapes.items()}
    save_file(sd, path, metadata=metadata)
    return path


def write_tiny_wan(path: str, seed: int = 0, dtype=torch.float32, preset: str = "tiny", **overrides) -> str:
    cfg = {**WAN_PRESETS[preset], **overrides}
    return write_checkpoint(path, wan_shapes(**cfg), dtype=dtype, seed=seed)
