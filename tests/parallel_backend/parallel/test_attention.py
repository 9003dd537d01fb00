"""Sequence-parallel attention (parallel_backend/attention.py) against single-process attention.

Multi-rank: one 4-rank gloo world builds every sequence mesh in turn (ulysses2, ring2 and
ring2xulysses2 beside a dp2 replica, ulysses4, ring4) with the production `build_mesh`, and runs
each on even and ragged sequence lengths with both CPU backends. Single process: the log-sum-exp
merge the ring relies on.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel_backend.config import ParallelConfig
from parallel_backend.parallel.attention import (
    _mask_2d,
    attention_with_lse,
    flat_key_valid,
    local_attention,
    merge_attention,
    ring_attention,
    ulysses_attention,
)

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only

TOL = 1e-5  # fp32 max abs difference allowed against the single-process reference
BATCH, HEADS, HEAD_DIM = 2, 8, 16
SEQ_LENS = (16, 13, 2)  # divides every degree; ragged; shorter than the degree (whole ranks of padding)
BACKENDS = ("sdpa", "math")

MESHES = {  # name -> degrees on a world of 4
    "ulysses2": dict(dp=2, ulysses=2),
    "ring2": dict(dp=2, ring=2),
    "ulysses4": dict(ulysses=4),
    "ring4": dict(ring=4),
    "ring2xulysses2": dict(ring=2, ulysses=2),
}


def _inputs(replica: int, s: int):
    g = torch.Generator().manual_seed(1000 * replica + s)
    return [torch.randn(BATCH, s, HEADS, HEAD_DIM, generator=g) for _ in range(3)]


def _rank_fn(mesh0, meshes, seq_lens, backends):
    """On every rank: for each mesh, each backend, each length, attention of this rank's chunk."""
    from parallel_backend.runtime.mesh import build_mesh

    results = {}
    for name, degrees in meshes.items():
        cfg = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **degrees)
        mesh = build_mesh(cfg, mesh0.rank, mesh0.device)
        groups = mesh.sequence_groups()
        p, i = cfg.sequence_degree, mesh.sequence_index
        for backend in backends:
            groups.backend = backend
            for s in seq_lens:
                q, k, v = _inputs(mesh.coord["dp"], s)
                pad = (-s) % p
                if pad:
                    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
                n = q.shape[1] // p
                ql, kl, vl = (t[:, i * n:(i + 1) * n].contiguous() for t in (q, k, v))
                out = ulysses_attention(ql, kl, vl, groups, valid_len=s if pad else None)
                results[(name, backend, s)] = (mesh.coord["dp"], i, out)
    return results


@pytest.fixture(scope="module")
def rank_results():
    from parallel_backend.testing.spmd import run_on_ranks

    return run_on_ranks(_rank_fn, ParallelConfig(world_size=4, ulysses=4, device="cpu", dtype="fp32"),
                        MESHES, SEQ_LENS, BACKENDS)


@pytest.mark.multirank
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sequence_parallel_attention_matches_local(rank_results, mesh, backend):
    diffs = {}
    for s in SEQ_LENS:
        chunks = {}
        for per_rank in rank_results:
            dp, i, out = per_rank[(mesh, backend, s)]
            assert out.dtype == torch.float32 and out.shape[0] == BATCH and out.shape[2:] == (HEADS, HEAD_DIM)
            chunks.setdefault(dp, {})[i] = out
        dps = MESHES[mesh].get("dp", 1)
        degree = MESHES[mesh].get("ring", 1) * MESHES[mesh].get("ulysses", 1)
        assert sorted(chunks) == list(range(dps))
        for dp, parts in chunks.items():
            assert sorted(parts) == list(range(degree))
            full = torch.cat([parts[j] for j in range(degree)], dim=1)
            assert full.shape[1] == s + (-s) % degree
            q, k, v = _inputs(dp, s)
            ref = local_attention(q, k, v, backend)
            diffs[(dp, s)] = (full[:, :s] - ref).abs().max().item()
            # and the same as the other backend's reference: the backends agree with each other
            assert (full[:, :s] - local_attention(q, k, v, "math" if backend == "sdpa" else "sdpa")).abs().max() <= TOL
    print(f"{mesh} {backend} max abs diff per (dp, seq): {diffs}")
    assert max(diffs.values()) <= TOL, diffs


