"""Sequence-parallel attention: Ulysses all-to-all, Ring with log-sum-exp merge, and both (USP).

Layout everywhere: q, k, v are (batch, seq, heads, head_dim), as diffusers' processors hold
them. The sequence is split over `ring x ulysses` ranks, ulysses inner: rank (r, u) holds chunk
r * ulysses + u. Padding (tokens not dividing the sequence degree) is masked out of the keys: by `valid_len`,
the number of real tokens, when the padding is the sequence's tail, or by `key_valid`, a function of the chunks
(first chunk, chunk count) giving each of their keys' validity, when it lies inside every chunk (a frame-major
split pads each frame's plane, see parallel/plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .collectives import all_to_all_single, ring_exchange


@dataclass
class SequenceParallelGroups:
    """The process groups attention needs on one rank (None = axis of size 1)."""
    ulysses: object = None
    ulysses_size: int = 1
    ring: object = None
    ring_size: int = 1
    ring_rank: int = 0
    backend: str = "sdpa"

    @property
    def degree(self) -> int:
        return self.ulysses_size * self.ring_size


def flat_key_valid(valid_len: int | None, chunk_len: int):
    """`key_valid` for a split whose padding is the sequence's tail: chunk c holds positions [c * chunk_len, ...)."""
    if valid_len is None:
        return None

    def key_valid(first: int, count: int, device=None):
        if (first + count) * chunk_len <= valid_len:
            return None
        return torch.arange(first * chunk_len, (first + count) * chunk_len, device=device) < valid_len
    return key_valid


def _mask_2d(keep, q_len: int):
    return None if keep is None else keep.view(1, -1).expand(q_len, keep.numel())


