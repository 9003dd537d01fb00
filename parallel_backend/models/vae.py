"""VAEs on the ranks: ComfyUI's own `comfy.sd.VAE` built in each rank for a file, and the share of a tiled decode or
encode each rank computes; this file is the VAE plan as data (which host VAE classes split, and how).

The split: ComfyUI's own tiled code (`VAE.decode_tiled` / `encode_tiled` -> `comfy.utils.tiled_scale_multidim`) runs
on every rank over the whole tile grid, but each rank's first stage model computes only the tiles dealt to it (tile i
of the grid to rank i % world) and answers the others with zeros of the tile's output shape. The blend weights (the
feathered masks and their sum) depend on the tile shapes only, so every rank's result is (sum of its own tiles x
mask) / (sum of all masks), and the ranks' results summed are ComfyUI's tiled result up to the order of the float
additions. Each tile is a separate call of the host's decode, so a causal video VAE's time cache is per tile, as in
ComfyUI's own tiled decode. The non-linear output step (ComfyUI's `process_output`: shift, scale, clamp) is skipped
on the ranks and applied by the owner to the sum.
"""
from __future__ import annotations

import contextlib

import torch

# first stage model kind (vae_kind: its class, module.qualname, and for ComfyUI's generic autoencoder classes their
# decoder's) -> what the pack knows of it. "dims": the tiled path ComfyUI takes for it (3: decode_tiled_3d /
# encode_tiled_3d, time and space). A VAE not listed is refused by that name. Each listed VAE decodes and encodes
# deterministically per tile (no noise drawn); NOT_SPLIT says why a known one is refused.
SPLITS = {
    "comfy.ldm.wan.vae.WanVAE": {"name": "Wan 2.1 VAE", "dims": 3},
    "comfy.ldm.wan.vae2_2.WanVAE": {"name": "Wan 2.2 VAE", "dims": 3},
    "comfy.ldm.models.autoencoder.AutoencoderKL[comfy.ldm.modules.diffusionmodules.model.Decoder, 3-D]":
        {"name": "HunyuanVideo 1.0 VAE (also Kandinsky 5's)", "dims": 3},
    "comfy.ldm.models.autoencoder.AutoencodingEngine[comfy.ldm.hunyuan_video.vae_refiner.Decoder, causal]":
        {"name": "HunyuanVideo 1.5 VAE", "dims": 3},
    "comfy.ldm.cosmos.vae.CausalContinuousVideoTokenizer": {"name": "Cosmos 1.0 tokenizer VAE (CV8x8x8)", "dims": 3},
    # ComfyUI builds LTX's video VAEs from the file's config: LTX-2 / 2.3 / 2.5's decoder draws no noise
    "comfy.ldm.lightricks.vae.causal_video_autoencoder.VideoVAE": {"name": "LTX-2 video VAE", "dims": 3},
}
NOT_SPLIT = {
    "comfy.ldm.lightricks.vae.causal_video_autoencoder.VideoVAE[noise]":
        "LTX-Video 0.9.1+'s timestep-conditioned decoder adds unseeded noise (torch.randn) to every decode, so no "
        "split can equal ComfyUI's decode (two native decodes differ too)",
    "comfy.ldm.minimax.vae.MiniMaxH3VideoVAE":
        "MiniMax H3's video VAE tiles inside its own decode (ComfyUI hands it the whole latent): there are no "
        "ComfyUI tiles to deal over the ranks",
}
NOISE_DRAWN = "comfy.ldm.lightricks.vae.causal_video_autoencoder.VideoVAE"  # draws noise where its config says so
# ComfyUI classes that hold many VAEs (SD, Flux, HunyuanVideo...): told apart by their decoder
GENERIC = ("comfy.ldm.models.autoencoder.AutoencoderKL", "comfy.ldm.models.autoencoder.AutoencodingEngine")


class VAERefused(ValueError):
    """A VAE the pack cannot split; the message names it and says what to use instead."""


