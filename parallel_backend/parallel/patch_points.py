"""Model patches (ComfyUI's `transformer_options["patches"]` / `["patches_replace"]`) run on a sharded model exactly
as on the whole one.

A patch is code a node hands the host's model class (InfiniteTalk's audio cross-attention after each block's
cross-attention, a ControlNet-like residual after each block, SkipLayerGuidance's block replacement). The host
calls it at its patch points with the tensors it holds there: on a rank those are its share of the tokens (and of
the heads under TP), where the patch was written for the whole sequence. A patch that looks across tokens (an
attention map, a mean over tokens, a per-frame audio cross-attention) would silently compute something else.

So every patch a call carries is wrapped here before the host's code sees it: at a point where the tokens are split,
the wrapper gathers the tensors the family's plan names (`PatchPoint`) to the whole sequence (and the whole width
under TP), calls the patch, and cuts what it returns back to this rank's share. Every rank computes the patch on
the whole sequence (the same values on each, as the native model computes it once): correct for any patch, and its
cost is one all-gather per named tensor per patched call. Where the tokens are whole (one sequence rank, or before
the first split), the patch runs untouched.

A block replacement (`patches_replace`) gets the whole sequence too; the block it may call (`original_block`) runs
on this rank's share as usual.

Which patch points a family's host class applies, and the layout of each tensor there, is data in the family file
(`PATCH_POINTS`, `BLOCK_REPLACE`); a patch point the host applies that the family does not describe is refused by
the nodes before the call (nodes/patches.py), never run on a share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import contextlib

import torch

from .attention import ACTIVE_SEQUENCE_STATES
from .collectives import all_gather


@dataclass(frozen=True)
class Tokens:
    """A tensor the host hands a patch: its token axis `dim` (split over the sequence ranks), and `tp_dim`, an axis
    TP splits (the heads, or the channels of a head-sharded activation), gathered over TP as well. `grid`: the
    tokens are a grid (B, T, H, W, ...) with frames at `dim` (Cosmos' blocks), split by frame plane."""
    dim: int
    tp_dim: int | None = None
    grid: bool = False


@dataclass(frozen=True)
class PatchPoint:
    """One patch point of a host class. `args`: where the split tensors sit in the host's call of the patch, each
    ("dict", key) - a key of the one dict the host passes (`p({"x": ..., "q": ...})`), ("pos", i) a positional
    argument, ("kw", name) a keyword argument; `returns`: where they sit in what the patch returns: ("value", None) the
    returned tensor itself, ("dict", key) a key of a returned dict. Either maps to the tensor's `Tokens`."""
    args: dict = field(default_factory=dict)
    returns: dict = field(default_factory=dict)
    between_blocks: bool = False  # called by the model's block loop, outside the blocks (every pipeline stage runs
    #                               it, whether or not it holds the block: refused with pp > 1)


@dataclass(frozen=True)
class BlockReplace:
    """A block replacement point (`patches_replace[group][(kind, index)]`): `args` names the split tensors of the
    dict the host passes (e.g. {"img": Tokens(1)}), `returns` those of the dict the replacement returns; the
    `original_block` it is given takes and returns the same dicts."""
    args: dict = field(default_factory=dict)
    returns: dict = field(default_factory=dict)


@dataclass
class ShareContext:
    """What a wrapper needs of this rank for the current call: the sequence state (its split and groups) and the
    TP group."""
    seq_state: object
    tp_group: object = None
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def split(self) -> bool:
        return bool(self.seq_state.is_split and self.seq_state.degree > 1)

    def whole(self, t, layout: Tokens):
        if not torch.is_tensor(t):
            return t
        if layout.tp_dim is not None and self.tp_size > 1:
            t = all_gather(t.contiguous(), self.tp_group, layout.tp_dim)
        return self.seq_state.whole(t, layout.dim, layout.grid) if self.split else t

    def share(self, t, layout: Tokens):
        if not torch.is_tensor(t):
            return t
        if self.split:
            t = self.seq_state.local(t, layout.dim, layout.grid)
        if layout.tp_dim is not None and self.tp_size > 1:
            n = t.shape[layout.tp_dim] // self.tp_size
            t = t.narrow(layout.tp_dim, self.tp_rank * n, n)
        return t.contiguous()

    def active(self, layouts: dict) -> bool:
        """Whether anything must be gathered at all for these layouts in this call."""
        return self.split or (self.tp_size > 1 and any(lo.tp_dim is not None for lo in layouts.values()))


def _map_call(args: tuple, kwargs: dict, where: dict, fn) -> tuple:
    """(args, kwargs) with fn(tensor, layout) applied to the tensors `where` names."""
    args, kwargs = list(args), dict(kwargs)
    for (kind, name), layout in where.items():
        if kind == "dict" and args and isinstance(args[0], dict) and name in args[0]:
            args[0] = {**args[0], name: fn(args[0][name], layout)}
        elif kind == "pos" and name < len(args):
            args[name] = fn(args[name], layout)
        elif kind == "kw" and name in kwargs:
            kwargs[name] = fn(kwargs[name], layout)
    return tuple(args), kwargs


def _map_result(out, where: dict, fn):
    """What a patch returned, with fn(tensor, layout) applied to the tensors `where` names (a dict is copied)."""
    for (kind, name), layout in where.items():
        if kind == "value" and torch.is_tensor(out):
            return fn(out, layout)
        if kind == "dict" and isinstance(out, dict) and name in out:
            out = {**out, name: fn(out[name], layout)}
    return out


@contextlib.contextmanager
def outside_sequence_attention():
    """A patch holds the whole sequence: attention it calls (through the host's function, which the plan wraps) is
    plain attention, not the split one of the block it was called from."""
    ACTIVE_SEQUENCE_STATES.append(None)
    try:
        yield
    finally:
        ACTIVE_SEQUENCE_STATES.pop()


class WholeSequencePatch:
    """A patch wrapped to see the whole sequence at its patch point (see the module doc)."""

    def __init__(self, patch, point: PatchPoint, ctx: ShareContext):
        self.patch, self.point, self.ctx = patch, point, ctx

    def __call__(self, *args, **kwargs):
        ctx, point = self.ctx, self.point
        if not ctx.active(point.args):
            return self.patch(*args, **kwargs)
        args, kwargs = _map_call(args, kwargs, point.args, ctx.whole)
        with outside_sequence_attention():
            out = self.patch(*args, **kwargs)
        return _map_result(out, point.returns, ctx.share)

    def __getattr__(self, name):  # the host may read a patch's attributes (e.g. `models`)
        return getattr(self.patch, name)


class WholeSequenceReplacement:
    """A block replacement wrapped to see the whole sequence; the original block it calls runs on this rank's share.
    Before the first split (a replacement of the first block) nothing is gathered; if the block it calls splits the
    tokens there, its output is gathered for the replacement and what the replacement returns is cut again."""

    def __init__(self, replacement, point: BlockReplace, ctx: ShareContext):
        self.replacement, self.point, self.ctx = replacement, point, ctx

    def __call__(self, args: dict, extra: dict):
        ctx, point = self.ctx, self.point
        was_split = ctx.split
        if was_split:
            args = _map_call((args,), {}, _dict_keys(point.args), ctx.whole)[0][0]
        extra = {**extra, "original_block": self._original(extra["original_block"])}
        with outside_sequence_attention():  # (the original block's own attention scope opens inside it)
            out = self.replacement(args, extra)
        return _map_result(out, _dict_keys(point.returns), ctx.share) if ctx.split else out

    def _original(self, block):
        ctx, point = self.ctx, self.point

        def original_block(args):
            if ctx.split:  # the whole tokens the replacement holds: run the block on this rank's share
                args = _map_call((args,), {}, _dict_keys(point.args), ctx.share)[0][0]
            out = block(args)
            return _map_result(out, _dict_keys(point.returns), ctx.whole) if ctx.split else out
        return original_block


def _dict_keys(layouts: dict) -> dict:
    return {("dict", k): v for k, v in layouts.items()}


class PatchRefused(ValueError):
    """A patch the ranks cannot run as natively; the message names it and what to change."""


def describe(patch) -> str:
    """A patch as a user can find it: its class (or function) and module, which name the node that made it."""
    kind = patch if callable(patch) and hasattr(patch, "__qualname__") else type(patch)
    return f"{getattr(kind, '__qualname__', type(patch).__name__)} ({getattr(kind, '__module__', '?')})"


class UndescribedPatch:
    """A patch at a point the family does not describe: it runs where the tokens are whole; on a split sequence the
    host would hand it this rank's share only, so it is refused there, naming the point and the patch."""

    def __init__(self, patch, point: str, ctx: ShareContext, model: str):
        self.patch, self.point, self.ctx, self.model = patch, point, ctx, model

    def __call__(self, *args, **kwargs):
        if self.ctx.split or self.ctx.tp_size > 1:
            raise PatchRefused(
                f"the model patch {describe(self.patch)} at ComfyUI's patch point '{self.point}' of {self.model} "
                f"would see only this rank's share of the tokens, and the pack has no whole-sequence plan for that "
                f"point: remove the node that adds it, or run it on a mesh without ulysses / ring / tp (cfg, dp, pp), "
                f"or sample with the native model")
        return self.patch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.patch, name)


