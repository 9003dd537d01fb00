"""Targets the multi-node tests hand to `python -m parallel_backend.runtime.node --target multinode_ranks:NAME`
(imported by plain name in the ranks: the test puts tests/ on PYTHONPATH). Each writes what the test checks to
files under ctx.args["out"]."""
import json
import os
import subprocess
import traceback

import torch
import torch.distributed as dist

from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.multinode import check_model_file, resolve_model
from tiny_inputs import wan_inputs


def _sockets() -> dict:
    """This namespace's TCP sockets while the group is up: listening ones and established ones."""
    run = lambda *a: subprocess.run(["ss", "-Htn", *a], capture_output=True, text=True, check=True).stdout
    return {"listen": run("-l"), "established": run("state", "established")}


def parity(ctx) -> None:
    """On each of ctx.args["meshes"] (name -> degrees): the tiny Wan's forward on fixed inputs; the leader of each
    replica saves its rows. Then this namespace's sockets."""
    from parallel_backend.runtime.mesh import build_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    a = ctx.args
    path = resolve_model(ctx.model_dir, a["model"])
    check_model_file(ctx.store, ctx.rank, ctx.world, path, tag="parity")
    x, t, c = wan_inputs(batch=2)
    out = {"node": ctx.node_rank, "interface": ctx.interface, "address": ctx.address,
           "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "meshes": {}}
    for name, degrees in a["meshes"].items():
        cfg = ParallelConfig(world_size=ctx.world.world_size, device="cpu", dtype="fp32", **degrees)
        mesh = build_mesh(cfg, ctx.rank, ctx.device)
        model = ShardedModel(mesh, path, "fp32")
        y = model.forward_rows(x, t, c)
        rows = model.rows(x.shape[0])
        out["meshes"][name] = {"rows": (rows.start, rows.stop), "y": y if model.is_leader(x.shape[0]) else None,
                               "coord": dict(mesh.coord)}
    dist.barrier()
    out["sockets"] = _sockets()  # every rank's connections are up now
    dist.barrier()
    torch.save(out, os.path.join(a["out"], f"rank{ctx.rank}.pt"))


def model_check(ctx) -> None:
    """check_model_file on ctx.args["model"] under this node's model dir: writes the outcome, re-raises."""
    a = ctx.args
    result = {"node": ctx.node_rank}
    try:
        fp = check_model_file(ctx.store, ctx.rank, ctx.world, resolve_model(ctx.model_dir, a["model"]), tag="check")
        result["ok"] = [fp.size, fp.header_sha256]
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(a["out"], f"check{ctx.rank}.json"), "w") as f:
            json.dump(result, f)