def class_path(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def vae_kind(module) -> str:
    """A first stage model's SPLITS key: its class, and for GENERIC classes the decoder's class and how it convolves
    (3-D convs; vae_refiner's causal chunks)."""
    path = class_path(module)
    decoder = getattr(module, "decoder", None)
    if path == NOISE_DRAWN and (getattr(module, "timestep_conditioning", False) or
                                any(getattr(m, "inject_noise", False) for m in module.modules())):
        return f"{path}[noise]"
    if path not in GENERIC or decoder is None:
        return path
    traits = [class_path(decoder)]
    if isinstance(getattr(module, "post_quant_conv", None), torch.nn.Conv3d):
        traits.append("3-D")
    if getattr(decoder, "refiner_vae", False):
        traits.append("causal")
    return f"{path}[{', '.join(traits)}]"


def split_of(first_stage_model) -> dict:
    """The SPLITS entry for a host VAE's model, or VAERefused naming its kind."""
    path = vae_kind(first_stage_model)
    split = SPLITS.get(path)
    if split is None:
        known = ", ".join(s["name"] for s in SPLITS.values())
        why = f": {NOT_SPLIT[path]}" if path in NOT_SPLIT else f"; it splits: {known}"
        raise VAERefused(f"the Parallel VAE Loader cannot split this VAE ({path}){why}. Load this file with "
                         f"ComfyUI's own Load VAE node instead")
    return split


# an all-in-one checkpoint's VAE tensors (LTX-2's release: its DiT, VAEs and config in one file), as ComfyUI's
# CheckpointLoaderSimple takes them
CHECKPOINT_PREFIX = "vae."


def vae_prefix(header: dict) -> str:
    """'' for a VAE file; CHECKPOINT_PREFIX for an all-in-one checkpoint (vae.* keys and no VAE keys of its own)."""
    own = any(k.startswith(("decoder.", "encoder.")) for k in header)
    return CHECKPOINT_PREFIX if not own and any(k.startswith(CHECKPOINT_PREFIX) for k in header) else ""


def vae_state_dict(path: str) -> tuple:
    """(state dict, metadata) of the file's VAE: the whole file, or an all-in-one checkpoint's vae.* tensors only
    (read by name: its DiT's are not read)."""
    import comfy.utils

    from ..weights.reads import read_header, read_metadata
    prefix = vae_prefix(read_header(path)) if path.endswith((".safetensors", ".sft")) else ""
    if not prefix:
        return comfy.utils.load_torch_file(path, return_metadata=True)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return sd, read_metadata(path) or None


def build_host_vae(path: str, precision: str, device: torch.device):
    """ComfyUI's own VAE for the file, as its VAELoader (or, for an all-in-one checkpoint, CheckpointLoaderSimple)
    builds it: comfy.sd.VAE from the state dict and metadata, on this rank's device in `precision` (None / "default":
    ComfyUI's choice for the device)."""
    import comfy.sd

    sd, metadata = vae_state_dict(path)
    dtype = None if precision in (None, "default") else getattr(torch, {"fp32": "float32", "fp16": "float16",
                                                                        "bf16": "bfloat16"}[precision])
    vae = comfy.sd.VAE(sd=sd, device=device, dtype=dtype, metadata=metadata)
    del sd
    vae.throw_exception_if_invalid()
    split_of(vae.first_stage_model)
    vae.first_stage_model.to(device)
    vae.output_device = device  # the blend on the rank's device: the ranks' sums are reduced there
    return vae


def scaled_shape(vae, shape, encode: bool) -> tuple:
    """The output shape ComfyUI's tiled_scale_multidim gives `shape` (batch, channels, *dims) for this VAE: each dim
    scaled (a callable for time), rounded; channels the VAE's pixel (decode) or latent (encode) channels."""
    ratio = vae.downscale_ratio if encode else vae.upscale_ratio
    dims = len(shape) - 2
    ratios = ratio if isinstance(ratio, (tuple, list)) else [ratio] * dims
    out = []
    for r, n in zip(ratios, shape[2:]):
        out.append(round(r(n) if callable(r) else (n / r if encode else n * r)))
    return (shape[0], vae.latent_channels if encode else vae.output_channels, *out)


@contextlib.contextmanager
def own_tiles_only(vae, rank: int, world: int, encode: bool, on_tile=None):
    """Within: the VAE's first stage model computes only the tiles dealt to `rank` (i % world), zeros of the tile's
    output shape for the others; `on_tile()` is called before each tile, computed or not (progress, Cancel), so every
    rank passes the same tile sequence."""
    model = vae.first_stage_model
    name = "encode" if encode else "decode"
    real = getattr(model, name)
    count = [0]

    def share(x, *args, **kwargs):
        i = count[0]
        count[0] += 1
        if on_tile is not None:
            on_tile()
        if i % world == rank:
            return real(x, *args, **kwargs)
        return torch.zeros(scaled_shape(vae, x.shape, encode), dtype=x.dtype, device=x.device)

    setattr(model, name, share)
    process_output = vae.process_output
    vae.process_output = lambda image: image  # applied by the owner to the sum (it is not linear: a clamp)
    try:
        yield count
    finally:
        delattr(model, name)
        vae.process_output = process_output


def decode_share(vae, latent: torch.Tensor, tiles: dict, rank: int, world: int, on_tile=None) -> torch.Tensor:
    """This rank's share of ComfyUI's `vae.decode_tiled(latent, **tiles)` before process_output, channels first
    (batch, channels, *dims)."""
    with own_tiles_only(vae, rank, world, encode=False, on_tile=on_tile):
        out = vae.decode_tiled(latent, **tiles)
    return out.movedim(-1, 1)


def encode_share(vae, pixels: torch.Tensor, tiles: dict, rank: int, world: int, on_tile=None) -> torch.Tensor:
    """This rank's share of ComfyUI's `vae.encode_tiled(pixels, **tiles)` (pixels as the IMAGE ComfyUI passes)."""
    with own_tiles_only(vae, rank, world, encode=True, on_tile=on_tile):
        return vae.encode_tiled(pixels, **tiles)
