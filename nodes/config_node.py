import os

from . import engine
from .backend import CATEGORY, CONFIG_TYPE

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
        axes = {a: ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": _AXIS_HELP[a]})
                for a in ("cfg", "ulysses", "ring", "tp", "dp")}
        return {"required": {
            "world_size": ("INT", {"default": 2, "min": 1, "max": 64,
                                   "tooltip": "Number of devices (ranks). The degrees multiply to this."}),
            **axes,
            "dtype": (list(engine.config.DTYPES), {"default": "bf16", "tooltip": "Compute precision of the ranks."}),
            "device": (list(engine.config.DEVICE_KINDS), {"default": "cuda",
                       "tooltip": "cuda: one GPU per rank (NCCL). cpu: gloo ranks, for testing without GPUs."}),
            "attention": (list(engine.config.ATTENTION_BACKENDS), {"default": "sdpa",
                          "tooltip": "Attention kernel on the ranks: sdpa (torch's fused), math (reference), flash (flash-attn) or "
                                     "sage (SageAttention); flash and sage need CUDA and their package installed."}),
        }, "optional": {  # after the inputs every user sets; placement, pipeline and several machines marked
            # advanced (for a frontend that hides such widgets). The order is the saved workflows' widgets_values
            # order: keep it.
            "first_device": ("INT", {"default": 0, "min": 0, "max": 63, "advanced": True,
                             "tooltip": "GPU index of rank 0; ranks take consecutive GPUs."}),
            "weights": (list(engine.config.WEIGHT_MODES), {"default": "auto", "tooltip":
                        "How the DiT's weights are held. replicated: every rank holds all of them (or its tp "
                        "share). sharded: every rank holds 1/world of each block and gathers a block whole just "
                        "before it runs (FSDP-style: fits 14B on small cards; moves the blocks' bytes once per "
                        "step, whatever the resolution; not with tp). auto: replicated when the model fits one "
                        "device, else sharded or tp, whichever moves fewer bytes for the latent (see "
                        "parallel_plan)."}),
            "latent": ("LATENT", {"tooltip": "Optional: the latent you will sample (e.g. from EmptyHunyuanLatent"
                                  "Video). auto mode sizes its traffic comparison for it; without it, for a 480p "
                                  "81-frame video."}),
            "pp": ("INT", {"advanced": True, "default": 1, "min": 0, "max": 64, "tooltip":
                   "Pipeline stages: each stage holds a contiguous range of the blocks and hands the activation on "
                   "(cond / uncond rows overlap as micro-batches). For cards of different sizes or to fit a model; "
                   "slower than ulysses on equal cards. 1 = off, 0 = auto (on only when the GPUs differ in memory "
                   "and a symmetric split would not fit the smallest)."}),
            "stage_split": ("STRING", {"advanced": True, "default": "", "tooltip":
                            "With pp > 1: the share of the blocks per stage, e.g. '24,16' for a 24 GB and a 16 GB "
                            "card; empty = equal stages (auto: by each GPU's memory)."}),
            "devices": ("STRING", {"advanced": True, "default": "", "tooltip":
                        "GPU indices for the ranks, e.g. '1,2,3' to keep rank 0 off ComfyUI's GPU 0 (one per rank; "
                        "with several nodes, one per rank of this machine). Empty = consecutive from first_device."}),
            "nodes": ("INT", {"advanced": True, "default": 1, "min": 1, "max": 64, "tooltip":
                      "Machines the group spans. This ComfyUI machine is node 0; every other machine runs `python -m "
                      "parallel_backend.runtime.node --rendezvous HOST:PORT --node-rank K --nodes N "
                      "--nproc-per-node P --secret-file FILE --model-dir MODELS` (see the README). Trusted networks "
                      "only. world_size = nodes x ranks_per_node."}),
            "ranks_per_node": ("INT", {"advanced": True, "default": 0, "min": 0, "max": 64, "tooltip":
                               "Ranks (GPUs) on each machine; 0 = world_size / nodes. Ulysses and tp stay inside a "
                               "machine, ring / cfg / pp cross machines (auto picks so)."}),
            "rendezvous": ("STRING", {"advanced": True, "default": "", "tooltip":
                           "With nodes > 1: HOST:PORT of this machine that the others reach, e.g. 10.0.0.1:29500. "
                           "torch's c10d store listens on exactly this address (never on every interface)."}),
            "secret_file": ("STRING", {"advanced": True, "default": "", "tooltip":
                            "With nodes > 1: a file holding a shared secret (>= 16 bytes; the same file on every "
                            "machine, chmod 600). A rank that cannot prove it knows the secret is refused; the "
                            "secret itself never crosses the network."}),
            "rejoin_timeout": ("FLOAT", {"advanced": True, "default": 120.0, "min": 1.0, "max": 3600.0, "step": 1.0,
                                         "tooltip":
                               "With nodes > 1: seconds a prompt waits for the other machines to join (or to come "
                               "back after a failure) before it fails naming the missing node."}),
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
             weights="auto", latent=None, pp=1, stage_split="", devices="", nodes=1, ranks_per_node=0, rendezvous="",
             secret_file="", rejoin_timeout=120.0):
        spec = {"world_size": world_size, "cfg": cfg, "ulysses": ulysses, "ring": ring, "tp": tp, "dp": dp, "pp": pp,
                "dtype": dtype, "device": device, "attention": attention, "first_device": first_device,
                "weights": weights, "stage_split": _numbers(stage_split, "stage_split", float),
                "devices": _numbers(devices, "devices", int)}
        if nodes > 1:  # kept out of one-node specs, so their configs (and warm groups) stay as they were
            spec.update(nodes=nodes, ranks_per_node=ranks_per_node, rendezvous=rendezvous.strip(),
                        secret_file=os.path.expanduser(secret_file.strip()), rejoin_timeout=float(rejoin_timeout))
            nodes_spec = {k: spec[k] for k in ("nodes", "ranks_per_node", "rendezvous", "secret_file",
                                                "rejoin_timeout")}
            probe = engine.config.ParallelConfig(world_size=world_size, device=device,
                                                 **{a: 1 for a in engine.config.AXES}, **nodes_spec)
            try:  # the node fields alone (the degrees may still be auto): refuse before any process starts
                engine.config.validate_nodes(probe)
            except engine.config.ConfigError as e:
                if "would span nodes" not in str(e):
                    raise
            engine.multinode.read_secret(spec["secret_file"])  # missing / short: say so now
        if latent is not None:
            spec["latent_shape"] = tuple(latent["samples"].shape)
        if all(spec[a] for a in engine.config.AXES):  # fully fixed: refuse now, before any process starts
            fixed = {k: v for k, v in spec.items() if k not in ("weights", "latent_shape")}
            c = engine.config.ParallelConfig(**fixed, shard_weights=weights == "sharded")
            engine.config.validate_config(c, engine.group.available_devices(device))
        return (spec,)