# ---------------------------------------------------------------- single process: the LSE merge


def _bhsd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_two_halves_equals_full_attention(backend):
    q, k, v = (_bhsd(2, 4, 12, 16, seed=s) for s in range(3))  # (B, H, S, D)
    full = local_attention(*(t.transpose(1, 2) for t in (q, k, v)), backend).transpose(1, 2)
    o_a, lse_a = attention_with_lse(q, k[:, :, :5], v[:, :, :5], backend)
    o_b, lse_b = attention_with_lse(q, k[:, :, 5:], v[:, :, 5:], backend)
    assert lse_a.shape == (2, 4, 12) and lse_a.dtype == torch.float32
    out, lse = merge_attention(None, None, o_a, lse_a)
    out, lse = merge_attention(out, lse, o_b, lse_b)
    assert (out - full).abs().max() <= TOL
    scores = torch.matmul(q, k.transpose(-1, -2)) * 16 ** -0.5
    assert (lse - torch.logsumexp(scores, -1)).abs().max() <= TOL
    # order of merging does not matter
    out2, _ = merge_attention(*merge_attention(None, None, o_b, lse_b), o_a, lse_a)
    assert (out2 - full).abs().max() <= TOL


def test_merge_many_uneven_blocks_and_masked_tail():
    valid = 9  # keys 9.. are padding
    q = _bhsd(1, 2, 7, 8, seed=10)
    k, v = (_bhsd(1, 2, valid, 8, seed=11 + s) for s in range(2))
    kp, vp = (F.pad(t, (0, 0, 0, 3)) for t in (k, v))  # 12 keys, 3 of padding
    ref = local_attention(*(t.transpose(1, 2) for t in (q, k, v)), "math").transpose(1, 2)
    out = lse = None
    for start, stop in ((0, 2), (2, 7), (7, 12)):
        mask = _mask_2d(torch.arange(start, stop) < valid, 7)
        o, l = attention_with_lse(q, kp[:, :, start:stop], vp[:, :, start:stop], "sdpa", mask)
        out, lse = merge_attention(out, lse, o, l)
    assert (out - ref).abs().max() <= TOL
    assert flat_key_valid(valid, 3)(0, 3) is None  # no padding in chunks 0-2: no mask
    assert flat_key_valid(valid, 3)(2, 2).tolist() == [True] * 3 + [False] * 3
    assert flat_key_valid(None, 3) is None


def test_single_rank_paths_equal_local():
    """Degree-1 groups (no process group) fall through to plain attention."""
    from parallel_backend.parallel.attention import SequenceParallelGroups

    q, k, v = (_bhsd(2, 10, 4, 8, seed=20 + s) for s in range(3))  # (B, S, H, D)
    for backend in BACKENDS:
        ref = local_attention(q, k, v, backend)
        out = ulysses_attention(q, k, v, SequenceParallelGroups(backend=backend))
        assert torch.equal(out, ref)
        out = ring_attention(q, k, v, None, 1, 0, backend)
        assert (out - ref).abs().max() <= TOL
        # padded keys are ignored
        qp, kp, vp = (F.pad(t, (0, 0, 0, 0, 0, 2)) for t in (q, k, v))
        out = ulysses_attention(qp, kp, vp, SequenceParallelGroups(backend=backend), valid_len=10)
        assert (out[:, :10] - ref).abs().max() <= TOL


# ---------------------------------------------------------------- the host's attention call, as ComfyUI 0.38 makes it
class _Container:
    """Stands in for ComfyUI 0.38's AttentionTensorContainer (comfy/ldm/modules/attention.py, Comfy-Org/ComfyUI
    05080f6): a single-owner holder whose `take()` hands the tensor over once."""
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def take(self):
        t, self.tensor = self.tensor, None
        if t is None:
            raise RuntimeError("attention tensor container has already been consumed")
        return t


class _Preferred:
    """Stands in for 0.38's ComfyAttention: `function` is the kernel a quantized checkpoint asks for, or None."""

    def __init__(self, function=None):
        self.function = function


