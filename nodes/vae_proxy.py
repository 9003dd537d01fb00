"""ParallelVAE: a ComfyUI VAE whose decode and encode run on the worker group, tiled, the tiles dealt over the ranks
(parallel_backend/models/vae.py). Built by ComfyUI's own VAE detection from the file's header (meta tensors: no
weights in this process); its first stage model is a module without parameters. Every ComfyUI node that calls
`vae.decode`, `decode_tiled`, `encode` or `encode_tiled` works on it unchanged.

Plain decode / encode (VAE Decode, VAE Encode) run as VAE Decode (Tiled) / VAE Encode (Tiled) with those nodes'
default widgets (README "Parallel VAE"): untiled they would run on one rank.
"""
from __future__ import annotations

import torch

from . import engine

# VAE Decode (Tiled)'s / VAE Encode (Tiled)'s default widgets (pixels, frames): what plain decode / encode use
TILED_DEFAULTS = {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}


class RanksFirstStage(torch.nn.Module):
    """Stands in for the VAE's first stage model: holds no weights. Outside a dry run (the tile grid's shape, worked
    out by ComfyUI's own tiled code on meta tensors) a direct decode / encode is refused."""

    def __init__(self, vae_class: str):
        super().__init__()
        self.vae_class, self.dry = vae_class, None

    def _tile(self, x, encode: bool):
        if self.dry is None:
            raise RuntimeError(f"this VAE ({self.vae_class}) runs on the parallel worker group: its decode / encode "
                               f"are reached through vae.decode / decode_tiled / encode / encode_tiled only; use "
                               f"ComfyUI's own Load VAE for a node that calls the model directly")
        self.dry["tiles"] += 1
        return torch.zeros(engine.vae.scaled_shape(self.dry["vae"], x.shape, encode), device="meta")

    def decode(self, z, *args, **kwargs):
        return self._tile(z, encode=False)

    def encode(self, x, *args, **kwargs):
        return self._tile(x, encode=True)


def meta_host_vae(path: str):
    """ComfyUI's own VAE for the file (an all-in-one checkpoint's vae.* tensors), detected and built from its header on
    the meta device."""
    import comfy.sd
    header = engine.reads.read_header(path)
    prefix = engine.vae.vae_prefix(header)
    sd = engine.reads.meta_tensors({k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)})
    metadata = engine.reads.read_metadata(path) or None
    try:
        with torch.device("meta"):
            return comfy.sd.VAE(sd=sd, device=torch.device("cpu"), metadata=metadata)
    except RuntimeError as e:  # a constructor that reads a value back (.item()) cannot run wholly on meta
        if "meta" not in str(e) or _MetaLayers is None:
            raise
    with _MetaLayers("meta"):
        return comfy.sd.VAE(sd=sd, device=torch.device("cpu"), metadata=metadata)


