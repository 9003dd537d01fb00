"""The order of the transforms that make the host's model one rank's share of it, in one place (read `parallelize`
top to bottom, then `finish_after_load`; compile comes last, per call, through `compile_blocks`).

The order is what keeps it right: every module replacement (pipeline pass-throughs, TP layers, GGUF linears) comes
before the plan's hooks, since a hook put on a module that is replaced afterwards would be lost with it
(replace_module carries hooks over any later swap, and `finish_after_load` proves none went missing); nothing is read
from the file until the model's final shape is known. It lives in runtime/ because it joins parallel/ and weights/
(parallel/ stays below weights/: weights/ imports it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..parallel.plan import SequenceState, apply_sequence_parallel, apply_tensor_parallel, missing_plan_hooks


@dataclass
class Parallelized:
    """What the transforms leave on a rank besides the model itself (each None / empty when its step did nothing)."""
    seq_state: SequenceState
    plan_hooks: list
    pipeline: object = None         # parallel/pipeline.PipelineStage (pp > 1)
    sharded_weights: object = None  # parallel/sharded_weights.ShardedWeights (shard_weights)
    gguf_stats: dict = field(default_factory=dict)


def parallelize(model, family, plan, mesh, header, prefix: str, path: str) -> Parallelized:
    """Apply the mesh's transforms to `model` (built on meta by the host's class) in their order; returns what the
    rank keeps of them. Weights are loaded after this (sharded_model.py), then `finish_after_load`."""
    c = mesh.config
    # 1. pipeline cut: this stage's blocks only, the others pass-throughs, before anything is split or loaded
    pipeline = cut_pipeline(model, family, mesh, path) if c.pp > 1 else None
    # 2. TP: the plan's linears swapped for their column / row shards (the host's own layer classes, shrunk)
    apply_tensor_parallel(model, plan, mesh.groups["tp"], mesh.coord["tp"], c.tp)
    # 3. a GGUF's quantized linears swapped for layers that keep the bytes quantized (after TP: they slice by it)
    gguf_stats = keep_gguf_quantized(model, header, prefix)
    # 4. sequence split: the plan's split / gather hooks, on the modules as they now are (no later swap loses them)
    seq_state = SequenceState(mesh.sequence_groups(), mesh.sequence_index)
    plan_hooks = apply_sequence_parallel(model, plan, seq_state, mesh.max_sequence_degree)
    # 5. attention: the family's attention calls run sequence-parallel with the chosen kernel
    family.install_attention(model, seq_state, c.attention)
    # 6. sharded weights: each block's weights as 1/N row shards (FSDP2 on the host's blocks), materialized empty
    sharded_weights = shard_weights(model, family, mesh) if c.shard_weights else None
    # 7. the host's quantized layers: what this mesh cannot split is refused before a byte is read
    host_quant = getattr(model, "host_quant", None)
    if host_quant is not None:
        host_quant.refuse_split_blocks(model)
    return Parallelized(seq_state, plan_hooks, pipeline, sharded_weights, gguf_stats)


def finish_after_load(model, parts: Parallelized, path: str) -> None:
    """The steps after the weights are in: the pipeline's hops, then the check that every plan hook survived."""
    # 8. pipeline hops after the plan's hooks: a stage's first block splits, then receives
    if parts.pipeline is not None:
        parts.pipeline.install_hops()
    # 9. a rank missing a hook would return only its own tokens: fail loudly rather than sample garbage
    lost = missing_plan_hooks(model, parts.plan_hooks)
    if lost:
        raise RuntimeError(f"{path}: the parallel plan's hooks are missing after loading: {lost}")


def cut_pipeline(model, family, mesh, path: str):
    """This rank's pipeline stage of `model`: its blocks kept, the others pass-throughs; refused for a class the
    family's pipeline does not run."""
    from ..parallel.pipeline import PipelineStage

    c, classes = mesh.config, getattr(family, "PIPELINE_CLASSES", ())
    if type(model).__name__ not in classes:
        raise ValueError(f"{path}: pipeline stages (pp={c.pp}) run {', '.join(classes) or 'no class'} of "
                         f"{family.FAMILY}, not ComfyUI's {type(model).__name__}: set pp to 1 and use "
                         f"ulysses / ring / cfg (or sharded weights to fit)")
    blocks = getattr(family, "PIPELINE_BLOCKS", family.BLOCKS)  # a family whose blocks are several lists names them
    stage = PipelineStage(model, blocks, mesh.coord["pp"], c.pp, mesh.groups["pp"], c.stage_split)
    stage.skip_outside()
    return stage


def keep_gguf_quantized(model, header, prefix: str) -> dict:
    """For a GGUF file (its header names an architecture): its quantized linears kept quantized; {} otherwise."""
    if getattr(header, "architecture", None) is None:
        return {}
    from ..weights.gguf_linear import keep_quantized
    return keep_quantized(model, header, prefix)


def shard_weights(model, family, mesh):
    """Each of the family's shard units (its blocks by default) wrapped by FSDP2 over the weights mesh, then
    materialized on the rank's device, empty, for the load to fill."""
    from ..parallel.sharded_weights import ShardedWeights

    sharded = ShardedWeights(model, getattr(family, "SHARD_UNITS", (family.BLOCKS,)), mesh.weights_mesh)
    sharded.materialize(mesh.device)
    return sharded


def compile_blocks(model, blocks_attr: str, spec: dict | None) -> None:
    """10. compile, last and per call: each transformer block on its own (regional compilation: one graph serves every
    block of the same shape, and the collectives between them stay outside); `spec` None: back to eager."""
    blocks = getattr(model, blocks_attr)
    for block in (blocks.values() if isinstance(blocks, torch.nn.ModuleDict) else blocks):  # Cosmos 1: a dict
        if spec is None:
            block._compiled_call_impl = None  # back to eager
        else:
            block.compile(**spec)
