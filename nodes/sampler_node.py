from . import engine
from .backend import CATEGORY
from .proxy import parallel_model_of


class ParallelSampler:
    """KSampler for the parallel MODEL: ComfyUI's own samplers and schedulers run here, each model
    evaluation runs on the worker group."""

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL from Parallel Model Loader."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Seed of the initial noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (1.0 skips the negative)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "ComfyUI sampler."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "ComfyUI noise schedule."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt conditioning (e.g. CLIPTextEncode with umt5)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning."}),
            "latent_image": ("LATENT", {"tooltip": "Video latent to denoise (e.g. EmptyHunyuanLatentVideo)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "1.0 = from noise; lower keeps more of the input latent."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Samples with ComfyUI's samplers while the DiT runs sharded on the worker group."

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0):
        proxy = parallel_model_of(model)
        if proxy is None:
            raise ValueError("Parallel Sampler needs the MODEL from Parallel Model Loader; for other models use "
                             "the native KSampler")
        shape = engine.config.ModelShape.from_info(proxy.info)
        engine.config.validate_latent(shape, tuple(latent_image["samples"].shape))
        import nodes as comfy_nodes  # ComfyUI's own nodes.py (the host imported it before any pack)
        return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                           latent_image, denoise=denoise)
