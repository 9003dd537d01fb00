"""Apply a model family's parallel plan (data in parallel_backend/models/<family>.py) to a model.

A plan says, by module path pattern:
  - tp:         which layers become column / row parallel, which norms become head-sharded;
  - seq_split:  which module inputs / outputs are split over the sequence ranks (padded tail);
  - seq_gather: which module output is gathered back to the full sequence;
  - attention_heads / sequence_attention: which attention modules divide their heads by tp, and whose attention
                call runs sequence-parallel (the family installs the wrapper: parallel/attention.py).
The plan is data beside the model, as diffusers keeps `_cp_plan`; the order the appliers run in, with the other
transforms, is runtime/parallelize.py's (as torchtitan's `parallelize_<model>`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ACTIVE_SEQUENCE_STATES, KeysOf, SequenceParallelGroups, flat_key_valid
from .collectives import all_gather
from .tensor_parallel import TP_STYLES


@dataclass(frozen=True)
class SeqSplit:
    """Split a tensor over the sequence ranks along `dim`; skip tensors whose ndim differs.

    per_token: the tensor holds one entry per token, or one for all (size 1: left whole), or one per group of
    tokens that the model stretches over the tokens (ComfyUI's `repeat_e`: Wan's per-frame timesteps); each rank
    takes the entries of its own tokens only, never the full per-token expansion."""
    dim: int
    expected_ndim: int | None = None
    per_token: bool = False
    first_only: bool = False  # split only in the first module of the pattern that runs in a forward (a block
    #                           replacement may skip the first block: the next one that runs takes the split)
    frames: bool = False  # the tokens are flat and frame-major (B, T * plane, ...), `plane` tokens a frame (learnt
    #                       from the plan's `plane_from` module): split like a grid, each rank n tokens of every frame
    rest: bool = False  # with frames: only the first T frames (T from the `plane_from` module's first call) are frames;
    #                     the tokens after them (other grids: S2V's motion tokens) are held whole by every rank and
    #                     count as keys on the first rank only
    grid: bool = False  # the tokens are a grid (B, T, H, W, ...) with frames at `dim`: frames stay whole (per-frame
    #                     operations see every frame) and each frame's H x W plane is split, padded at its end
    segments: bool = False  # not a tensor: a list of (start, stop, row) over the whole flat sequence (MiniMax H3's
    #                         per-segment modulation; `row` an index or one per token): cut to this rank's tokens
    item: int | None = None  # the tensor is this item of a tuple the module gets (ComfyUI 0.33's LTX rope:
    #                          (rotation matrix, split mode)); the tuple's other items pass unchanged
    joint: str | None = None  # not cut: a stream held whole by every rank that joins the split tokens in one attention
    #                           ("before" or "after" them: HunyuanVideo's text), counted as keys of the first chunk
    #                           only (as xDiT's joint attention); its length is recorded, and a per-token table over
    #                           both streams (the rope) keeps that part whole


@dataclass(frozen=True)
class SeqGather:
    dim: int
    grid: bool = False  # the inverse of a grid split: (B, T, 1, n, ...) back to (B, T, H, W, ...), frames at `dim`
    #                     (an output, or an input the host reshaped back to its grid: Kandinsky 5's out layer)
    frames: bool = False  # the inverse of a `frames` split: (B, T * n, ...) back to (B, T * plane, ...)
    flat: bool = False  # with grid: the output holds each frame's n tokens at `dim`, its frames folded into another
    #                     axis (ComfyUI's Cosmos 1 final layer: (B * T, n, C)); gathered to (..., H * W, ...)
    share_first: bool = False  # (an input gather) the tensor starts with this rank's split tokens; what follows them
    #                            (joint tokens a host's cut by the whole length left: ComfyUI 0.3.75's HunyuanVideo
    #                            `img[:, :img_len]`) is dropped before the gather


@dataclass(frozen=True)
class ParallelPlan:
    tp: dict = field(default_factory=dict)            # pattern -> "host_colwise" | "host_rowwise" | "head_norm"
    seq_split_inputs: dict = field(default_factory=dict)   # module -> {arg index: SeqSplit}
    seq_split_outputs: dict = field(default_factory=dict)  # module -> {output index: SeqSplit}
    seq_gather_outputs: dict = field(default_factory=dict)  # module -> SeqGather
    attention_heads: tuple = ()                       # patterns of modules with a `heads` attr to divide by tp (or
    #                                                   (pattern, attribute) where a module names it otherwise)
    heads_attr: str = "heads"                         # that attribute's name (ComfyUI's Wan: num_heads)
    seq_split_kwargs: dict = field(default_factory=dict)   # module pattern -> {keyword: SeqSplit}
    sequence_attention: tuple = ()                    # patterns of modules whose attention call runs sequence-parallel
    # module pattern -> frames dim of its first input: a module that reads only that input's shape (ComfyUI's Cosmos 1
    # position embedders, given the embedded grid) is handed a stand-in of the whole grid's shape after a grid split,
    # so it computes every token's entry (which seq_split_outputs then cuts to this rank's tokens)
    grid_shape_inputs: dict = field(default_factory=dict)
    # patterns of modules whose output (B, C, T, H, W) gives the tokens per frame (H * W) for `frames` splits (Wan's
    # patch embedding: what follows it in the sequence, reference frames included, is frames of that plane)
    plane_from: tuple = ()
    # module pattern -> index of a positional arg (or name of a keyword) that is the main frames' token count (S2V's
    # audio injector slices x[:, :seq_len]): replaced by this rank's count of them after a `frames` split
    main_length_args: dict = field(default_factory=dict)
    # a `frames` split's unit is 1 / plane_runs of a frame: each frame's tokens in that many equal runs, each rank n
    # tokens of every run (WanDancer's music injector gives each eighth of a frame its own music token)
    plane_runs: int = 1
    # module pattern -> {arg index: SeqGather}: inputs gathered back to the whole sequence before the module runs (a
    # head that slices its streams out of the packed sequence by position: MiniMax H3's final layer)
    seq_gather_inputs: dict = field(default_factory=dict)
    # patterns of modules whose attention call takes its keys / values from this split's tokens and its queries from
    # another stream split by another state (LTX-2's audio <-> video cross-attention): the keys are gathered whole
    key_gather_attention: tuple = ()


def extend_plan(plan: ParallelPlan, extra: ParallelPlan) -> ParallelPlan:
    """`plan` with a variant's additions (its added modules' entries; a pattern both name gets both specs)."""
    def merged(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = {**out[k], **v} if isinstance(v, dict) and k in out else v
        return out

    if extra.heads_attr != plan.heads_attr and any(isinstance(e, str) for e in extra.attention_heads):
        raise ValueError(f"a plan extension names heads by {extra.heads_attr!r}, the plan by {plan.heads_attr!r}")
    return ParallelPlan(
        tp={**plan.tp, **extra.tp}, seq_split_inputs=merged(plan.seq_split_inputs, extra.seq_split_inputs),
        seq_split_outputs=merged(plan.seq_split_outputs, extra.seq_split_outputs),
        seq_gather_outputs={**plan.seq_gather_outputs, **extra.seq_gather_outputs},
        attention_heads=plan.attention_heads + extra.attention_heads, heads_attr=plan.heads_attr,
        seq_split_kwargs=merged(plan.seq_split_kwargs, extra.seq_split_kwargs),
        sequence_attention=plan.sequence_attention + extra.sequence_attention,
        grid_shape_inputs={**plan.grid_shape_inputs, **extra.grid_shape_inputs},
        plane_from=plan.plane_from + extra.plane_from,
        main_length_args={**plan.main_length_args, **extra.main_length_args},
        plane_runs=max(plan.plane_runs, extra.plane_runs),
        seq_gather_inputs=merged(plan.seq_gather_inputs, extra.seq_gather_inputs),
        key_gather_attention=plan.key_gather_attention + extra.key_gather_attention)


class SequenceState:
    """Per-forward facts the split hooks learn and attention needs (real length before padding), and the
    sequence groups of the current call: a call may use a wider split than the mesh's own (the replicas that
    own no row of it fold into the sequence; see runtime/mesh.py), so `use` sets them before each forward."""

    def __init__(self, groups: SequenceParallelGroups, index: int):
        self.groups, self.index = groups, index
        self.valid_len: int | None = None
        self.padded = False
        self.local_len = 0  # tokens this rank holds after the last split (its share of the work)
        self.tokens_pending = True  # set before each forward: the tokens are still whole (first_only splits)
        self.grid: tuple | None = None  # (T, H, W) after a grid split: the keys' padding lies in every frame
        self.plane: int | None = None  # tokens per frame of a flat frame-major sequence (plan's `plane_from`)
        self.main: tuple | None = None  # (frames, plane) of the first `plane_from` output this forward
        self.rest = 0  # tokens after the frames that every rank holds whole (a `rest` split)
        self.is_split = False  # this forward's tokens are split over the sequence ranks (by any kind of split)
        self.joint = (0, 0)  # (before, after): tokens of a joint stream every rank holds whole around its split ones

    def begin_forward(self) -> None:
        """Before each forward: the tokens are whole again."""
        self.local_len, self.tokens_pending, self.grid, self.plane, self.main, self.rest = 0, True, None, None, None, 0
        self.is_split, self.joint = False, (0, 0)

    # ---- whole-sequence views for code that must see every token (a model patch: parallel/patch_points.py) ------
    def whole(self, t: torch.Tensor, dim: int, grid: bool = False) -> torch.Tensor:
        """This forward's split tokens at `dim` of `t` (this rank's share, as the last split cut them) gathered
        back to the whole sequence in its own order, padding dropped; `t` itself when nothing is split. `grid`: `t`
        holds them as a grid (B, T, 1, n, ...) with frames at `dim` (after a grid split), given back as (B, T, H, W,
        ...); otherwise flat, frame-major after a grid or frames split."""
        if not self.is_split or self.degree == 1:
            return t
        if self.grid is None:
            return self.gather(t, dim)
        return self.gather_grid(t, dim) if grid else self.gather_frames(t, dim)

    def local(self, t: torch.Tensor, dim: int, grid: bool = False) -> torch.Tensor:
        """The inverse of `whole`: this rank's share of a whole-sequence tensor, cut as this forward's tokens were
        (padding repeats the last token: padded tokens are masked as keys and dropped at the gather)."""
        if not self.is_split or self.degree == 1:
            return t
        if self.grid is None:
            return self._narrow_padded(t, dim)
        if grid:  # (B, T, H, W, ...) -> this rank's n tokens of each frame's plane, (B, T, 1, n, ...)
            plane = t.flatten(dim + 1, dim + 2)
            return self._narrow_padded(plane, dim + 1).unsqueeze(dim + 1)
        return t.index_select(dim, self.local_positions(t.device))

    def use(self, groups: SequenceParallelGroups, index: int) -> None:
        self.groups, self.index = groups, index

    @property
    def degree(self) -> int:
        return self.groups.degree

    def split(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        s = t.shape[dim]
        self.grid = None
        if self.degree == 1:  # this call runs unsplit (hooks stay installed for calls that split)
            self.valid_len, self.padded, self.local_len = s, False, s
            return t
        pad = (-s) % self.degree
        self.valid_len, self.padded, self.is_split = s, pad > 0, True
        if pad:
            widths = [0, 0] * (t.ndim - 1 - dim % t.ndim) + [0, pad]
            t = F.pad(t, widths)
        n = t.shape[dim] // self.degree
        self.local_len = n
        return t.narrow(dim, self.index * n, n).contiguous()

    def split_grid(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """(B, T, H, W, ...) with frames at `dim` -> (B, T, 1, n, ...): this rank's n = ceil(H*W / degree) tokens of
        every frame's plane (flattened row-major, the last chunk padded). Rank order over the whole sequence is
        then chunk-major, a permutation of the frame-major order, which attention does not see: each token keeps
        its own rope entry (split with `split_per_token`) and padded keys are masked by `key_valid`."""
        frames, h, w = t.shape[dim:dim + 3]
        self.grid = None
        if self.degree == 1:
            self.valid_len, self.padded, self.local_len = frames * h * w, False, frames * h * w
            return t
        plane = t.flatten(dim + 1, dim + 2)
        n = -(-(h * w) // self.degree)
        pad = n * self.degree - h * w
        if pad:
            plane = F.pad(plane, [0, 0] * (plane.ndim - 2 - dim) + [0, pad])
        self.grid, self.valid_len, self.padded, self.local_len = (frames, h, w), frames * h * w, pad > 0, frames * n
        self.is_split = True
        return plane.narrow(dim + 1, self.index * n, n).unsqueeze(dim + 1).contiguous()

    def split_frames(self, t: torch.Tensor, dim: int, rest: bool = False) -> torch.Tensor:
        """A flat frame-major sequence (B, T * plane, ...) -> (B, T * n, ...): this rank's n tokens of every frame, as
        `split_grid` cuts a (T, 1, plane) grid. Per-frame operations on the local tokens (a frame's audio
        cross-attention: `(B * T, n)` queries) then see every frame. `rest`: only the first frames (as the
        `plane_from` module saw them) are frames; the tokens after them follow whole on every rank."""
        length = t.shape[dim]
        if self.degree == 1:
            self.grid, self.rest, self.valid_len, self.padded, self.local_len = None, 0, length, False, length
            return t
        if rest:
            if self.main is None:
                raise ValueError("a frames + rest split before the plan's plane_from module ran")
            frames, plane = self.main
        else:
            plane = self.plane
            if not plane or length % plane:
                raise ValueError(f"a frame-major sequence of {length} tokens is not whole frames of {plane} tokens")
            frames = length // plane
        main = t.narrow(dim, 0, frames * plane)
        local = self.split_grid(main.unflatten(dim, (frames, 1, plane)), dim).flatten(dim, dim + 2)
        self.rest = length - frames * plane
        if self.rest:
            local = torch.cat([local, t.narrow(dim, frames * plane, self.rest)], dim)
            self.local_len += self.rest
            self.valid_len, self.padded = length, True  # the rest counts once: as keys of the first chunk only
        return local

    def gather_frames(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The inverse of `split_frames`; the model may have cut the rest off before (SCAIL drops its pose tokens
        before the head)."""
        if self.grid is None:  # this call ran unsplit
            return t
        rest = self.rest if t.shape[dim] == self.local_len else 0
        frames, main_local = self.grid[0], t.shape[dim] - rest
        main = self.gather_grid(t.narrow(dim, 0, main_local).unflatten(dim, (frames, 1, main_local // frames)), dim)
        main = main.flatten(dim, dim + 2)
        return torch.cat([main, t.narrow(dim, main_local, rest)], dim) if rest else main

    @property
    def main_local_len(self) -> int:
        """Tokens of the frames this rank holds (without the rest)."""
        return self.local_len - self.rest

    def local_positions(self, device=None, frames: int | None = None) -> torch.Tensor:
        """The position in the whole (frame-major, then rest) sequence of each token this rank holds after a grid /
        frames split; padding maps to its frame's last token. `frames`: of another stream of that many frames of
        the same plane, split alike (WanAnimate2's pose tokens beside its video tokens)."""
        n = self.main_local_len // self.grid[0]
        frames, h, w = frames or self.grid[0], *self.grid[1:]
        j = torch.arange(self.index * n, self.index * n + n, device=device).clamp(max=h * w - 1)
        main = (torch.arange(frames, device=device)[:, None] * (h * w) + j[None]).flatten()
        return torch.cat([main, frames * h * w + torch.arange(self.rest, device=device)]) if self.rest else main

    def gather_grid(self, t: torch.Tensor, dim: int, flat: bool = False) -> torch.Tensor:
        """The inverse of `split_grid`: (B, T, 1, n, ...) from every rank back to (B, T, H, W, ...); `flat`: each
        frame's n tokens at `dim` (frames folded into another axis) back to its H * W tokens."""
        if self.grid is None:  # this call ran unsplit
            return t
        _, h, w = self.grid
        if flat:
            return self.gather(t, dim, narrow=False).narrow(dim, 0, h * w)
        plane = self.gather(t.squeeze(dim + 1), dim + 1, narrow=False)
        return plane.narrow(dim + 1, 0, h * w).unflatten(dim + 1, (h, w))

    def key_valid(self, first: int, count: int, device=None, frames: int | None = None) -> torch.Tensor | None:
        """Validity of the keys of sequence chunks [first, first + count) in their order on the ranks (chunk-major),
        or None when none of them is padding (see parallel/attention.py). `frames`: each chunk's keys are that many
        frames of the split's plane instead (another stream split alike, or some frames of each)."""
        if any(self.joint) and self.is_split:
            return self.joint_key_valid(first, count, device)
        if not self.padded:
            return None
        if self.grid is None:
            return flat_key_valid(self.valid_len, self.local_len)(first, count, device)
        n = self.main_local_len // self.grid[0]
        frames, h, w = frames or self.grid[0], *self.grid[1:]
        if (first + count) * n <= h * w and not self.rest:
            return None
        pos = torch.arange(first * n, (first + count) * n, device=device).view(count, 1, n)
        keep = (pos < h * w).expand(count, frames, n).reshape(count, frames * n)
        if self.rest:  # the rest, held by every rank, is a key of the first chunk only
            first_chunk = (torch.arange(first, first + count, device=device) == 0).view(count, 1)
            keep = torch.cat([keep, first_chunk.expand(count, self.rest)], 1)
        return keep.flatten()

    # ---- a joint stream (SeqSplit.joint): whole on every rank, beside the split tokens in one attention ----------
    def record_joint(self, t: torch.Tensor, dim: int, where: str) -> torch.Tensor:
        """Note the length of a joint stream (`where`: "before" / "after" the split tokens); `t` is not cut."""
        if where not in ("before", "after"):
            raise ValueError(f"a joint stream lies 'before' or 'after' the split tokens, not {where!r}")
        if self.is_split and self.grid is None:
            self.joint = (t.shape[dim], 0) if where == "before" else (0, t.shape[dim])
        return t

    def joint_key_valid(self, first: int, count: int, device=None, joint_keep: torch.Tensor | None = None):
        """Validity of the keys of chunks [first, first + count), each chunk [joint before | n split | joint after]:
        the joint tokens count in the first chunk only (`joint_keep`: which of them are keys at all, from the host's
        key mask), the split ones where they are not padding."""
        before, after = self.joint
        n = self.local_len
        split = torch.arange(first * n, (first + count) * n, device=device).view(count, n) < self.valid_len
        is_first = (torch.arange(first, first + count, device=device) == 0).view(count, 1)
        keep = torch.ones(before + after, dtype=torch.bool, device=device) if joint_keep is None \
            else joint_keep.to(device)
        joint = is_first & keep.view(1, -1)
        return torch.cat([joint[:, :before], split, joint[:, before:]], 1).flatten()

    def joint_key_mask(self, mask: torch.Tensor):
        """A `key_valid` for an attention the host calls with an additive key mask over the whole joint sequence
        (1, 1, before + valid_len + after), that masks only joint tokens, each by 0 (a key) or the dtype's lowest
        value / -inf (not one): ComfyUI's text mask. None for any other mask (the caller refuses it)."""
        before, after = self.joint
        total = before + self.valid_len + after
        if not any(self.joint) or mask.numel() != total or mask.shape[-1] != total:
            return None
        m = mask.reshape(-1).float()
        split_part = m[before:before + self.valid_len]
        joint = torch.cat([m[:before], m[before + self.valid_len:]])
        low = torch.finfo(mask.dtype).min if mask.is_floating_point() else None
        if bool(split_part.any()) or low is None or not bool(((joint == 0) | (joint <= low)).all()):
            return None
        keep = joint == 0
        return lambda first, count, device=None: self.joint_key_valid(first, count, device, keep)

    def _split_joint_table(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """A per-token table over [joint before | all split tokens | joint after]: the joint parts whole, the split
        tokens' entries cut to this rank's (padding repeats the last)."""
        before, after = self.joint
        mid = self._narrow_padded(t.narrow(dim, before, self.valid_len), dim)
        parts = [t.narrow(dim, 0, before), mid, t.narrow(dim, before + self.valid_len, after)]
        return torch.cat([p for p in parts if p.shape[dim]], dim)

    def split_per_token(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's entries of a per-token tensor (see SeqSplit.per_token); call after the tokens were split."""
        n_e, full = t.shape[dim], self.valid_len
        if n_e == 1 or self.degree == 1 or full is None:
            return t
        if any(self.joint) and self.grid is None and n_e == full + sum(self.joint):
            return self._split_joint_table(t, dim)
        if self.grid is not None:  # frame-major entries: this rank's part of every frame's plane (then the rest)
            if n_e == self.grid[0] and not self.rest:  # one entry per frame: every rank holds every frame
                return t
            pos = self.local_positions(t.device)
            if n_e == full:
                return t.index_select(dim, pos)
            repeats = full // n_e
            step = repeats if repeats * n_e == full else repeats + 1  # ComfyUI's repeat_e
            return t.index_select(dim, pos // step)
        if n_e == full:
            return self._narrow_padded(t, dim)
        repeats = full // n_e
        step = repeats if repeats * n_e == full else repeats + 1  # ComfyUI's repeat_e: the tail is cut
        n = -(-full // self.degree)
        tokens = torch.arange(self.index * n, self.index * n + n, device=t.device).clamp(max=full - 1)
        return t.index_select(dim, tokens // step)

    def split_segments(self, segments: list) -> list:
        """This rank's part of a segment table [(start, stop, row), ...] over the whole flat sequence (see
        SeqSplit.segments), in its local positions; call after the tokens were split (flat). Padding rows belong
        to no segment (the host leaves them unmodulated; they are masked as keys and dropped at the gather)."""
        if not self.is_split or self.degree == 1:
            return segments
        n = self.local_len
        lo, hi = self.index * n, self.index * n + n
        out = []
        for a, b, row in segments:
            first, last = max(a, lo), min(b, hi)
            if first < last:
                out.append((first - lo, last - lo, row[first - a:last - a] if torch.is_tensor(row) else row))
        return out

    def _narrow_padded(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = -(-t.shape[dim] // self.degree)
        idx = torch.arange(self.index * n, self.index * n + n, device=t.device).clamp(max=t.shape[dim] - 1)
        return t.index_select(dim, idx)

    def gather(self, t: torch.Tensor, dim: int, narrow: bool = True) -> torch.Tensor:
        g = self.groups
        if g.ulysses_size > 1:
            t = all_gather(t, g.ulysses, dim)
        if g.ring_size > 1:
            t = all_gather(t, g.ring, dim)
        return t.narrow(dim, 0, self.valid_len) if self.padded and narrow else t


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` in place of the submodule `name`, carrying over the forward hooks registered on the old one
    (the plan's sequence split / gather), so a layer swapped after the plan was applied (fp8, quantized, TP)
    still splits and gathers. Returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    for attr in _HOOK_DICTS:
        src = getattr(old, attr, None)
        if src:
            getattr(new, attr).update(src)
    setattr(parent, child, new)
    return old


def apply_tensor_parallel(model: nn.Module, plan: ParallelPlan, group, tp_rank: int, tp_size: int) -> None:
    """Swap planned layers for their sharded versions (works on meta modules before loading)."""
    if tp_size == 1:
        return
    for name, module in list(model.named_modules()):
        for pattern, style in plan.tp.items():
            if _matches(name, pattern):
                replace_module(model, name, TP_STYLES[style](module, group, tp_rank, tp_size))
                break
    entries = [(e, plan.heads_attr) if isinstance(e, str) else e for e in plan.attention_heads]
    for name, module in model.named_modules():
        # every entry naming the module (a fused block divides its heads and its widths: HunyuanVideo's single blocks)
        for attr in dict.fromkeys(a for p, a in entries if _matches(name, p)):
            heads = getattr(module, attr)
            assert heads % tp_size == 0
            setattr(module, attr, heads // tp_size)


@dataclass(frozen=True)
class PlanHook:
    """One hook the plan put on a module: where, what, and its handle (for checks after loading)."""
    module: str
    kind: str  # "split_inputs" | "split_outputs" | "gather_output"
    handle: object

    def present(self, model: nn.Module) -> bool:
        """Whether the module now at `self.module` (possibly a later replacement) still runs this hook."""
        mod = model.get_submodule(self.module)
        table = mod._forward_pre_hooks if self.kind == "split_inputs" else mod._forward_hooks
        return self.handle.id in table


class _SequenceHooks:
    """The hook functions of one model's sequence split, over its SequenceState (one per rank's model)."""

    def __init__(self, plan: ParallelPlan, state: SequenceState):
        self.plan, self.state = plan, state

    def cut(self, t, s: SeqSplit):
        state = self.state
        if s.first_only:
            if not state.tokens_pending:
                return t
            state.tokens_pending = False
        if s.joint:
            return state.record_joint(t, s.dim, s.joint)
        if s.grid:
            return state.split_grid(t, s.dim)
        if s.frames:
            return state.split_frames(t, s.dim, s.rest)
        return state.split_per_token(t, s.dim) if s.per_token else state.split(t, s.dim)

    def cut_value(self, v, s: SeqSplit):
        """`v` cut by `s` where it is what `s` names (a tensor of the expected ndim, or a tuple holding one at
        `s.item`); anything else passes unchanged."""
        if s.item is not None:
            if not isinstance(v, tuple) or len(v) <= s.item:
                return v
            return (*v[:s.item], self.cut_value(v[s.item], replace(s, item=None)), *v[s.item + 1:])
        return self.cut(v, s) if torch.is_tensor(v) and s.expected_ndim in (None, v.ndim) else v

    def split_inputs(self, spec, kw_spec=None):
        def hook(_module, args, kwargs):
            args = list(args)
            for i, s in (spec or {}).items():
                if s.segments and i < len(args) and isinstance(args[i], list):
                    args[i] = self.state.split_segments(args[i])
                elif i < len(args):
                    args[i] = self.cut_value(args[i], s)
            for k, s in (kw_spec or {}).items():
                if k in kwargs:
                    kwargs = {**kwargs, k: self.cut_value(kwargs[k], s)}
            return tuple(args), kwargs
        return hook

    def split_outputs(self, spec):
        def hook(_module, _args, output):
            out = list(output) if isinstance(output, (tuple, list)) else [output]
            for i, s in spec.items():
                if s.expected_ndim in (None, out[i].ndim):
                    out[i] = self.cut(out[i], s)
            return type(output)(out) if isinstance(output, (tuple, list)) else out[0]
        return hook

    def gather_inputs(self, spec: dict):
        def whole(a, s: SeqGather):
            if s.share_first and self.state.is_split and a.shape[s.dim] > self.state.local_len:
                a = a.narrow(s.dim, 0, self.state.local_len)
            return self.state.whole(a, s.dim, grid=s.grid)

        def hook(_module, args):
            return tuple(whole(a, spec[i]) if i in spec and torch.is_tensor(a) else a for i, a in enumerate(args))
        return hook

    def gather_output(self, spec: SeqGather):
        def hook(_module, _args, output):
            if spec.grid:
                return self.state.gather_grid(output, spec.dim, spec.flat)
            if spec.frames:
                return self.state.gather_frames(output, spec.dim)
            return self.state.gather(output, spec.dim)
        return hook

    def whole_grid_input(self, dim: int):
        def hook(_module, args):
            t, grid = (args[0] if args else None), self.state.grid
            if grid is None or not torch.is_tensor(t) or t.ndim < dim + 3:
                return None
            frames, h, w = grid
            if t.shape[dim] != frames or t.shape[dim + 1] != 1:
                raise ValueError(f"a grid-shape input {tuple(t.shape)} is not this rank's part of a {grid} grid")
            shape = (*t.shape[:dim], frames, h, w, *t.shape[dim + 3:])
            return (t.new_zeros(()).expand(shape), *args[1:])  # no memory: only its shape is read
        return hook

    def attention_scope(self, enter: bool, keys_only: bool = False):
        def hook(*_args):
            if enter:
                ACTIVE_SEQUENCE_STATES.append(KeysOf(self.state) if keys_only else self.state)
            elif ACTIVE_SEQUENCE_STATES:
                ACTIVE_SEQUENCE_STATES.pop()
        return hook

    def record_plane(self, _module, _args, output):
        state = self.state
        if state.main is None:  # the first call of the forward: the latent's own frames
            plane, runs = output.shape[-2] * output.shape[-1], self.plan.plane_runs
            if plane % runs:
                raise ValueError(f"this model's sequence split takes each frame's {plane} tokens in {runs} equal "
                                 f"runs: pick a size whose tokens per frame divide by {runs}")
            state.plane = plane // runs
            state.main = (output.shape[-3] * runs, state.plane)

    def main_length(self, key):
        def hook(_module, args, kwargs):
            if self.state.grid is None:
                return None
            local = self.state.main_local_len
            if isinstance(key, str):
                return (args, {**kwargs, key: local}) if key in kwargs else None
            return ((*args[:key], local, *args[key + 1:]), kwargs) if key < len(args) else None
        return hook


def _pre(model, name, hook, with_kwargs=False):
    return PlanHook(name, "split_inputs", model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=with_kwargs))


def _post(model, name, hook, kind="gather_output"):
    return PlanHook(name, kind, model.get_submodule(name).register_forward_hook(hook))


def _input_hooks(model, plan: ParallelPlan, hooks: _SequenceHooks, expand) -> list:
    """Positional splits first (they split the tokens and learn the real length), then keyword ones, which may be
    per-token tensors cut to the tokens this rank now holds; then the main-length arguments and grid-shape inputs."""
    out = [_pre(model, name, hooks.split_inputs(spec), True)
           for pattern, spec in plan.seq_split_inputs.items() for name in expand(pattern)]
    out += [_pre(model, name, hooks.split_inputs(None, kw_spec), True)
            for pattern, kw_spec in plan.seq_split_kwargs.items() for name in expand(pattern)]
    out += [_pre(model, name, hooks.main_length(key), True)
            for pattern, key in plan.main_length_args.items() for name in expand(pattern)]
    out += [_post(model, name, hooks.record_plane) for pattern in plan.plane_from for name in expand(pattern)]
    out += [_pre(model, name, hooks.whole_grid_input(dim))
            for pattern, dim in plan.grid_shape_inputs.items() for name in expand(pattern)]
    return out


def _output_and_attention_hooks(model, plan: ParallelPlan, hooks: _SequenceHooks, expand) -> list:
    out = [_post(model, name, hooks.split_outputs(spec), "split_outputs") for name, spec in plan.seq_split_outputs.items()]
    out += [_pre(model, name, hooks.gather_inputs(spec))
            for pattern, spec in plan.seq_gather_inputs.items() for name in expand(pattern)]
    out += [_post(model, name, hooks.gather_output(spec)) for name, spec in plan.seq_gather_outputs.items()]
    for name in (n for pattern in plan.sequence_attention for n in expand(pattern)):
        out += [_pre(model, name, hooks.attention_scope(True)), _post(model, name, hooks.attention_scope(False))]
    for name in (n for pattern in plan.key_gather_attention for n in expand(pattern)):
        out += [_pre(model, name, hooks.attention_scope(True, keys_only=True)),
                _post(model, name, hooks.attention_scope(False))]
    return out


def apply_sequence_parallel(model: nn.Module, plan: ParallelPlan, state: SequenceState, max_degree: int | None = None
                            ) -> list:
    """Register the split / gather hooks; returns them as PlanHook records. Apply this after every module
    replacement that is known up front (TP, fp8); `replace_module` carries the hooks over any later one.
    `max_degree`: the widest split any call may use (a fold can split a mesh whose own sequence degree is 1)."""
    if (max_degree or state.degree) == 1:
        return []
    names = [n for n, _ in model.named_modules()]
    # a pattern names the modules it matches; a plain name that matches none is looked up (and fails loudly), a
    # wildcard one that matches none (the two-digit blocks of a smaller model) names no module
    expand = lambda pattern: ([n for n in names if _matches(n, pattern)]  # noqa: E731
                              or ([] if any(c in pattern for c in "*?[") else [pattern]))
    hooks = _SequenceHooks(plan, state)
    return _input_hooks(model, plan, hooks, expand) + _output_and_attention_hooks(model, plan, hooks, expand)


def missing_plan_hooks(model: nn.Module, hooks: list) -> list:
    """The plan's hooks no longer on the module the plan names (a module was replaced without them):
    each one means a rank would return only its own tokens. Empty when the plan is intact."""
    return [f"{h.kind} on {h.module} ({type(model.get_submodule(h.module)).__name__})"
            for h in hooks if not h.present(model)]


def shard_chunks_of(model: nn.Module, param_name: str) -> int:
    """How many equal blocks of its shard dim a parameter's shard takes a part of (1: one contiguous slice)."""
    module_name, _, _ = param_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, "shard_chunks", 1)


def shard_dim_of(model: nn.Module, param_name: str) -> tuple[int | None, int, int]:
    """(dim, rank, parts) for a parameter: where the loader must slice it (a TP layer's dim over the TP ranks, or a
    sharded block weight's rows over every rank)."""
    from .sharded_weights import is_sharded

    module_name, _, pname = param_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    p = module._parameters.get(pname)
    if p is not None and is_sharded(p):
        return 0, p.device_mesh.get_local_rank(), p.device_mesh.size()
    dims = getattr(module, "shard_dims", None)
    if not dims or dims.get(pname) is None:
        return None, 0, 1
    return dims[pname], module.tp_rank, module.tp_size