def refuse_between_blocks(options: dict, points: dict) -> None:
    """Pipeline stages: patches the block loop calls between blocks would run on every stage, on activations only
    the stage holding the block has."""
    named = [n for n, plist in ((options or {}).get("patches") or {}).items()
             if plist and points.get(n) is not None and points[n].between_blocks]
    if named:
        raise PatchRefused(f"model patches at {named} (between the transformer blocks; e.g. a Uni3C / DiffSynth "
                           f"ControlNet patch) cannot run on pipeline stages: set pp to 1 and use ulysses / ring / cfg, "
                           f"or remove the patching node")


def wrap_patches(options: dict, points: dict, replace_points: dict, ctx: ShareContext, model: str = "the model"
                 ) -> dict:
    """`options` (a call's transformer_options) with each patch at a described point, and each block replacement,
    wrapped to see the whole sequence. A patch at a point the family does not describe runs as is where the tokens are
    whole and is refused if the host calls it on a split sequence (the host ignores it, as natively, if it has no
    such point)."""
    out = dict(options)
    patches = options.get("patches") or {}
    if patches:
        out["patches"] = {name: [WholeSequencePatch(p, points[name], ctx) if name in points else
                                 UndescribedPatch(p, name, ctx, model) for p in plist]
                          for name, plist in patches.items()}
    replaces = options.get("patches_replace") or {}
    if replaces:
        out["patches_replace"] = {
            group: {key: _wrap_replace(group, key, r, replace_points, ctx, model) for key, r in entries.items()}
            for group, entries in replaces.items()}
    return out


