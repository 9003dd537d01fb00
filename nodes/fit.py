"""What the ranks' memory must hold, from ComfyUI's own numbers, checked before anything is spent on it.

A model call's activations are ComfyUI's own estimate for the model class (`BaseModel.memory_required`: the class's
`memory_usage_factor` per latent element, the formula ComfyUI uses to plan its own GPU memory); the engine splits it
over the ranks (planner.rank_share) and compares it with what they have. Measured against the ranks' peak RSS on CPU
(one rank, fp32, Wan widths 512 and 1536, 4,096 to 9,216 tokens): ComfyUI's estimate (its non-flash formula, as on
CPU) was within 5% of the measured growth.
"""
import logging

from . import engine


def call_activations(base, shape) -> int | None:
    """ComfyUI's estimate of one call's activations on a single device for an input of `shape` (rows, C, T, H, W);
    None when the MODEL has no BaseModel to ask. The pack's BaseModel answers 0 to ComfyUI's memory manager (the
    activations live on the ranks), so the class's own method is asked."""
    if base is None:
        return None
    try:
        return int(type(base).memory_required(base, tuple(shape)))
    except Exception as e:  # noqa: BLE001  a class whose estimate needs conds this call does not have
        logging.debug("parallel_dit: no activation estimate for %s: %s", type(base).__name__, e)
        return None


def declared_activations(config, model_config, sd, latent_shape) -> int:
    """The largest rank's activation bytes for the latent connected to Parallel Config (cond and uncond in one call,
    as ComfyUI sends them at cfg > 1); 0 without one."""
    if not latent_shape:
        return 0
    model_config.unet_config["disable_unet_model_creation"] = True
    base = model_config.get_model(sd, "")  # no weights, no diffusion model: ComfyUI's formula only
    shape = (2 * latent_shape[0], *latent_shape[1:])
    if len(shape) == 4:
        shape = (shape[0], shape[1], 1, *shape[2:])
    total = call_activations(base, shape) or 0
    return int(total * engine.planner.rank_share(config, shape[0]))


def check_before_start(config, mb, activations: int) -> None:
    """Before the ranks start (a new group): CPU ranks against the cores, every rank's weights + activations +
    runtime against the memory free now. A GPU's free memory is not asked here (that would open a CUDA context on
    each rank's GPU in this process): the ranks report it as they start, and the loader checks it before loading."""
    memory = None
    if config.device == "cpu":
        import torch
        host = engine.rank.device_memory(torch.device("cpu"))
        memory = [host] * config.local_ranks
    engine.planner.check_start(config, mb, memory, activations)


def check_model_start(config, path: str, precision: str) -> None:
    """check_before_start for a MODEL whose group restarts (after Unload, or a rank died): the model file's weights
    under the plan, no declared latent (each call is checked as it is sent)."""
    reads, models = engine.reads, engine.models
    header = reads.read_header(path)
    check_before_start(config, engine.planner.model_bytes(header, models.detect_family(header, path), precision), 0)