def local_attention(q, k, v, backend: str = "sdpa", mask=None) -> torch.Tensor:
    """Plain attention on (B, S, H, D) tensors with the configured kernel (parallel/kernels.py)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return kernels.attention(q, k, v, backend, mask).transpose(1, 2)


def attention_with_lse(q, k, v, backend: str = "sdpa", mask=None):
    """(B, H, S, D) attention returning (out, lse (B, H, S) fp32) for the ring merge."""
    return kernels.attention_with_lse(q, k, v, backend, mask)


def merge_attention(out, lse, out_b, lse_b):
    """Merge two partial attentions over disjoint key sets by their log-sum-exp."""
    if out is None:
        return out_b.float(), lse_b
    new_lse = torch.logaddexp(lse, lse_b)
    w_a = torch.exp(lse - new_lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - new_lse).unsqueeze(-1)
    return out * w_a + out_b.float() * w_b, new_lse


def ring_attention(q, k, v, group, ring_size: int, ring_rank: int, backend: str = "sdpa", key_valid=None,
                   chunks_per_block: int = 1) -> torch.Tensor:
    """Attention of local queries against the keys of every rank in `group`, K/V passed around the ring.

    q, k, v: (B, S_local, H, D); ring rank i holds the `chunks_per_block` sequence chunks starting at chunk
    i * chunks_per_block (after a Ulysses gather, the Ulysses group's chunks); `key_valid` masks padding.
    """
    qh = q.transpose(1, 2)
    kv = torch.stack((k, v)).contiguous()
    out = lse = None
    for step in range(ring_size):
        nxt = ring_exchange(kv, group) if step < ring_size - 1 else None
        src = (ring_rank - step) % ring_size
        keep = key_valid(src * chunks_per_block, chunks_per_block, q.device) if key_valid else None
        if keep is None or bool(keep.any()):  # a block of padding only contributes nothing
            kb, vb = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
            o_b, lse_b = attention_with_lse(qh, kb, vb, backend, _mask_2d(keep, qh.shape[2]))
            out, lse = merge_attention(out, lse, o_b, lse_b)
        if nxt is not None:
            kv = nxt.wait()
    return out.to(q.dtype).transpose(1, 2)


def _seq_to_heads(x, group, size):
    """(B, S/u, H, D) -> (B, S, H/u, D): scatter heads, gather sequence."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, size, h // size, d).permute(2, 0, 1, 3, 4).contiguous()
    x = all_to_all_single(x, group)  # dim 0 now indexes the source rank = sequence chunk
    return x.permute(1, 0, 2, 3, 4).reshape(b, size * s, h // size, d)


def _heads_to_seq(x, group, size):
    """(B, S, H/u, D) -> (B, S/u, H, D): the inverse all-to-all."""
    b, s, h, d = x.shape
    x = x.reshape(b, size, s // size, h, d).permute(1, 0, 2, 3, 4).contiguous()
    x = all_to_all_single(x, group)  # dim 0 now indexes the source rank = head group
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // size, size * h, d)


def ulysses_attention(q, k, v, groups: SequenceParallelGroups, valid_len: int | None = None, key_valid=None
                      ) -> torch.Tensor:
    """USP: Ulysses all-to-all inside `groups.ulysses`, Ring across `groups.ring` (either may be 1). Padding is
    masked by `key_valid` (see the module doc) or, for a padded tail, `valid_len`."""
    u = groups.ulysses_size
    if key_valid is None:
        key_valid = flat_key_valid(valid_len, k.shape[1])
    if u > 1:
        q, k, v = (_seq_to_heads(t, groups.ulysses, u) for t in (q, k, v))
    if groups.ring_size > 1:
        out = ring_attention(q, k, v, groups.ring, groups.ring_size, groups.ring_rank, groups.backend, key_valid, u)
    else:
        mask = _mask_2d(key_valid(0, u, q.device) if key_valid else None, q.shape[1])
        out = local_attention(q, k, v, groups.backend, None if mask is None else mask.view(1, 1, *mask.shape))
    if u > 1:
        out = _heads_to_seq(out.contiguous(), groups.ulysses, u)
    return out


# Sequence states of the modules now inside a plan's `sequence_attention` scope (pushed / popped by the plan's
# hooks), innermost last: the host's attention function, replaced by `sequence_parallel_attention`, reads it.
ACTIVE_SEQUENCE_STATES: list = []


@dataclass(frozen=True)
class KeysOf:
    """A scope entry whose attention call takes its keys / values from `state`'s split tokens and its queries from
    another stream (LTX-2's audio <-> video cross-attention): the keys are gathered whole (padding dropped) and each
    rank's queries attend to all of them with the host's own kernel."""
    state: object


def _tensor_of(t):
    """ComfyUI 0.38+ hands attention its q / k / v in single-owner containers (`AttentionTensorContainer`: `take()`
    gives the tensor; read in Comfy-Org/ComfyUI 05080f6, comfy/ldm/modules/attention.py); older hosts the tensors."""
    return t if torch.is_tensor(t) else t.take()


def sequence_parallel_attention(original):
    """Wrap a host attention function of ComfyUI's signature (q, k, v, heads, mask=None, ..., skip_reshape=False,
    skip_output_reshape=False): inside a sequence-attention scope whose split is wider than one rank it runs Ulysses /
    Ring over the local tokens (each rank holds a chunk of the queries and keys); everywhere else (cross-attention,
    a call that is not split) it is the host's own function and kernel, unchanged, with every argument as given.

    ComfyUI 0.38+ may pass `preferred_attention` (a module whose `function`, when set, is the attention a quantized
    checkpoint asks for, e.g. int8): a split call runs that function on the heads Ulysses gathers, and refuses Ring
    (which needs a kernel that returns the log-sum-exp)."""
    if getattr(original, "_pdit_original", None) is not None:
        return original

    def attention(q, k, v, heads, *args, **kwargs):
        state = ACTIVE_SEQUENCE_STATES[-1] if ACTIVE_SEQUENCE_STATES else None
        mask = args[0] if args else kwargs.get("mask")
        if isinstance(state, KeysOf):
            return _with_whole_keys(original, state.state, q, k, v, heads, mask, *args, **kwargs)
        if state is None or state.degree == 1:
            return original(q, k, v, heads, *args, **kwargs)
        key_valid = state.key_valid
        if mask is not None:  # only a joint stream's key mask (HunyuanVideo's text mask) folds into the split
            if not (state.is_split and any(state.joint)):
                return original(q, k, v, heads, *args, **kwargs)
            key_valid = state.joint_key_mask(mask)
            if key_valid is None:
                raise ValueError("the model's joint attention got a mask that is not a key mask of its text tokens (0 "
                                 "for a key, the lowest value for none), which the sequence split cannot apply: use "
                                 "the text encoder's own attention mask, or set ulysses and ring to 1")
        q, k, v = (_tensor_of(t) for t in (q, k, v))
        if kwargs.get("skip_reshape"):  # (B, H, S, D)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        else:  # (B, S, H * D)
            q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        preferred = getattr(kwargs.get("preferred_attention"), "function", None)
        groups = state.groups if preferred is None else _with_kernel(state.groups, preferred)
        out = ulysses_attention(q, k, v, groups, key_valid=key_valid)  # (B, S, H, D)
        return out.transpose(1, 2) if kwargs.get("skip_output_reshape") else out.flatten(2)

    attention._pdit_original = original
    return attention


def _with_whole_keys(original, state, q, k, v, heads, mask, *args, **kwargs):
    """The host's attention with `state`'s keys / values gathered to the whole sequence (a mask over local keys
    cannot be applied to the gathered ones: refused)."""
    if not state.is_split or state.degree == 1:
        return original(q, k, v, heads, *args, **kwargs)
    if mask is not None:
        raise ValueError("an attention mask on a cross-attention whose keys are split over the sequence ranks cannot "
                         "be applied: set ulysses and ring to 1 (use cfg / tp)")
    dim = 2 if kwargs.get("skip_reshape") else 1
    k, v = (state.whole(_tensor_of(t), dim) for t in (k, v))
    return original(_tensor_of(q), k, v, heads, *args, **kwargs)


def _with_kernel(groups: SequenceParallelGroups, function) -> SequenceParallelGroups:
    """The call's groups with a host attention function as the local kernel (Ulysses only)."""
    if groups.ring_size > 1:
        raise ValueError("this checkpoint asks ComfyUI for its own attention kernel (e.g. int8 attention), which "
                         "cannot merge Ring steps: set ring to 1 (use ulysses / cfg), or sample with the native model")
    from dataclasses import replace
    return replace(groups, backend=kernels.HostKernel(function))
