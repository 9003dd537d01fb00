import logging

from . import engine, fit, gpu_sharing, placement
from .backend import CATEGORY, CONFIG_TYPE
from .comfy_hooks import install_lora_hook, install_unload_hook
from .host_model import detected_host_class, host_model_config, refuse_unsupported_class
from .model_patcher import build_model_patcher
from .proxy import load_logged


GGUF_FOLDERS = ("diffusion_models", "unet_gguf")  # ComfyUI's DiT folders (models/unet too), ComfyUI-GGUF's if present


def model_names() -> list:
    """The DiT files the loader offers: ComfyUI's diffusion_models list (safetensors) and the .gguf files in the
    same folders (ComfyUI's own list filters them out; ComfyUI-GGUF's unet_gguf folders too, when installed)."""
    import os

    import folder_paths
    names = list(folder_paths.get_filename_list("diffusion_models"))
    seen = set(names)
    for key in GGUF_FOLDERS:
        if key not in folder_paths.folder_names_and_paths:
            continue
        for folder in folder_paths.get_folder_paths(key):
            if not os.path.isdir(folder):
                continue
            files, _ = folder_paths.recursive_search(folder, excluded_dir_names=[".git"])
            for name in folder_paths.filter_files_extensions(files, {".gguf"}):
                if name not in seen:
                    seen.add(name)
                    names.append(name)
    return sorted(names)


def model_path(name: str) -> str:
    """The full path of a name from `model_names`."""
    import folder_paths
    if not name.endswith(".gguf"):
        return folder_paths.get_full_path_or_raise("diffusion_models", name)
    for key in GGUF_FOLDERS:
        if key in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(key, name)
            if path:
                return path
    raise FileNotFoundError(f"{name} is not in ComfyUI's diffusion_models / unet folders: refresh the node list")


def gguf_plan_note(header, info) -> str:
    """What a GGUF file became on the ranks (the plan output says which layers could not stay quantized)."""
    if getattr(header, "architecture", None) is None:
        return ""
    kept = info.get("gguf_quantized_layers")
    if kept is None:
        return "; GGUF: quantized linears kept quantized (counts after its first load)"
    dense = info.get("gguf_dequantized_at_load") or []
    note = f"; GGUF {info.get('checkpoint_precision', '')}: {kept} linears kept quantized"
    if dense:
        note += (f", {len(dense)} dequantized at load because their tensor-parallel split does not fall on the "
                 f"quant blocks: {', '.join(dense[:4])}{' ...' if len(dense) > 4 else ''}")
    return note


def detect_family(path, header):
    """The engine's family for the file; a file it cannot run is refused naming what ComfyUI itself sees in it."""
    models = engine.models
    try:
        return models.detect_family(header, path)
    except models.UnsupportedModelError as e:
        detected = detected_host_class(path, header)
        if detected is None:
            raise
        raise models.UnsupportedModelError(f"{e}. ComfyUI detects it as {detected}, which the parallel loader "
                                           f"cannot run: sample it with the native Load Diffusion Model") from None


