"""Pipeline stages (pp): each stage holds a contiguous range of the transformer blocks; the activation goes stage to
stage with point-to-point sends; a batch's rows run as micro-batches, so while stage s computes row k, stage s - 1
already computes row k + 1 (GPipe's forward schedule, falling out of asynchronous sends).

Each stage runs the host's own forward whole: the embeddings and the head (small, outside the blocks) run on every
stage, the blocks outside the stage's range are `SkippedBlock`s (identity, no weights, the plan's hooks carried
over). The block before a stage's range gives the previous stage's output as its own (a receive into the shape the
local tensor has at that point, so Ulysses / Ring inside a stage compose: rank (s, u) talks to rank (s +- 1, u));
the last block of the range sends its output on, tensor by tensor where it is a tuple of streams (LTX-2's (video,
audio), HunyuanVideo's (img, txt)). Several block lists (HunyuanVideo 1.0's double, then single blocks) are cut as
one sequence. Only the last stage's output is real: it is the replica's leader.
A block-replacement patch (SkipLayerGuidance) could skip a stage's boundary block and with it a send: refused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .collectives import _count


def stage_ranges(layers: int, stages: int, split: tuple = ()) -> list:
    """[(start, stop)] blocks per stage: proportional to `split` (e.g. (24, 16): memory in GB per stage's devices),
    equal when empty; every stage gets at least one block."""
    if stages < 1 or layers < stages:
        raise ValueError(f"{layers} blocks cannot be split into {stages} pipeline stages (at most {layers})")
    weights = list(split) if split else [1] * stages
    if len(weights) != stages or any(w <= 0 for w in weights):
        raise ValueError(f"stage_split {tuple(split)} must give {stages} positive numbers, one per pipeline stage")
    total, out, start, acc = sum(weights), [], 0, 0.0
    for s, w in enumerate(weights):
        acc += w
        stop = layers if s == stages - 1 else round(layers * acc / total)
        stop = min(max(stop, start + 1), layers - (stages - 1 - s))  # one block at least, for every later stage too
        out.append((start, stop))
        start = stop
    return out


class SkippedBlock(nn.Module):
    """A block another stage holds: passes its input through (the keyword streams `carry` names, as a tuple, for
    blocks called by keyword: HunyuanVideo's double blocks take and return img and txt)."""

    def __init__(self, index: int, carry: tuple = ()):
        super().__init__()
        self.index, self.carry = index, carry

    def forward(self, *args, **kwargs):
        return tuple(kwargs[name] for name in self.carry) if self.carry else args[0]

    def extra_repr(self) -> str:
        return f"block {self.index} lives on another pipeline stage"


class PipelineStage:
    """This rank's stage of `model`'s blocks: `blocks` is a ModuleList path, or ((path, carry), ...) for lists run
    one after the other (HunyuanVideo 1.0: double, then single blocks), cut as one sequence of blocks. Blocks
    outside the range are replaced (call `skip_outside` before TP / loading), the hops installed after the plan's
    hooks (`install_hops`)."""

    def __init__(self, model: nn.Module, blocks, stage: int, stages: int, group, split: tuple = ()):
        self.model, self.stage, self.stages, self.group = model, stage, stages, group
        self.blocks = []  # (module path, carry): carry names the keyword streams a block takes and returns
        for path, list_carry in ([(blocks, ())] if isinstance(blocks, str) else blocks):
            container = model.get_submodule(path)
            if not isinstance(container, nn.ModuleList):
                raise ValueError(f"pipeline stages need the blocks as a list; {path} is a {type(container).__name__}")
            self.blocks += [(f"{path}.{i}", tuple(list_carry)) for i in range(len(container))]
        self.ranges = stage_ranges(len(self.blocks), stages, split)
        self.start, self.stop = self.ranges[stage]
        self.pending: list = []  # (work, tensor) of sends not yet completed
        self.sent = self.received = 0

    def skip_outside(self) -> None:
        from .plan import replace_module

        for i, (name, carry) in enumerate(self.blocks):
            if not self.start <= i < self.stop:
                replace_module(self.model, name, SkippedBlock(i, carry))

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def install_hops(self) -> None:
        """The block before this stage's first one (a SkippedBlock here) gives the received streams as its output,
        so whatever the host does between blocks, and the plan's hooks on the first block, see them as they would
        unsplit; the last block of the range sends its output on."""
        if self.stage > 0:
            self.model.get_submodule(self.blocks[self.start - 1][0]).register_forward_hook(self._receive)
        if self.stage < self.stages - 1:
            self.model.get_submodule(self.blocks[self.stop - 1][0]).register_forward_hook(self._send)

    def _receive(self, module, args, out):
        bufs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in _streams(out)]  # contiguous
        for buf in bufs:
            dist.recv(buf, src=self._peer(self.stage - 1))
        self.received += 1
        return bufs[0] if isinstance(out, torch.Tensor) else type(out)(bufs)

    def _send(self, module, args, out):
        for t in _streams(out):
            t = t.contiguous()
            _count("pp_p2p", t.numel() * t.element_size())
            self.pending.append((dist.isend(t, dst=self._peer(self.stage + 1)), t))
        self.sent += 1
        return out

    def finish(self) -> None:
        """Wait for this stage's sends (after all micro-batches of a call were issued)."""
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1


def _streams(x) -> list:
    """The tensors a block passes on: one, or a tuple / list of them (LTX-2's (video, audio) pair), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise TypeError(f"a pipeline stage passes a tensor or a tuple of tensors between blocks, not {type(x).__name__}")


def refuse_block_patches(transformer_options) -> None:
    """Block replacements could skip a stage's boundary block (and its send): not with pipeline stages."""
    replace = ((transformer_options or {}).get("patches_replace") or {}).get("dit") or {}
    if replace:
        names = ", ".join(sorted(map(str, replace))[:3])
        raise ValueError(f"block replacement patches ({names}; e.g. SkipLayerGuidanceDiT) cannot run on pipeline "
                         f"stages (a skipped boundary block would never hand its activation on): set pp to 1 and "
                         f"use ulysses / ring / cfg, or remove the patching node")


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """GPipe's idle share of a forward: (P - 1) / (M + P - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)
