"""Sharded weights (parallel_backend/parallel/sharded_weights.py: FSDP2 over the host's blocks) on CPU/gloo ranks.

Against the 1-rank ShardedModel on the same file (fp32): parity within TOL on 2- and 4-rank meshes that compose the
sharding with Ulysses, Ring, CFG and the replica fold (batch 1 on a cfg mesh); a rank's parameter bytes = the
blocks' bytes / N + everything else (within 5%); the bytes the gathers move per forward, counted in the real
collective = the padded shards x (N - 1), within 2% of weight bytes x (N - 1) / N; a scaled-fp8 file with a LoRA
(merged whole, rounded to fp8 by ComfyUI's code, then sharded by rows) equals the 1-rank model with that LoRA, and
its blocks compiled (torch.compile, eager backend) give the same output; Cosmos Predict2 (frames whole, planes split)
sharded the same way equals its one rank.
"""
from __future__ import annotations

import gc

import pytest
import torch

from parallel_backend.config import ConfigError, ParallelConfig, validate_config

TOL = 1e-5
MEMORY_SLACK = 0.05
GATHER_SLACK = 0.02
LATENTS = {"even": (16, 2, 8, 8), "ragged": (16, 3, 6, 10)}  # 32 tokens, 45 tokens
CTX_LEN, TEXT_DIM = 12, 4096
MESHES_2 = {"shard_ulysses2": dict(ulysses=2), "shard_ring2": dict(ring=2), "shard_cfg2": dict(cfg=2)}
MESHES_4 = {"shard_cfg2xulysses2": dict(cfg=2, ulysses=2), "shard_ring2xulysses2": dict(ring=2, ulysses=2)}
LORA_STRENGTH = 0.8


def _config(world, spec, shard=True):
    return ParallelConfig(world_size=world, device="cpu", dtype="fp32", shard_weights=shard, **spec)


def _cases() -> dict:
    g = torch.Generator().manual_seed(0)
    cases = {}
    for lname, shape in LATENTS.items():
        x = torch.randn(2, *shape, generator=g)
        t = torch.tensor([500.0, 320.0])
        ctx = torch.randn(2, CTX_LEN, TEXT_DIM, generator=g)
        for b in (2, 1):
            cases[f"{lname}_b{b}"] = (x[:b].clone(), t[:b].clone(), ctx[:b].clone())
    return cases


def _unit_bytes(model) -> int:
    from parallel_backend.models import wan
    from parallel_backend.parallel.sharded_weights import shard_units

    return sum(p.numel() * p.element_size() for _, u in shard_units(model, wan.SHARD_UNITS) for p in u.parameters())


def _rank_fn(mesh0, paths, meshes, cases):
    from parallel_backend.parallel.collectives import count_bytes
    from parallel_backend.runtime.mesh import build_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    world = mesh0.config.world_size
    report = {}
    for name, spec in meshes.items():
        mesh = build_mesh(_config(world, spec), mesh0.rank, mesh0.device)
        model = ShardedModel(mesh, paths["bf"], "fp32")
        outs, counted = {}, {}
        for cname, (x, t, ctx) in cases.items():
            with count_bytes() as c:
                y = model.forward_rows(x, t, ctx)
            r = model.rows(x.shape[0])
            outs[cname] = ((r.start, r.stop), y, model.is_leader(x.shape[0]))
            counted[cname] = dict(c)
        report[name] = {"outs": outs, "counted": counted, "param_bytes": model.info()["param_bytes"],
                        "gathered_formula": model.sharded_weights.gathered_bytes()}
        del model
        gc.collect()
    if world == 2:  # scaled fp8 with a LoRA, on the first mesh
        mesh = build_mesh(_config(world, MESHES_2["shard_ulysses2"]), mesh0.rank, mesh0.device)
        model = ShardedModel(mesh, paths["fp8"], "fp32")
        model.set_loras([(paths["lora"], LORA_STRENGTH)])
        x, t, ctx = cases["ragged_b2"]
        r = model.rows(2)
        report["fp8_lora"] = ((r.start, r.stop), model.forward_rows(x, t, ctx), model.is_leader(2))
        # the blocks compiled (dynamo traces the block, FSDP's gather hooks run around it)
        model.set_compile({"backend": "eager"})
        report["fp8_lora_compiled"] = model.forward_rows(x, t, ctx)
        del model
        model = ShardedModel(mesh, paths["cosmos"], "fp32")  # Cosmos Predict2 (grid split) sharded the same way
        x, t, ctx = _cosmos_case()
        r = model.rows(2)
        report["cosmos"] = ((r.start, r.stop), model.forward_rows(x, t, ctx), model.is_leader(2))
    return report


def _cosmos_case():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, 3, 6, 10, generator=g), torch.tensor([0.8, 0.3]), torch.randn(2, 12, 1024, generator=g)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from parallel_backend.testing.synthetic import write_fp8_variant, write_tiny_cosmos, write_tiny_wan, write_wan_lora

    d = tmp_path_factory.mktemp("sharded")
    cosmos = str(write_tiny_cosmos(str(d / "cosmos.safetensors")))
    bf = str(write_tiny_wan(str(d / "wan.safetensors")))
    fp8 = str(write_fp8_variant(bf, str(d / "wan_fp8_scaled.safetensors"), scaled=True))
    lora = str(d / "lora.safetensors")
    write_wan_lora(lora, bf, fmt="comfy")
    return {"bf": bf, "fp8": fp8, "lora": lora, "cosmos": cosmos}


