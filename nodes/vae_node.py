from . import engine
from .backend import CATEGORY, CONFIG_TYPE


class ParallelVAELoader:
    """A ComfyUI VAE whose decode and encode run on the worker group, the tiles dealt over the ranks."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {
            "vae_name": (folder_paths.get_filename_list("vae"), {"tooltip": "A VAE file from ComfyUI's models/vae "
                         "(Wan 2.1 / 2.2, HunyuanVideo 1.0 (Kandinsky 5's) / 1.5 VAE, Cosmos 1.0's tokenizer, LTX-2's "
                         "video VAE; another VAE is refused by name, with why: load it with Load VAE)."}),
            "precision": (["default", "bf16", "fp16", "fp32"], {"default": "default", "tooltip":
                          "The VAE's precision on the ranks; default: ComfyUI's choice for the device."}),
            "parallel_config": (CONFIG_TYPE, {"tooltip": "From the Parallel Config node. The same config as the "
                                "model loader's: the VAE then runs on the DiT's ranks (its weights on every rank)."}),
        }}

    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("A normal VAE for VAE Decode / VAE Decode (Tiled) / VAE Encode and every node that calls "
                       "vae.decode or vae.encode. Each decode is tiled, the tiles dealt over the ranks: plain VAE "
                       "Decode / Encode run as VAE Decode (Tiled) / Encode (Tiled) with those nodes' default "
                       "widgets (512 px tiles, 64 overlap, 64 frames, 8 overlap).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a video VAE onto the parallel worker group: decode and encode split into ComfyUI's own "
                   "tiles over the ranks, blended as VAE Decode (Tiled) blends them; this process holds no VAE "
                   "weights.")

    def load(self, vae_name, precision, parallel_config):
        import folder_paths

        from .vae_proxy import make_parallel_vae
        if parallel_config.get("nodes", 1) > 1:
            raise ValueError("the Parallel VAE Loader runs on one machine's ranks: give it a Parallel Config with "
                             "nodes 1 (or decode with ComfyUI's own Load VAE)")
        path = folder_paths.get_full_path_or_raise("vae", vae_name)
        try:
            return (make_parallel_vae(parallel_config, path, precision),)
        except engine.vae.VAERefused as e:
            raise ValueError(f"{vae_name}: {e}") from None
