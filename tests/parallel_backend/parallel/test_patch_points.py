"""Model patches on split tokens (parallel_backend/parallel/patch_points.py) against the same patch on the whole
sequence, on 2 gloo ranks: a flat split with a ragged tail (ulysses2, ring2), a frame-aligned split (HuMo / Animate /
S2V's), and a TP split of the heads. Single process: the per-row view of ComfyUI's per-call options, the refusals.
"""
from __future__ import annotations

import pytest
import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.parallel.patch_points import (
    BlockReplace,
    PatchPoint,
    PatchRefused,
    ShareContext,
    Tokens,
    UndescribedPatch,
    WholeSequencePatch,
    WholeSequenceReplacement,
    options_for_rows,
    refuse_between_blocks,
)

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only
TOL = 1e-6
B, S, C, HEADS = 2, 13, 8, 4  # 13 tokens: ragged on 2 ranks


def _whole(seed=0, s=S):
    return torch.randn(B, s, C, generator=torch.Generator().manual_seed(seed))


def _token_global(d):
    """A patch that looks across tokens (what InfiniteTalk's attention map and audio cross-attention do)."""
    x = d["x"]
    return x - x.mean(1, keepdim=True) + x.flip(1) * 0.5


POINT = PatchPoint(args={("dict", "x"): Tokens(1)}, returns={("value", None): Tokens(1)})


def _ctx(mesh, state):
    return ShareContext(state, mesh.groups.get("tp"), mesh.config.tp, mesh.coord["tp"])


def _sequence_fn(mesh0):
    from parallel_backend.parallel.plan import SequenceState
    from parallel_backend.runtime.mesh import build_mesh

    out = {}
    for name, degrees in {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2)}.items():
        mesh = build_mesh(ParallelConfig(world_size=2, device="cpu", dtype="fp32", **degrees), mesh0.rank, mesh0.device)
        state = SequenceState(mesh.sequence_groups(), mesh.sequence_index)
        ctx = _ctx(mesh, state)
        # flat split, ragged tail
        state.begin_forward()
        local = state.split(_whole(), 1)
        patched = WholeSequencePatch(_token_global, POINT, ctx)({"x": local, "transformer_options": {}})
        out[(name, "flat")] = state.whole(patched, 1)
        # frame-aligned split: 3 frames of 5 tokens (each rank 3 of every frame, the last padded) + 2 rest tokens
        state.begin_forward()
        state.main = (3, 5)
        local = state.split_frames(_whole(1, 17), 1, rest=True)
        patched = WholeSequencePatch(_token_global, POINT, ctx)({"x": local})
        out[(name, "frames")] = state.whole(patched, 1)
        # a block replacement that looks across tokens around a token-local block
        state.begin_forward()
        local = state.split(_whole(2), 1)
        replacement = WholeSequenceReplacement(_replace, BlockReplace({"img": Tokens(1)}, {"img": Tokens(1)}), ctx)
        done = replacement({"img": local, "vec": None}, {"original_block": _block})
        out[(name, "replace")] = state.whole(done["img"], 1)
        # a patch at a point nothing describes: refused on the split sequence, naming the point
        try:
            UndescribedPatch(_token_global, "mlp_patch", ctx, "WanModel")({"x": local})
            out[(name, "undescribed")] = "ran"
        except PatchRefused as e:
            out[(name, "undescribed")] = str(e)
    return out


def _block(args):
    return {"img": args["img"] * 2.0 + 1.0}


def _replace(args, extra):
    img = extra["original_block"](args)["img"]
    return {"img": img - img.mean(1, keepdim=True)}


@pytest.mark.multirank
def test_patches_see_the_whole_sequence_on_a_split_one():
    from parallel_backend.testing.spmd import run_on_ranks

    per_rank = run_on_ranks(_sequence_fn, ParallelConfig(world_size=2, ulysses=2, device="cpu", dtype="fp32"))
    refs = {"flat": _token_global({"x": _whole()}), "frames": _token_global({"x": _whole(1, 17)}),
            "replace": _replace({"img": _whole(2)}, {"original_block": _block})["img"]}
    diffs = {}
    for results in per_rank:
        for name in ("ulysses2", "ring2"):
            for case, ref in refs.items():
                got = results[(name, case)]
                assert got.shape == ref.shape
                diffs[(name, case)] = max(diffs.get((name, case), 0.0), (got - ref).abs().max().item())
            message = results[(name, "undescribed")]
            assert "'mlp_patch' of WanModel" in message and "remove the node" in message
    print(f"patch on split tokens vs whole sequence (max abs): {diffs}")
    assert max(diffs.values()) <= TOL
    # what a rank's share alone would give is far off: the split is what the wrapper undoes
    local_only = torch.cat([_token_global({"x": part}) for part in _whole().split(7, 1)], 1)
    assert (local_only - refs["flat"]).abs().max() > 0.1


