from .backend import CATEGORY, backend
from .comfy_model import parallel_model_of


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

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The parallel MODEL with this LoRA merged on the worker ranks.",)
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
            return (model,)
        import folder_paths
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        backend("weights.lora").read_lora_header(path)  # header only: refuses pickles, truncated and non-LoRA files
        lora_proxy = proxy.with_loras(tuple(proxy.loras) + ((path, float(strength)),))
        patched = model.clone()
        patched.add_object_patch("diffusion_model", lora_proxy)
        group = backend("runtime.group").get_group(proxy.parallel_config)
        if proxy.resident or not group.holds_other_models(proxy.path, proxy.precision):
            lora_proxy.group()  # merge now, so a LoRA that does not fit fails here, naming its file
        # else: the group holds another model a sampler of this graph may still use (Parallel Model Loader's
        # "swap"); this model and its LoRAs are loaded when its own sampler first calls it
        return (patched,)