class ParallelModelLoader:
    """Starts (or reuses) the worker group and loads a DiT file onto it, sharded."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_names(),
                           {"tooltip": "A DiT file from ComfyUI's models/diffusion_models or models/unet: "
                                       "safetensors (bf16 / fp16 / fp32 / fp8 / scaled fp8) or GGUF (city96's "
                                       "layout: Q8_0, Q6_K, Q5_K, Q4_K, ...; kept quantized on the ranks)."}),
            "base_precision": (["bf16", "fp16", "fp32"], {"default": "bf16",
                               "tooltip": "Precision the weights are cast to on load."}),
            "parallel_config": (CONFIG_TYPE, {"tooltip": "From the Parallel Config node."}),
        }, "optional": {
            "residency": (["swap", "resident"], {"default": "swap", "tooltip":
                          "Several loaders on one Parallel Config share its worker group (e.g. Wan 2.2 A14B's "
                          "high- and low-noise experts). resident: this model stays on the ranks while others "
                          "load (its weights per rank are added to theirs; no reload). swap: it is dropped when "
                          "another model loads and read again when its sampler next runs (one model's memory; "
                          "a reload from disk per switch)."}),
            "weight_dtype": (["default", *engine.fp8.WEIGHT_STORAGE], {"default": "default", "tooltip":
                             "As the native Load Diffusion Model's weight_dtype: hold the weights in fp8 on the ranks "
                             "(half of bf16's memory), cast per layer to base_precision as they compute; _fast also "
                             "uses fp8 matmul where the GPU has it. default: as the file stores them (fp8 files stay "
                             "fp8). Keep the same value when you swap the native loader for this one."}),
            "compile": (["off", "inductor"], {"default": "off", "tooltip":
                        "torch.compile the transformer blocks on every rank (inductor; the first steps pay the "
                        "compile time, later prompts of the same shape reuse it). The native TorchCompileModel node "
                        "on this MODEL does the same and overrides this option."}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "parallel_plan")
    OUTPUT_TOOLTIPS = ("A normal MODEL: use it with Parallel Sampler or the native samplers.",
                       "The mesh the loader picked, and why.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusion transformer onto a persistent worker group that holds it sharded over "
                   "several devices. A second run with the same config and file reuses the warm group.")

    def load(self, model_name, base_precision, parallel_config, residency="swap", compile="off", weight_dtype="default"):
        path = model_path(model_name)
        planner = engine.planner
        header = engine.reads.read_header(path)  # refuses pickles, truncated and non-safetensors files
        if weight_dtype != "default" and path.endswith(".gguf"):
            raise ValueError(f"{model_name} is a GGUF file, already quantized: set weight_dtype to default")
        # the weights' storage travels with the precision: the same file held two ways is two models on the group
        base_precision = base_precision if weight_dtype == "default" else \
            f"{base_precision}{engine.reads.STORAGE_SEP}{weight_dtype}"
        family = detect_family(path, header)
        shape = family.model_shape(header)
        config, why = planner.resolve_config(parallel_config, shape, header, family, base_precision,
                                             engine.group.available_devices(parallel_config["device"]))
        refuse_unsupported_class(shape.family, path, header)  # a variant the family cannot run: before any rank
        install_unload_hook()
        install_lora_hook()
        mb = planner.model_bytes(header, family, base_precision)
        rank_bytes = planner.weights_per_rank(config, mb)
        reserve = planner.FIT_RESERVE.get(config.device, 0)
        # the latent declared on Parallel Config, by ComfyUI's own activation estimate for this model class
        activations = fit.declared_activations(config, *host_model_config(shape.family, path, base_precision,
                                                                          header)[:2],
                                               parallel_config.get("latent_shape"))
        # what ComfyUI holds on the ranks' GPUs (text encoders, VAE) goes first, through its own model management
        gpu_sharing.free_comfy_models_on_rank_gpus(config, rank_bytes, reserve + activations)
        import comfy.model_management  # Cancel works while a new group waits (e.g. for another machine to join)
        def start(c):  # starts ranks only when no warm group matches, after the check
            return engine.group.get_group(c, comfy.model_management.throw_exception_if_processing_interrupted,
                                          check=lambda: fit.check_before_start(c, mb, activations))
        group = start(config)
        # what the group measured of its links: auto mode may move to the placement predicted fastest there
        analytic = config.degrees()
        config, group, links_line = placement.place(config, parallel_config, shape, group, start)
        if config.degrees() != analytic:
            why, links_line = links_line, ""
        rank_bytes = planner.weights_per_rank(config, mb)
        try:  # the devices' free memory as the ranks found it: refuse a plan that cannot fit, before loading
            planner.check_fit(config, mb, group.device_memory, held=group.resident_bytes(path, base_precision),
                              activations=activations)
        except ValueError:
            if not group.models:
                group.stop()  # an empty group: give its devices back
            raise
        gpu_sharing.reserve_on_comfy_gpu(config, rank_bytes)
        loads_before = group.load_count
        resident = residency == "resident"
        if not resident and group.holds_other_models(path, base_precision):
            # swap: loading now would evict a model a sampler of this graph may still use; the proxy loads
            # this one when its sampler runs (the header already proved the file; info from its shapes)
            info = {**shape.to_info(), "path": path, "precision": base_precision}
            logging.info("parallel_dit: %s will be swapped in when its sampler runs (pids %s hold another model)",
                         model_name, group.pids)
        else:
            # loads weights only when this file and precision are not on the group yet
            info = load_logged(group, path, base_precision, resident=resident)
            if group.load_count == loads_before:
                logging.info("parallel_dit: reusing warm group pids %s with %s", group.pids, model_name)
        plan = f"{config.describe()} [{why}] for {shape.family} ({shape.num_heads} heads, {shape.num_layers} blocks)"
        plan += f"; {links_line}" if links_line else ""
        plan += gguf_plan_note(header, info)
        logging.info("parallel_dit: %s", plan)
        compile_spec = None if compile == "off" else {"backend": compile}
        patcher = build_model_patcher(config, path, base_precision, header, info, resident, compile_spec)
        gpu_sharing.install_pre_run(patcher, config, rank_bytes, reserve)
        return (patcher, plan)