def _tp_fn(mesh0):
    from parallel_backend.parallel.plan import SequenceState
    from parallel_backend.runtime.mesh import build_mesh

    mesh = build_mesh(ParallelConfig(world_size=2, tp=2, device="cpu", dtype="fp32"), mesh0.rank, mesh0.device)
    state = SequenceState(mesh.sequence_groups(), mesh.sequence_index)
    state.begin_forward()
    x = _whole(3)  # (B, S, heads * head_dim): this rank holds its heads' channels
    q = torch.randn(B, S, HEADS, C // HEADS, generator=torch.Generator().manual_seed(4))
    n = C // 2
    point = PatchPoint(args={("dict", "x"): Tokens(1, tp_dim=2), ("dict", "q"): Tokens(1, tp_dim=2)},
                       returns={("value", None): Tokens(1, tp_dim=2)})
    patch = WholeSequencePatch(_heads_patch, point, _ctx(mesh, state))
    local = patch({"x": x[..., mesh.coord["tp"] * n:(mesh.coord["tp"] + 1) * n],
                   "q": q[:, :, mesh.coord["tp"] * HEADS // 2:(mesh.coord["tp"] + 1) * HEADS // 2]})
    return mesh.coord["tp"], local


def _heads_patch(d):
    """Reads every head: a mix across the channels (and heads of q) that no head shard could compute alone."""
    return d["x"].flip(-1) + d["q"].flatten(2).mean(-1, keepdim=True)


@pytest.mark.multirank
def test_patches_see_every_head_under_tensor_parallelism():
    from parallel_backend.testing.spmd import run_on_ranks

    per_rank = dict(run_on_ranks(_tp_fn, ParallelConfig(world_size=2, tp=2, device="cpu", dtype="fp32")))
    got = torch.cat([per_rank[0], per_rank[1]], -1)
    q = torch.randn(B, S, HEADS, C // HEADS, generator=torch.Generator().manual_seed(4))
    ref = _heads_patch({"x": _whole(3), "q": q})
    diff = (got - ref).abs().max().item()
    print(f"patch on TP head shards vs whole width: {diff:.2e}")
    assert diff <= TOL


def test_options_for_rows_gives_a_replica_its_rows():
    options = {"sigmas": torch.tensor([1.0, 2.0]), "sample_sigmas": torch.arange(5.0),
               "cond_or_uncond": [0, 1], "uuids": ["a", "b"], "audio_embeds": torch.ones(1, 3)}
    row1 = options_for_rows(options, slice(1, 2), 2)
    assert row1["sigmas"].tolist() == [2.0] and row1["cond_or_uncond"] == [1] and row1["uuids"] == ["b"]
    assert torch.equal(row1["sample_sigmas"], options["sample_sigmas"])  # the schedule is not per row
    assert row1["audio_embeds"] is options["audio_embeds"]
    # two rows per cond (a batch of 2 latents, cond and uncond): a replica of rows 2..3 holds the uncond chunk
    four = options_for_rows({"cond_or_uncond": [0, 1], "sigmas": torch.ones(2)}, slice(2, 4), 4)
    assert four["cond_or_uncond"] == [1] and four["sigmas"].shape == (2,)
    assert options_for_rows(options, slice(0, 2), 2) is options


def test_patches_between_blocks_are_refused_on_pipeline_stages():
    points = {"double_block": PatchPoint(between_blocks=True), "attn1_patch": PatchPoint()}
    refuse_between_blocks({"patches": {"attn1_patch": [_token_global]}}, points)  # inside a block: its stage runs it
    with pytest.raises(PatchRefused, match=r"double_block.*set pp to 1"):
        refuse_between_blocks({"patches": {"double_block": [_token_global]}}, points)


def test_a_patch_runs_untouched_where_the_tokens_are_whole():
    from parallel_backend.parallel.attention import SequenceParallelGroups
    from parallel_backend.parallel.plan import SequenceState

    state = SequenceState(SequenceParallelGroups(), 0)
    state.begin_forward()
    ctx = ShareContext(state)
    seen = []
    WholeSequencePatch(lambda d: seen.append(d) or d["x"], POINT, ctx)({"x": _whole()})
    assert seen[0]["x"].shape == (B, S, C)
    assert UndescribedPatch(_token_global, "mlp_patch", ctx, "WanModel")({"x": _whole()}).shape == (B, S, C)