def _scaled_kernel(q, k, v, heads, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """A 'preferred' kernel that differs from plain attention (queries scaled by 1.5), in ComfyUI's signature."""
    assert skip_reshape and skip_output_reshape and q.shape[1] == heads
    return F.scaled_dot_product_attention(q * 1.5, k, v)


def _host_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, transformer_options=None,
                    preferred_attention=None, **kwargs):
    """The host's own function as 0.38 calls it: containers in, (B, S, H * D) out; `preferred_attention` honoured."""
    q, k, v = (t.take() if isinstance(t, _Container) else t for t in (q, k, v))
    b = q.shape[0]
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    fn = getattr(preferred_attention, "function", None)
    out = fn(q, k, v, heads, skip_reshape=True, skip_output_reshape=True) if fn else \
        F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def _container_rank_fn(mesh0, seq_lens):
    from parallel_backend.parallel.attention import ACTIVE_SEQUENCE_STATES, sequence_parallel_attention
    from parallel_backend.parallel.plan import SequenceState
    from parallel_backend.runtime.mesh import build_mesh

    wrapped = sequence_parallel_attention(_host_attention)
    results = {}
    for name, degrees in {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2)}.items():
        mesh = build_mesh(ParallelConfig(world_size=2, device="cpu", dtype="fp32", **degrees), mesh0.rank,
                          mesh0.device)
        state = SequenceState(mesh.sequence_groups(), mesh.sequence_index)
        for s in seq_lens:
            for kernel in (None, _scaled_kernel):
                q, k, v = (t.flatten(2) for t in _inputs(0, s))  # (B, S, H * D), as Wan hands them over
                state.begin_forward()
                ql, kl, vl = (state.split(t, 1) for t in (q, k, v))
                ACTIVE_SEQUENCE_STATES.append(state)
                try:
                    out = wrapped(_Container(ql), _Container(kl), _Container(vl), heads=HEADS,
                                  preferred_attention=_Preferred(kernel), transformer_options={})
                    results[(name, s, kernel is not None)] = ("ok", state.whole(out, 1))
                except ValueError as e:
                    results[(name, s, kernel is not None)] = ("refused", str(e))
                finally:
                    ACTIVE_SEQUENCE_STATES.pop()
    # outside a sequence scope the host's function gets every argument as given, containers included
    q, k, v = (t.flatten(2) for t in _inputs(1, 5))
    results["unsplit"] = wrapped(_Container(q), _Container(k), _Container(v), heads=HEADS,
                                 preferred_attention=_Preferred(_scaled_kernel))
    return results


@pytest.mark.multirank
def test_attention_call_of_comfyui_038_with_containers_and_preferred_kernel():
    """ComfyUI 0.38 wraps q / k / v in AttentionTensorContainer and passes `preferred_attention`: a split call takes
    the tensors out, runs Ulysses with the preferred kernel on the gathered heads (= that kernel on the whole
    sequence), refuses it on Ring; an unsplit call reaches the host's function unchanged."""
    from parallel_backend.testing.spmd import run_on_ranks

    seq_lens = (16, 13)
    per_rank = run_on_ranks(_container_rank_fn, ParallelConfig(world_size=2, ulysses=2, device="cpu", dtype="fp32"),
                            seq_lens)
    diffs = {}
    for s in seq_lens:
        q, k, v = _inputs(0, s)
        for scaled in (False, True):
            ref = _host_attention(q.flatten(2), k.flatten(2), v.flatten(2), HEADS,
                                  preferred_attention=_Preferred(_scaled_kernel if scaled else None))
            for results in per_rank:
                status, out = results[("ulysses2", s, scaled)]
                assert status == "ok"
                diffs[("ulysses2", s, scaled)] = (out - ref).abs().max().item()
                status, out = results[("ring2", s, scaled)]
                if scaled:
                    assert status == "refused" and "set ring to 1" in out
                else:
                    diffs[("ring2", s, scaled)] = (out - ref).abs().max().item()
    q, k, v = _inputs(1, 5)
    ref = _host_attention(q.flatten(2), k.flatten(2), v.flatten(2), HEADS, preferred_attention=_Preferred(_scaled_kernel))
    for results in per_rank:
        assert torch.equal(results["unsplit"], ref)
    print(f"0.38-style attention call, split vs whole (max abs): {diffs}")
    assert max(diffs.values()) <= TOL
    # the preferred kernel changes the result, so running it (not sdpa) is what the parity shows
    assert (_host_attention(q.flatten(2), k.flatten(2), v.flatten(2), HEADS) - ref).abs().max() > 1e-2
