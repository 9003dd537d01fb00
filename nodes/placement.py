"""The loader's use of what a group measured of its links (runtime/link_probe.py): auto mode's placement from the
planner's cost model, and parallel_plan's line on it. Every choice is the planner's (choose_placement,
check_placement); this module only asks the group for the measurements and restarts it when auto mode moves."""
import dataclasses

from . import engine

AXES_AUTO = ("cfg", "ulysses", "ring", "tp", "dp")
TEXT_TOKENS = 512  # the text a DiT's cross-attention reads when nothing says otherwise (Wan's T5 length)


def declared_call(config, spec: dict, shape):
    """The call the placement is weighed for: the declared latent's tokens, cond and uncond in one call (2 rows, as
    ComfyUI batches them at cfg > 1; a cfg-1 call's fold is weighed per call); None without a declared latent."""
    planner = engine.planner
    tokens = planner.latent_tokens(spec.get("latent_shape"), shape.patch_size)
    if not tokens:
        return None
    out = shape.out_channels
    for p in shape.patch_size:
        out *= p
    return planner.CallShape(shape.dim, shape.num_heads, shape.num_layers, tokens, 2,
                             4 if config.dtype == "fp32" else 2, out)


def auto_mode(config, spec: dict) -> bool:
    """Whether auto mode may move the degrees: every axis left at auto, replicated weights (on one node or several:
    the other nodes rejoin the restarted group with its new degrees)."""
    return (config.world_size > 1 and not config.shard_weights and config.tp == 1
            and all(not spec.get(a) for a in AXES_AUTO) and spec.get("pp", 1) in (0, 1) and not config.stage_split)


def place(config, spec: dict, shape, group, start) -> tuple:
    """(config, group, line for parallel_plan). Auto mode: the placement predicted fastest on the links `group`
    measured, never one predicted slower than one rank; when it differs from the group's, `start(config)` starts
    that group instead (the old one is stopped: one group holds the devices); each call's fold is then weighed on
    the links too. A user-set mesh is kept (and folds as documented); the line warns when it is predicted slower than
    one rank. A group shared by two loaders follows the last one's mode."""
    planner = engine.planner
    group.measured_folds = auto_mode(config, spec)  # a mesh the user set folds as documented (every rank busy)
    if not group.links:
        return config, group, ""
    call = declared_call(config, spec, shape)
    if call is None:
        return config, group, (f"{_links(group.links)}; each call's fold is weighed on them (declare a latent on "
                               f"Parallel Config to weigh the mesh too)")
    measured = group.measure(shape.to_info(), call.tokens, TEXT_TOKENS)
    if not auto_mode(config, spec):
        return config, group, planner.check_placement(config, call, measured)
    stages = shape.num_layers if spec.get("pp", 1) == 0 else 0  # pipeline stages only where pp is auto too
    degrees, why = planner.choose_placement(config, call, measured, stages)
    if degrees != config.degrees():
        config = dataclasses.replace(config, **degrees)
        engine.config.validate_config(config)
        engine.config.validate_for_model(config, shape)
        group = start(config)
        group.measured_folds = True
    return config, group, why


def _links(links: dict) -> str:
    a2a = links.get("all_to_all")
    return f"measured all-to-all {a2a['bandwidth'] / 1e9:.3g} GB/s, {a2a['latency'] * 1e6:.0f} us" if a2a else ""
