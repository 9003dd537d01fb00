from .backend import CATEGORY
from .lora_check import with_parallel_lora
from .proxy import parallel_model_of


class ParallelLora:
    """LoRA for the parallel MODEL: each rank merges the LoRA into its own shard of the weights."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL from Parallel Model Loader (or from another Parallel LoRA, "
                                           "to stack several LoRAs)."}),
            "lora_name": (folder_paths.get_filename_list("loras"),
                          {"tooltip": "A LoRA file from ComfyUI's models/loras (safetensors; diffusers/PEFT, kohya "
                                      "or ComfyUI Wan key format)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                   "tooltip": "How strongly the LoRA changes the model (1.0 = as trained, 0 = off, "
                                              "negative = the opposite). Changing it re-merges on the running "
                                              "worker group; the model file is not read again."}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "lora_report")
    OUTPUT_TOOLTIPS = ("The parallel MODEL with this LoRA merged on the worker ranks.",
                       "How many of the LoRA's tensors apply to this model; keys that match no layer are named (and "
                       "logged as 'lora key not loaded', as ComfyUI's own loader does).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a LoRA to the model of Parallel Model Loader. The native LoraLoader cannot reach "
                   "weights that live sharded on the worker ranks; this node has every rank merge the LoRA "
                   "into its own shard, and unmerges it when the LoRA or strength changes.")

    def apply(self, model, lora_name, strength):
        proxy = parallel_model_of(model)
        if proxy is None:
            raise ValueError("Parallel LoRA needs the MODEL from Parallel Model Loader; for other models use the "
                             "native LoraLoader")
        if strength == 0:
            return (model, f"{lora_name} at strength 0: not applied")
        import folder_paths
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return with_parallel_lora(model, proxy, path, strength)