def _meta_layers_class():
    """torch.device("meta") for the layers, except that a tensor made from Python data (`torch.tensor(4)`) stays on
    the CPU: Cosmos 1.0's wavelet patcher reads one back in its constructor (torch.log2(torch.tensor(patch_size))
    .item()). torch's DeviceContext is private: None where this torch has no such class (such a VAE then fails to
    load with torch's own message)."""
    try:
        from torch.utils._device import DeviceContext as base
    except ImportError:
        return None

    class MetaLayers(base):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.tensor:
                return func(*args, **(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs)
    return MetaLayers


_MetaLayers = _meta_layers_class()


class ParallelVAE:
    """Mixed into ComfyUI's VAE class at load (comfy.sd is imported only then): see make_parallel_vae."""

    def _setup(self, spec: dict, path: str, precision: str) -> None:
        import comfy.model_patcher
        self.parallel_spec, self.parallel_path, self.parallel_precision = spec, path, precision
        self.parallel_class = engine.vae.split_of(self.first_stage_model)["name"]  # refused by name if unknown
        self.first_stage_model = RanksFirstStage(engine.vae.vae_kind(self.first_stage_model))
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))
        self.size = 0

    # ---- what ComfyUI's nodes call ------------------------------------------------------------------------------
    def decode(self, samples_in, vae_options={}):
        if self.latent_dim == 2 and samples_in.ndim == 5:
            samples_in = samples_in[:, :, 0]
        return self.decode_tiled(samples_in, **self.default_decode_tiles())

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        tiles = _given(tile_x=tile_x, tile_y=tile_y, overlap=overlap, tile_t=tile_t, overlap_t=overlap_t)
        count, dry = self._dry_run("decode_tiled", samples, tiles)
        out = self._on_ranks(samples, dry.movedim(-1, 1).shape, tiles, count, encode=False)
        return self.process_output(out).movedim(1, -1)

    def encode(self, pixel_samples):
        d = TILED_DEFAULTS
        return self.encode_tiled(pixel_samples, tile_x=d["tile_size"], tile_y=d["tile_size"], overlap=d["overlap"],
                                 tile_t=d["temporal_size"], overlap_t=d["temporal_overlap"])

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        tiles = _given(tile_x=tile_x, tile_y=tile_y, overlap=overlap, tile_t=tile_t, overlap_t=overlap_t)
        count, dry = self._dry_run("encode_tiled", pixel_samples, tiles)
        return self._on_ranks(pixel_samples, dry.shape, tiles, count, encode=True)

    def default_decode_tiles(self) -> dict:
        """VAE Decode (Tiled)'s arithmetic on its default widgets (ComfyUI's nodes.VAEDecodeTiled.decode)."""
        d = TILED_DEFAULTS
        size, overlap, t_size, t_overlap = d["tile_size"], d["overlap"], d["temporal_size"], d["temporal_overlap"]
        temporal = self.temporal_compression_decode()
        tiles = {}
        if temporal is not None:
            t_size = max(2, t_size // temporal)
            tiles = {"tile_t": t_size, "overlap_t": max(1, min(t_size // 2, t_overlap // temporal))}
        compression = self.spacial_compression_decode()
        return {"tile_x": size // compression, "tile_y": size // compression, "overlap": overlap // compression,
                **tiles}

    # ---- the group ----------------------------------------------------------------------------------------------
    def _dry_run(self, method: str, x, tiles: dict):
        """ComfyUI's own tiled method on meta tensors: how many tiles it visits and the shape of its result."""
        import comfy.sd
        model, devices = self.first_stage_model, (self.device, self.output_device)
        model.dry = {"tiles": 0, "vae": self}
        self.device = self.output_device = torch.device("meta")
        try:
            out = getattr(comfy.sd.VAE, method)(self, x.to("meta"), **tiles)
            return model.dry["tiles"], out
        finally:
            model.dry, (self.device, self.output_device) = None, devices

    def _on_ranks(self, x, out_shape, tiles: dict, count: int, encode: bool) -> torch.Tensor:
        import comfy.model_management
        import comfy.utils
        group = group_for(self.parallel_spec)
        key = group.vae_load(self.parallel_path, self.parallel_precision,
                             interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        bar = comfy.utils.ProgressBar(count)
        call = group.calls + 1

        def interrupt():
            started = [b for c, b in group.progress.started() if c == call]
            if len(started) == len(group.pids):
                bar.update_absolute(max(0, min(started) - 1), count)
            comfy.model_management.throw_exception_if_processing_interrupted()
        out = group.vae_tiles(key, x.float().contiguous(), tuple(out_shape), tiles, encode, interrupt=interrupt)
        bar.update_absolute(count, count)
        # the host's output dtype (0.3.75 has no vae_output_dtype: its tiled code returns float32)
        return out.to(self.vae_output_dtype()) if hasattr(self, "vae_output_dtype") else out


def _given(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def make_parallel_vae(spec: dict, path: str, precision: str):
    """The pack's VAE for a file: ComfyUI's own VAE detection (meta), its class extended with ParallelVAE."""
    import comfy.sd
    host = meta_host_vae(path)
    host.throw_exception_if_invalid()
    cls = type("ParallelVAE", (ParallelVAE, comfy.sd.VAE), {})
    vae = cls.__new__(cls)
    vae.__dict__.update(host.__dict__)
    vae._setup(spec, path, precision)
    if precision != "default":
        vae.vae_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return vae


# ---- which group: the DiT's when the config matches -------------------------------------------------------------
def matches(config, spec: dict) -> bool:
    """Whether a running group's config serves a VAE loader's spec: the same devices, and every degree the spec
    fixes (auto degrees match any)."""
    same = (config.world_size == spec["world_size"] and config.device == spec["device"] and config.nodes == 1
            and config.first_device == spec.get("first_device", 0)
            and tuple(config.devices) == tuple(spec.get("devices", ())))
    return same and all(not spec.get(a) or getattr(config, a) == spec[a] for a in engine.config.AXES if a != "pp")


def vae_config(spec: dict):
    """A config for a group that runs only the VAE: the spec's devices, its fixed degrees, data-parallel for the
    rest (a VAE has no mesh of its own: its ranks each take tiles)."""
    cfg = engine.config
    if spec.get("nodes", 1) > 1:
        raise ValueError("the Parallel VAE Loader runs on one machine's ranks: give it a Parallel Config with nodes 1")
    degrees = {a: spec.get(a) or 1 for a in cfg.AXES}
    rest = spec["world_size"]
    for a in cfg.AXES:
        rest //= degrees[a]
    degrees["dp"] *= max(1, rest)
    config = cfg.ParallelConfig(world_size=spec["world_size"], dtype=spec["dtype"], device=spec["device"],
                                attention=spec["attention"], first_device=spec.get("first_device", 0),
                                devices=tuple(spec.get("devices", ())), **degrees)
    cfg.validate_config(config, engine.group.available_devices(spec["device"]))
    return config


def group_for(spec: dict):
    """The running group that matches the spec (the DiT's), else one started for the VAE."""
    import comfy.model_management
    for g in engine.group.active_groups():
        if g.alive() and matches(g.config, spec):
            return g
    return engine.group.get_group(vae_config(spec), comfy.model_management.throw_exception_if_processing_interrupted)
