"""Pipeline stages (parallel_backend/parallel/pipeline.py) on CPU/gloo ranks, against the 1-rank ShardedModel on the
same file (fp32): pp2, pp2 with an uneven 3:1 split (a 4-block model), pp2 x ulysses2, pp2 x ring2 and cfg2 x pp2
within 1e-5
(batch 2: two micro-batches in flight; batch 1; 32 and 45 tokens); each rank holds its stage's blocks (+ the rest)
as the split says; only the last stage writes; the activation crosses once per block boundary per micro-batch;
block-replacement patches are refused."""
from __future__ import annotations

import gc

import pytest
import torch

from parallel_backend.config import ConfigError, ParallelConfig, validate_config
from parallel_backend.parallel.pipeline import bubble_fraction, stage_ranges

TOL = 1e-5
LATENTS = {"even": (16, 2, 8, 8), "ragged": (16, 3, 6, 10)}
MESHES_2 = {"pp2": dict(pp=2), "pp2_split3to1": dict(pp=2, stage_split=(3, 1))}
MESHES_4 = {"pp2xulysses2": dict(pp=2, ulysses=2), "pp2xring2": dict(pp=2, ring=2), "cfg2xpp2": dict(cfg=2, pp=2)}
LAYERS = 4


def _cases():
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in LATENTS.items():
        x, ctx = torch.randn(2, *shape, generator=g), torch.randn(2, 12, 4096, generator=g)
        t = torch.tensor([500.0, 320.0])
        for b in (2, 1):
            out[f"{name}_b{b}"] = (x[:b].clone(), t[:b].clone(), ctx[:b].clone())
    return out


def _block_bytes(model):
    from parallel_backend.parallel.pipeline import SkippedBlock

    return [0 if isinstance(b, SkippedBlock) else sum(p.numel() * p.element_size() for p in b.parameters())
            for b in model.blocks]


def _rank_fn(mesh0, path, meshes):
    from parallel_backend.parallel.collectives import count_bytes
    from parallel_backend.runtime.mesh import build_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    report = {}
    for name, spec in meshes.items():
        cfg = ParallelConfig(world_size=mesh0.config.world_size, device="cpu", dtype="fp32", **spec)
        mesh = build_mesh(cfg, mesh0.rank, mesh0.device)
        m = ShardedModel(mesh, path, "fp32")
        outs = {}
        for case, (x, t, ctx) in _cases().items():
            with count_bytes() as c:
                y = m.forward_rows(x, t, ctx)
            r = m.rows(x.shape[0])
            outs[case] = ((r.start, r.stop), y, m.is_leader(x.shape[0]), dict(c))
        patched = None
        try:
            x, t, ctx = _cases()["even_b1"]
            m.forward_rows(x, t, ctx, transformer_options={"patches_replace": {"dit": {("double_block", 1): id}}})
        except ValueError as e:
            patched = str(e)
        report[name] = {"outs": outs, "blocks": _block_bytes(m.model), "stage": mesh.coord["pp"],
                        "param_bytes": m.info()["param_bytes"], "patched": patched}
        del m
        gc.collect()
    return report


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    from parallel_backend.testing.synthetic import write_tiny_wan

    return write_tiny_wan(str(tmp_path_factory.mktemp("pp") / "wan4.safetensors"), num_layers=LAYERS)


@pytest.fixture(scope="module")
def reference(path):
    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    m = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu")),
                     path, "fp32")
    return {"outs": {c: m.forward_rows(x, t, ctx) for c, (x, t, ctx) in _cases().items()},
            "blocks": _block_bytes(m.model), "param_bytes": m.info()["param_bytes"]}


@pytest.fixture(scope="module")
def world2(path):
    from parallel_backend.testing.spmd import run_on_ranks

    return run_on_ranks(_rank_fn, ParallelConfig(world_size=2, device="cpu", dtype="fp32", pp=2), path, MESHES_2)


@pytest.fixture(scope="module")
def world4(path):
    from parallel_backend.testing.spmd import run_on_ranks

    return run_on_ranks(_rank_fn, ParallelConfig(world_size=4, device="cpu", dtype="fp32", pp=2, ulysses=2), path,
                        MESHES_4)


