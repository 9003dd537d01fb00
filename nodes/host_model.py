"""ComfyUI's own model detection for a file, from its header alone (no weights): the supported_models config, the
diffusion model class ComfyUI builds for it, and the refusal of a class the file's family does not run."""
import os

import torch

from . import engine


def _detected_model_config(family_name, path, header, sd):
    """ComfyUI's supported_models config for the file, as its own loader picks it: the family may name the class
    itself (`_family_model_config`), and the file's metadata reaches the detection (0.33 picks Animate 2 and FlowRVS
    from it)."""
    import comfy.model_detection

    named = _family_model_config(family_name, header) if family_name else None
    if named is not None:
        return named
    return comfy.model_detection.model_config_from_unet(sd, "", metadata=_file_metadata(path))


def _file_metadata(path) -> dict | None:
    """A safetensors file's metadata, as comfy.sd hands it to the detection (None without any, as safetensors says).
    Read by the engine from the header bytes: the ComfyUI process never opens the tensor data."""
    return engine.reads.read_metadata(str(path)) or None


def host_model_config(family_name, path, precision, header):
    """(ComfyUI's supported_models config for the file, its meta state dict, the diffusion model class ComfyUI's
    detection builds for it), from the header (and the metadata) alone."""
    sd, _ = engine.host.meta_state_dict(header)
    model_config = _detected_model_config(family_name, path, header, sd)
    if model_config is None:
        raise RuntimeError(f"ComfyUI does not recognise {path} as a diffusion model it knows")
    dtype = engine.reads.compute_dtype(precision)
    model_config.set_inference_dtype(dtype, None)
    # ComfyUI's own class for this file, as its detection builds it (on meta: no memory, ~30 ms for 14B): the proxy
    # calls its forward, which runs the host's DIFFUSION_MODEL wrappers
    host_class = type(model_config.get_model(sd, "", device=torch.device("meta")).diffusion_model)
    return model_config, sd, host_class


def detected_host_class(path, header) -> str | None:
    """'<supported_models class> (<diffusion model class>)' ComfyUI's own detection gives the file, or None."""
    sd, _ = engine.host.meta_state_dict(header)
    try:
        model_config = _detected_model_config(None, path, header, sd)
        if model_config is None:
            return None
        model = model_config.get_model(sd, "", device=torch.device("meta")).diffusion_model
    except Exception:  # a file ComfyUI half-recognises: nothing to name
        return None
    return f"{type(model_config).__name__} ({type(model).__name__})"


def refuse_unsupported_class(family_name, path, header):
    """Before any rank starts: the model class ComfyUI detects for the file must be one the family runs; the
    refusal names the class and the reason."""
    family = engine.models.FAMILIES.get(family_name)
    check = getattr(family, "variant_of", None)
    if check is None:
        return
    try:
        getattr(family, "check_file_class", lambda _header: None)(header)  # a class this ComfyUI lacks
        check(_host_class_name(family, family_name, path, header))
    except ValueError as e:
        raise ValueError(f"{os.path.basename(path)}: {e}") from None


def _host_class_name(family, family_name, path, header) -> str | None:
    """The diffusion model class ComfyUI builds for the file; None where the supported_models class the family names
    is not in this ComfyUI (a family newer than the host: MiniMax H3 on 0.3.75)."""
    hint = getattr(family, "comfy_model_config", None)
    if hint is not None:
        import comfy.supported_models
        if not hasattr(comfy.supported_models, hint(header)[0]):
            return None
    return host_model_config(family_name, path, "fp32", header)[2].__name__


def _family_model_config(family_name, header):
    """ComfyUI's supported_models config for the file when its family provides one: `comfy_model_config(header)`
    gives (class name in comfy.supported_models, unet_config read from the header); else None."""
    family = engine.models.FAMILIES.get(family_name)
    hint = getattr(family, "comfy_model_config", None)
    if hint is None:
        return None
    import comfy.supported_models

    name, unet_config = hint(header)
    return getattr(comfy.supported_models, name)(unet_config)
