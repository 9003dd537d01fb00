"""ComfyUI adapters: widgets, validation, progress, interrupt. No torch.distributed here."""
from .config_node import ParallelConfigNode
from .loader_node import ParallelModelLoader
from .lora_node import ParallelLora
from .sampler_node import ParallelSampler
from .unload_node import ParallelUnload
from .vae_node import ParallelVAELoader

NODE_CLASS_MAPPINGS = {
    "ParallelConfig": ParallelConfigNode,
    "ParallelModelLoader": ParallelModelLoader,
    "ParallelLora": ParallelLora,
    "ParallelSampler": ParallelSampler,
    "ParallelUnload": ParallelUnload,
    "ParallelVAELoader": ParallelVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ParallelConfig": "Parallel Config",
    "ParallelModelLoader": "Parallel Model Loader",
    "ParallelLora": "Parallel LoRA",
    "ParallelSampler": "Parallel Sampler",
    "ParallelUnload": "Parallel Unload",
    "ParallelVAELoader": "Parallel VAE Loader",
}
