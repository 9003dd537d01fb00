"""Precision x mesh: fp32, bf16, fp8 (e4m3fn) and ComfyUI fp8_scaled files on every sequence-parallel mesh.

The bug this guards (issue "fp8 files fail on every sequence-parallel mesh"): the plan's gather hook was put on
the output layer before loading swapped fp8 linears into the pack's own fp8 layer (gone since: ComfyUI's layers hold
fp8 now), so the new module had no hook and each rank returned only its own tokens; tp2 / cfg2 ran, ulysses2 /
ring2 failed. Now every module replacement happens before the hooks, `replace_module` carries hooks over any later
one, and the load checks they are all there.

Each mesh's output (rows reassembled from the replica leaders) must equal one rank on the same file (fp32
compute: the fp8 weights are upcast exactly). The fp8_scaled files keep their biases in fp32, the layout the
pack's own writer produces by default and the one that used to differ from ComfyUI (which rounds them to fp8).
The mixed-precision file is ComfyUI's newer layout (per-layer `comfy_quant` keys where the host reads them, else the
`_quantization_metadata` that 0.3.75 reads), its layers quantized by ComfyUI's own code.
"""
from __future__ import annotations

import gc

import pytest
import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import write_fp8_variant, write_quantized_variant, write_tiny_wan
from parallel_backend.weights.reads import held_dtype

import comfy_host  # noqa: E402

pytestmark = pytest.mark.multirank
TOL = 1e-5
MESHES = {2: {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2)},
          4: {"cfg2xulysses2": dict(cfg=2, ulysses=2), "ring2xtp2": dict(ring=2, tp=2),
              "ulysses2xtp2": dict(ulysses=2, tp=2)}}
# latent (C, T, H, W): 2x4x4 = 32 tokens (divides 2 and 4), 3x3x5 = 45 (ragged: padded and masked)
LATENTS = {"even": (16, 2, 8, 8), "ragged": (16, 3, 6, 10)}


def _cases():
    g = torch.Generator().manual_seed(5)
    return {name: (torch.randn(2, *shape, generator=g), torch.tensor([700.0, 250.0]),
                   torch.randn(2, 12, 4096, generator=g)) for name, shape in LATENTS.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_meshes")
    f = {"fp32": write_tiny_wan(str(d / "tiny_fp32.safetensors"), seed=7),
         "bf16": write_tiny_wan(str(d / "tiny_bf16.safetensors"), seed=7, dtype=torch.bfloat16)}
    f["fp8"] = write_fp8_variant(f["bf16"], str(d / "tiny_fp8_e4m3fn.safetensors"), scaled=False)
    f["fp8_scaled"] = write_fp8_variant(f["bf16"], str(d / "tiny_fp8_scaled.safetensors"), scaled=True)
    comfy_host.import_comfy()  # (the mixed-precision file is quantized by ComfyUI's own code)
    import comfy.utils
    layout = "comfy_quant" if hasattr(comfy.utils, "convert_old_quants") else "metadata"
    f["fp8_mixed"] = write_quantized_variant(f["bf16"], str(d / f"tiny_fp8_{layout}.safetensors"), layout)
    return f


def _rank_fn(mesh0, files, meshes, cases):
    """On every rank: each mesh of this world size, each file; outputs, rows and what the plan left on the model."""
    from parallel_backend.parallel.plan import missing_plan_hooks
    from parallel_backend.runtime.mesh import build_mesh

    report = {}
    for mname, spec in meshes.items():
        cfg = ParallelConfig(world_size=mesh0.config.world_size, device="cpu", dtype="fp32", **spec)
        mesh = mesh0 if cfg == mesh0.config else build_mesh(cfg, mesh0.rank, mesh0.device)
        for fname, path in files.items():
            m = ShardedModel(mesh, path, "fp32")
            outs = {c: (m.rows(2), m.forward_rows(x, t, ctx)) for c, (x, t, ctx) in cases.items()}
            report[(mname, fname)] = {
                "outs": outs, "leader": m.is_leader(2), "missing": missing_plan_hooks(m.model, m.plan_hooks),
                "hooks": [(h.module, h.kind) for h in m.plan_hooks],
                "head_dtype": held_dtype(m.model.head.head.weight), "fp8_layers": m.load_stats["fp8_layers"]}
            del m
            gc.collect()
    return report


@pytest.fixture(scope="module")
def references(files):
    cfg = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    out = {}
    for fname, path in files.items():
        m = ShardedModel(single_rank_mesh(cfg, torch.device("cpu")), path, "fp32")
        out[fname] = {c: m.forward_rows(x, t, ctx) for c, (x, t, ctx) in _cases().items()}
    return out


@pytest.fixture(scope="module", params=sorted(MESHES), ids=lambda w: f"world{w}")
def world(request, files):
    w = request.param
    first = next(iter(MESHES[w].values()))
    return MESHES[w], run_on_ranks(_rank_fn, ParallelConfig(world_size=w, device="cpu", dtype="fp32", **first),
                                   files, MESHES[w], _cases(), timeout=600)


def _assemble(per_rank, key, case):
    out = torch.full((2, *LATENTS[case]), float("nan"))
    for rep in per_rank:
        r = rep[key]
        rows, y = r["outs"][case]
        if r["leader"] and y is not None:
            out[rows] = y
    return out


def test_every_precision_on_every_sequence_parallel_mesh_equals_one_rank(world, references):
    meshes, per_rank = world
    table = []
    for mname, spec in meshes.items():
        for fname in references:
            key = (mname, fname)
            for rep in per_rank:
                # the plan's hooks are on every module it names, after load, on every rank
                assert rep[key]["missing"] == [], f"{key}: {rep[key]['missing']}"
                assert ("head", "gather_output") in rep[key]["hooks"]
            if fname.startswith("fp8"):  # the case that broke: the gathered output layer is an fp8 layer
                assert per_rank[0][key]["head_dtype"] == torch.float8_e4m3fn and per_rank[0][key]["fp8_layers"] >= 24
            worst = 0.0
            for case in LATENTS:
                got, ref = _assemble(per_rank, key, case), references[fname][case]
                assert got.shape == ref.shape and torch.isfinite(got).all(), key
                worst = max(worst, (got - ref).abs().max().item())
            table.append((mname, fname, worst))
            assert worst <= TOL, f"{mname} on the {fname} file: max abs {worst:.2e} vs one rank"
    print("\n" + "\n".join(f"{m:>14} {f:>10}: max abs vs one rank {d:.2e}" for m, f, d in table))


def test_replacing_a_hooked_module_keeps_the_plan_hooks():
    """replace_module carries split / gather hooks over to the new module, so a swap after the plan (a
    later quantized layer, say) cannot lose them; missing_plan_hooks reports a plain setattr that does."""
    import torch.nn as nn

    from parallel_backend.parallel.plan import PlanHook, missing_plan_hooks, replace_module

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    calls = []
    h = model[1].register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__) or out)
    hooks = [PlanHook("1", "gather_output", h)]
    assert missing_plan_hooks(model, hooks) == []

    class SwappedLinear(nn.Linear):  # a later swap, as a quantized layer would be
        pass

    replace_module(model, "1", SwappedLinear(4, 4))
    assert missing_plan_hooks(model, hooks) == []
    model(torch.randn(2, 4))
    assert calls == ["SwappedLinear"]
    model[1] = nn.Linear(4, 4)  # what the bug did: a swap that drops the hook
    assert missing_plan_hooks(model, hooks) == ["gather_output on 1 (Linear)"]
