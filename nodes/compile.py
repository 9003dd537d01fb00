"""torch.compile on the ranks: the kwargs a call asks for (TorchCompileModel's, else the loader's option)."""
from .patches import UnsupportedPatchError


COMPILE_BACKENDS = ("inductor", "cudagraphs")


def compile_request(patcher, default, config):
    """The torch.compile kwargs the ranks should use for this call: those TorchCompileModel put on the MODEL
    (ComfyUI stores them in model_options), else the loader's `compile` option. The proxy itself is never
    compiled; the ranks compile their transformer blocks. Refuses what the ranks cannot run."""
    try:
        from comfy_api.torch_helpers.torch_compile import TORCH_COMPILE_KWARGS
    except ImportError:  # a host without ComfyUI's compile helpers has no TorchCompileModel
        TORCH_COMPILE_KWARGS = "torch_compile_kwargs"
    spec = (getattr(patcher, "model_options", None) or {}).get(TORCH_COMPILE_KWARGS) or default
    if not spec:
        return None
    spec = {k: v for k, v in dict(spec).items() if v is not None}
    backend_name = spec.get("backend", "inductor")
    if backend_name not in COMPILE_BACKENDS:
        raise UnsupportedPatchError(f"torch.compile backend '{backend_name}' is not supported on the worker ranks: "
                                    f"use one of {COMPILE_BACKENDS}")
    if backend_name == "cudagraphs" and config.device != "cuda":
        raise UnsupportedPatchError("torch.compile backend 'cudagraphs' needs CUDA ranks: use 'inductor' with "
                                    "device cpu, or set Parallel Config's device to cuda")
    return spec
