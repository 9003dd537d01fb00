from .backend import CATEGORY, CONFIG_TYPE, backend

_AXIS_HELP = {
    "cfg": "CFG parallel: cond and uncond on separate rank groups (no traffic inside the model). 2 or 1; 0 = auto.",
    "ulysses": "Ulysses sequence parallel (all-to-all of heads; least traffic). Must divide the model's heads "
               "together with tp. 0 = auto.",
    "ring": "Ring attention sequence parallel (K/V passed around a ring); for when heads do not divide further "
            "or across nodes. 0 = auto.",
    "tp": "Tensor parallel: splits the weights; only to make a model fit (most traffic). 0 = auto (1 unless the "
          "model does not fit one device).",
    "dp": "Data parallel: a latent batch (several seeds) split over replica groups. 0 = auto (1).",
}


def _numbers(text: str, name: str, kind) -> tuple:
    """'24,16' -> (24, 16); '' -> ()."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name} '{text}' must be comma-separated numbers, e.g. "
                         f"{'24,16' if name == 'stage_split' else '1,2,3'}") from None
    return tuple(int(v) if float(v).is_integer() else v for v in values)


class ParallelConfigNode:
    """Describes the worker group: how many devices and how the model is split over them."""

    @classmethod
    def INPUT_TYPES(cls):
        cfgmod = backend("config")
        axes = {a: ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": _AXIS_HELP[a]})
                for a in ("cfg", "ulysses", "ring", "tp", "dp")}
        return {"required": {
            "world_size": ("INT", {"default": 2, "min": 1, "max": 64,
                                   "tooltip": "Number of devices (ranks). The degrees multiply to this."}),
            **axes,
            "dtype": (list(cfgmod.DTYPES), {"default": "bf16", "tooltip": "Compute precision of the ranks."}),
            "device": (list(cfgmod.DEVICE_KINDS), {"default": "cuda",
                       "tooltip": "cuda: one GPU per rank (NCCL). cpu: gloo ranks, for testing without GPUs."}),
            "attention": (list(cfgmod.ATTENTION_BACKENDS), {"default": "sdpa",
                          "tooltip": "Attention kernel on the ranks: sdpa (torch's fused), math (reference), flash (flash-attn) or "
                                     "sage (SageAttention); flash and sage need CUDA and their package installed."}),
            "first_device": ("INT", {"default": 0, "min": 0, "max": 63,
                             "tooltip": "GPU index of rank 0; ranks take consecutive GPUs."}),
        }, "optional": {
            "weights": (list(cfgmod.WEIGHT_MODES), {"default": "auto", "tooltip":
                        "How the DiT's weights are held. replicated: every rank holds all of them (or its tp "
                        "share). sharded: every rank holds 1/world of each block and gathers a block whole just "
                        "before it runs (FSDP-style: fits 14B on small cards; moves the blocks' bytes once per "
                        "step, whatever the resolution; not with tp). auto: replicated when the model fits one "
                        "device, else sharded or tp, whichever moves fewer bytes for the latent (see "
                        "parallel_plan)."}),
            "latent": ("LATENT", {"tooltip": "Optional: the latent you will sample (e.g. from EmptyHunyuanLatent"
                                  "Video). auto mode sizes its traffic comparison for it; without it, for a 480p "
                                  "81-frame video."}),
            "pp": ("INT", {"default": 1, "min": 0, "max": 64, "tooltip":
                   "Pipeline stages: each stage holds a contiguous range of the blocks and hands the activation on "
                   "(cond / uncond rows overlap as micro-batches). For cards of different sizes or to fit a model; "
                   "slower than ulysses on equal cards. 1 = off, 0 = auto (on only when the GPUs differ in memory "
                   "and a symmetric split would not fit the smallest)."}),
            "stage_split": ("STRING", {"default": "", "tooltip":
                            "With pp > 1: the share of the blocks per stage, e.g. '24,16' for a 24 GB and a 16 GB "
                            "card; empty = equal stages (auto: by each GPU's memory)."}),
            "devices": ("STRING", {"default": "", "tooltip":
                        "GPU indices for the ranks, e.g. '1,2,3' to keep rank 0 off ComfyUI's GPU 0 (one per rank). "
                        "Empty = consecutive from first_device."}),
        }}

    RETURN_TYPES = (CONFIG_TYPE,)
    RETURN_NAMES = ("parallel_config",)
    OUTPUT_TOOLTIPS = ("The mesh to run on; connect to Parallel Model Loader.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "How many devices the DiT is sampled on, and how it is split: cfg x ring x ulysses x tp (x dp)."

    @classmethod
    def VALIDATE_INPUTS(cls, world_size=1, cfg=0, ulysses=0, ring=0, tp=0, dp=0, pp=1, **kw):
        fixed = [d for d in (cfg, ulysses, ring, tp, dp, pp) if d]
        prod = 1
        for d in fixed:
            prod *= d
        if prod > world_size or world_size % prod:
            return (f"the fixed degrees multiply to {prod}, which does not divide world_size {world_size}: "
                    f"change world_size or set some degrees to 0 (auto)")
        if len(fixed) == 6 and prod != world_size:
            return f"the degrees multiply to {prod} but world_size is {world_size}"
        return True

    def make(self, world_size, cfg, ulysses, ring, tp, dp, dtype, device, attention, first_device=0,
             weights="auto", latent=None, pp=1, stage_split="", devices=""):
        spec = {"world_size": world_size, "cfg": cfg, "ulysses": ulysses, "ring": ring, "tp": tp, "dp": dp, "pp": pp,
                "dtype": dtype, "device": device, "attention": attention, "first_device": first_device,
                "weights": weights, "stage_split": _numbers(stage_split, "stage_split", float),
                "devices": _numbers(devices, "devices", int)}
        if latent is not None:
            spec["latent_shape"] = tuple(latent["samples"].shape)
        cfgmod = backend("config")
        if all(spec[a] for a in cfgmod.AXES):  # fully fixed: refuse now, before any process starts
            group = backend("runtime.group")
            c = cfgmod.ParallelConfig(**{k: v for k, v in spec.items() if k not in ("weights", "latent_shape")},
                                      shard_weights=weights == "sharded")
            cfgmod.validate_config(c, group.available_devices(device))
        return (spec,)