@pytest.fixture(scope="module")
def cases():
    return _cases()


@pytest.fixture(scope="module")
def reference(paths, cases):
    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    one = ShardedModel(mesh, paths["bf"], "fp32")
    outs = {c: one.forward_rows(x, t, ctx) for c, (x, t, ctx) in cases.items()}
    unit = _unit_bytes(one.model)
    total = one.info()["param_bytes"]
    fp8 = ShardedModel(mesh, paths["fp8"], "fp32")
    fp8.set_loras([(paths["lora"], LORA_STRENGTH)])
    x, t, ctx = cases["ragged_b2"]
    cosmos = ShardedModel(mesh, paths["cosmos"], "fp32")
    return {"outs": outs, "unit_bytes": unit, "total_bytes": total, "fp8_lora": fp8.forward_rows(x, t, ctx),
            "cosmos": cosmos.forward_rows(*_cosmos_case())}


@pytest.fixture(scope="module")
def world2(paths, cases):
    from parallel_backend.testing.spmd import run_on_ranks

    return run_on_ranks(_rank_fn, _config(2, MESHES_2["shard_ulysses2"]), paths, MESHES_2, cases, timeout=600)


@pytest.fixture(scope="module")
def world4(paths, cases):
    from parallel_backend.testing.spmd import run_on_ranks

    return run_on_ranks(_rank_fn, _config(4, MESHES_4["shard_cfg2xulysses2"]), paths, MESHES_4, cases, timeout=600)


def _assembled(per_rank, mesh, case, batch):
    got = torch.full((batch, *LATENTS[case.rsplit("_", 1)[0]]), float("nan"))
    for rep in per_rank:
        (start, stop), y, leader = rep[mesh]["outs"][case]
        if leader:
            got[start:stop] = y
    return got


def _check(per_rank, reference, meshes):
    world = len(per_rank)
    for mesh in meshes:
        worst = 0.0
        for case, (x, _, _) in _cases().items():
            got = _assembled(per_rank, mesh, case, x.shape[0])
            diff = (got - reference["outs"][case]).abs().max().item()
            worst = max(worst, diff)
            assert diff <= TOL, f"{mesh} {case}: {diff:.2e}"
        # memory: the blocks' bytes / N on every rank, plus the rest whole
        unit, total = reference["unit_bytes"], reference["total_bytes"]
        expected = unit / world + (total - unit)
        held = [rep[mesh]["param_bytes"] for rep in per_rank]
        for h in held:
            assert abs(h - expected) <= MEMORY_SLACK * expected, (mesh, h, expected)
        # traffic: what the real all-gathers moved, per forward (one call), on every rank
        for rep in per_rank:
            for case, counted in rep[mesh]["counted"].items():
                moved = counted.get("weight_gather", 0)
                assert moved == rep[mesh]["gathered_formula"], (mesh, case, moved)
                ideal = unit * (world - 1) / world
                assert abs(moved - ideal) <= GATHER_SLACK * ideal, (mesh, case, moved, ideal)
        print(f"\n{mesh}: max abs diff vs 1 rank {worst:.2e}; param bytes per rank {held[0]} (expected "
              f"{expected:.0f} = blocks {unit} / {world} + rest {total - unit}; 1 rank holds {total}); weight "
              f"gather per forward {per_rank[0][mesh]['counted']['even_b2']['weight_gather']} bytes "
              f"(blocks x (N-1)/N = {unit * (world - 1) / world:.0f})")


@pytest.mark.multirank
def test_two_ranks_match_one_rank(world2, reference):
    _check(world2, reference, MESHES_2)


@pytest.mark.multirank
def test_four_ranks_match_one_rank(world4, reference):
    _check(world4, reference, MESHES_4)


def _leaders_rows(per_rank, key, like):
    """The output assembled from the rows each replica leader wrote (NaN where nobody wrote)."""
    got = torch.full_like(like, float("nan"))
    for rep in per_rank:
        (start, stop), y, leader = rep[key]
        if leader:
            got[start:stop] = y
    return got


@pytest.mark.multirank
def test_scaled_fp8_with_lora_and_cosmos_match_one_rank(world2, reference):
    diff = (_leaders_rows(world2, "fp8_lora", reference["fp8_lora"]) - reference["fp8_lora"]).abs().max().item()
    print(f"\nscaled fp8 + LoRA, sharded weights x ulysses2 vs 1 rank: {diff:.2e}")
    assert diff <= TOL
    cdiff = (_leaders_rows(world2, "cosmos", reference["cosmos"]) - reference["cosmos"]).abs().max().item()
    print(f"Cosmos Predict2, sharded weights x ulysses2 vs 1 rank (45-token grid): {cdiff:.2e}")
    assert cdiff <= TOL
    for rep in world2:  # compiled blocks give the eager output
        (start, stop), y, _ = rep["fp8_lora"]
        assert torch.equal(rep["fp8_lora_compiled"], y)


@pytest.mark.parametrize("spec, needle", [
    (dict(world_size=1, shard_weights=True), "at least 2 ranks"),
    (dict(world_size=2, tp=2, shard_weights=True), "set tp to 1"),
])
def test_refused_configs(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(ParallelConfig(device="cpu", **spec))
