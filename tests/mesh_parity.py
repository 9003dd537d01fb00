"""Shared by the families' native-parity tests: run a per-rank function on several 4-rank meshes in one spawn (each
mesh built in turn on the same process group), and compare the rows every rank wrote with the native outputs."""
import torch

from parallel_backend.config import ParallelConfig

# two 4-rank meshes that between them use every axis (cfg, ulysses, ring, tp)
MESHES_4 = {"cfg2xulysses2": dict(cfg=2, ulysses=2), "ring2xtp2": dict(ring=2, tp=2)}


def run_meshes(mesh0, run_mesh, paths, meshes):
    """On every rank: {mesh name: run_mesh(mesh, paths)} for each of `meshes` (name -> degrees) over the ranks
    run_on_ranks started (mesh0's world size)."""
    from parallel_backend.runtime.mesh import build_mesh

    out = {}
    for name, degrees in meshes.items():
        cfg = ParallelConfig(world_size=mesh0.config.world_size, device="cpu", dtype="fp32", **degrees)
        mesh = mesh0 if cfg == mesh0.config else build_mesh(cfg, mesh0.rank, mesh0.device)
        out[name] = run_mesh(mesh, paths)
    return out


def assert_rows_match(native_outputs, per_rank, label, tol, check_result=None) -> dict:
    """Every key's output, assembled from the rows each rank wrote (result[key] = (rows, y, ...)), equals native
    within `tol` (a row nobody wrote stays NaN and fails); `check_result(key, result)` checks more per rank.
    Returns the worst difference per preset (key[0]) and prints it."""
    worst = {}
    for key, ref in native_outputs.items():
        got = torch.full_like(ref, float("nan"))
        for result in per_rank:
            rows, y = result[key][:2]
            if y is not None:
                got[rows] = y
                if check_result is not None:
                    check_result(key, result[key])
        diff = (got - ref).abs().max().item()
        worst[key[0]] = max(worst.get(key[0], 0.0), diff)
        assert diff <= tol, f"{key} on {label}: max abs diff {diff:.2e}"
    print(f"{label}: worst max abs diff vs ComfyUI native over {len(native_outputs)} cases: "
          + ", ".join(f"{p} {d:.2e}" for p, d in worst.items()))
    return worst
