"""Folding idle replicas into the sequence split (runtime/mesh.py): no rank idles on any call.

At cfg 1.0 ComfyUI sends one row per call, and it may send cond and uncond as separate calls at any cfg. On a
cfg2 (or cfg2 x ulysses2) mesh the replicas without a row join the sequence split for that call: Ulysses when
the heads divide (tiny Wan, 4 heads), Ring across the folded axis otherwise (a 6-head Wan on cfg2 x ulysses2:
6 % 4 != 0). Every rank reports, per forward, how many tokens it computed (the group's stats); the output equals
one rank within 1e-5 (fp32).
"""
import pytest
import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.group import WorkerGroup
from parallel_backend.runtime.mesh import fold_for, single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.synthetic import write_tiny_wan

TOL = 1e-5


def test_fold_factor_gives_every_active_replica_a_row():
    assert fold_for(2, 2) == 1 and fold_for(1, 2) == 2
    assert fold_for(1, 4) == 4 and fold_for(2, 4) == 2 and fold_for(3, 4) == 2 and fold_for(4, 4) == 1
    assert fold_for(5, 4) == 1 and fold_for(1, 1) == 1 and fold_for(2, 6) == 3 and fold_for(4, 6) == 2
    for replicas in range(1, 9):
        for batch in range(1, 10):
            f = fold_for(batch, replicas)
            assert replicas % f == 0 and replicas // f <= batch or f == 1 and batch >= replicas


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("folds")
    # 4 heads: folds join Ulysses; 6 heads (dim 768): on cfg2 x ulysses2 a fold of 2 needs ulysses 4 -> Ring
    return {"heads4": write_tiny_wan(str(d / "tiny4.safetensors"), seed=8),
            "heads6": write_tiny_wan(str(d / "tiny6.safetensors"), seed=9, dim=768)}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 6, 10, generator=g)  # 45 tokens: ragged on 2 and 4 sequence ranks
    return x, torch.tensor([800.0, 800.0]), torch.randn(2, 12, 4096, generator=g)


@pytest.mark.multirank
@pytest.mark.parametrize("degrees", [dict(cfg=2), dict(cfg=2, ulysses=2)], ids=["cfg2", "cfg2xulysses2"])
def test_every_rank_computes_on_every_call(files, degrees):
    x, t, ctx = _inputs()
    world = 2 * degrees.get("ulysses", 1)
    g = WorkerGroup(ParallelConfig(world_size=world, device="cpu", dtype="fp32", **degrees)).start()
    try:
        report = []
        for name, path in files.items():
            ref = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"),
                                                torch.device("cpu")), path, "fp32").forward_rows(x, t, ctx)
            g.load(path, "fp32")
            before = [r["forwards"] for r in g.stats()]
            # cfg 1.0: one row per call; cfg 5 called separately: cond row, then uncond row; then both batched
            calls = [(slice(0, 1), "cfg 1.0"), (slice(0, 1), "cond alone"), (slice(1, 2), "uncond alone"),
                     (slice(0, 2), "cond + uncond")]
            worst = 0.0
            for rows, what in calls:
                out = g.forward(x[rows], t[rows], ctx[rows])
                d = (out - ref[rows]).abs().max().item()
                assert d <= TOL, f"{name} {what} on {degrees}: {d:.2e}"
                worst = max(worst, d)
            stats = g.stats()
            per_call = [r["tokens_per_forward"][-len(calls):] for r in stats]
            for r, b in zip(stats, before):
                assert r["forwards"] - b == len(calls)
            for rank, tokens in enumerate(per_call):
                assert all(n > 0 for n in tokens), f"{name} on {degrees}: rank {rank} idled: {tokens}"
            # single rows fold (Ulysses while the heads divide, Ring otherwise); two rows run on the mesh as built
            kind = "ring" if name == "heads6" and "ulysses" in degrees else "ulysses"
            assert all(r["fold_per_forward"][-len(calls):] == [f"2x{kind}"] * 3 + ["none"] for r in stats), stats
            # the work is spread: a single row on a fold of f gets 1/f of the tokens a replica would hold
            seq = world // 2
            assert max(per_call[0][0], per_call[-1][0]) <= -(-45 // (2 * seq)) + 1
            report.append(f"{name}: worst {worst:.2e}, tokens per call per rank {per_call}")
        print(f"\n{degrees}: " + "; ".join(report))
    finally:
        g.stop()