def _wrap_replace(group, key, replacement, replace_points: dict, ctx: ShareContext, model: str):
    kind = key[0] if isinstance(key, tuple) else key
    point = replace_points.get((group, kind))
    if point is None:
        return UndescribedPatch(replacement, f"patches_replace {group}/{kind}", ctx, model)
    return WholeSequenceReplacement(replacement, point, ctx)


# ComfyUI's per-call transformer_options that hold one entry per row of the batch (`sigmas`) or per chunk of rows
# (`cond_or_uncond`, `uuids`: one per cond batched into the call): a replica computing some of the rows sees its own
ROW_OPTIONS = ("sigmas",)
CHUNK_OPTIONS = ("cond_or_uncond", "uuids")


def options_for_rows(options: dict, rows: slice, batch: int) -> dict:
    """`options` as the model would see them for the batch rows `rows` only."""
    if not options or (rows.start == 0 and rows.stop == batch):
        return options
    out = dict(options)
    for key in ROW_OPTIONS:
        v = out.get(key)
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch:
            out[key] = v[rows]
    for key in CHUNK_OPTIONS:
        v = out.get(key)
        if isinstance(v, (list, tuple)) and v and batch % len(v) == 0:
            per = batch // len(v)
            out[key] = type(v)(v[rows.start // per:(rows.stop - 1) // per + 1])
    return out