def _check(per_rank, reference, meshes):
    for mesh, spec in meshes.items():
        worst = 0.0
        for case, ref in reference["outs"].items():
            got = torch.full_like(ref, float("nan"))
            writers = 0
            for rep in per_rank:
                (start, stop), y, leader, counted = rep[mesh]["outs"][case]
                if leader:
                    assert rep[mesh]["stage"] == spec["pp"] - 1  # only the last stage writes
                    got[start:stop] = y
                    writers += 1
            diff = (got - ref).abs().max().item()
            worst = max(worst, diff)
            assert diff <= TOL, (mesh, case, diff)
        # each stage holds its range of blocks (and everything outside the blocks)
        ranges = stage_ranges(LAYERS, spec["pp"], spec.get("stage_split", ()))
        full = reference["blocks"]
        for rep in per_rank:
            start, stop = ranges[rep[mesh]["stage"]]
            assert rep[mesh]["blocks"] == [b if start <= i < stop else 0 for i, b in enumerate(full)]
            expected = reference["param_bytes"] - sum(full) + sum(full[start:stop])
            assert rep[mesh]["param_bytes"] == expected
            assert "cannot run on pipeline stages" in rep[mesh]["patched"]
        # the activation crosses each stage boundary once per micro-batch (row), from the first stage only
        for rep in per_rank:
            counted = rep[mesh]["outs"]["even_b2"][3].get("pp_p2p", 0)
            assert (counted > 0) == (rep[mesh]["stage"] < spec["pp"] - 1)
        print(f"\n{mesh}: max abs diff vs 1 rank {worst:.2e}; stages {ranges}; param bytes per stage "
              + ", ".join(f"{rep[mesh]['stage']}: {rep[mesh]['param_bytes']}" for rep in per_rank[:2]))


def test_stage_ranges():
    assert stage_ranges(40, 2) == [(0, 20), (20, 40)]
    assert stage_ranges(40, 2, (24, 16)) == [(0, 24), (24, 40)]
    assert stage_ranges(4, 2, (3, 1)) == [(0, 3), (3, 4)]
    assert stage_ranges(3, 3, (100, 1, 1)) == [(0, 1), (1, 2), (2, 3)]  # every stage keeps a block
    with pytest.raises(ValueError, match="one per pipeline stage"):
        stage_ranges(40, 2, (1, 2, 3))
    assert bubble_fraction(2, 1) == 0.5 and bubble_fraction(2, 4) == 0.2 and bubble_fraction(1, 1) == 0.0


@pytest.mark.multirank
def test_two_stages_match_one_rank(world2, reference):
    _check(world2, reference, MESHES_2)


@pytest.mark.multirank
def test_stages_with_ulysses_and_cfg_match_one_rank(world4, reference):
    _check(world4, reference, MESHES_4)


@pytest.mark.parametrize("spec, needle", [
    (dict(world_size=2, pp=2, shard_weights=True), "do not combine"),
    (dict(world_size=2, pp=2, stage_split=(1, 2, 3)), "gives 3 stages but pp is 2"),
    (dict(world_size=2, pp=2, stage_split=(1, -2)), "positive numbers"),
])
def test_refused_configs(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(ParallelConfig(device="cpu", **spec))


def _quantized_rank_fn(mesh, path):
    from parallel_backend.runtime.sharded_model import ShardedModel

    m = ShardedModel(mesh, path, "fp32")
    outs = {}
    for case, (x, t, ctx) in _cases().items():
        r = m.rows(x.shape[0])
        outs[case] = ((r.start, r.stop), m.forward_rows(x, t, ctx), m.is_leader(x.shape[0]))
    return outs


@pytest.mark.multirank
def test_two_stages_of_a_quantized_file_match_one_rank(path, tmp_path):
    """A file of ComfyUI's mixed-precision layout (comfy_quant keys where the host reads them, else its metadata;
    quantized by ComfyUI's own code) on pp2: each stage's quantized layers load themselves (the other stage's blocks
    are not there to load) and the last stage's output equals one rank's."""
    import comfy_host
    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel
    from parallel_backend.testing.spmd import run_on_ranks
    from parallel_backend.testing.synthetic import write_quantized_variant

    comfy_host.import_comfy()
    import comfy.utils
    layout = "comfy_quant" if hasattr(comfy.utils, "convert_old_quants") else "metadata"
    qpath = write_quantized_variant(path, str(tmp_path / "wan4_quantized.safetensors"), layout)
    one = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu")),
                       qpath, "fp32")
    per_rank = run_on_ranks(_quantized_rank_fn, ParallelConfig(world_size=2, device="cpu", dtype="fp32", pp=2), qpath)
    worst = 0.0
    for case, (x, t, ctx) in _cases().items():
        ref = one.forward_rows(x, t, ctx)
        got = torch.full_like(ref, float("nan"))
        for (start, stop), y, leader in (rep[case] for rep in per_rank):
            if leader:
                got[start:stop] = y
        worst = max(worst, (got - ref).abs().max().item())
    print(f"\n{layout} file on pp2: max abs diff vs 1 rank {worst:.2e}")
    assert worst <= TOL
