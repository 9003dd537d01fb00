"""Node 0 of the multi-node group tests: the ComfyUI process's side (WorkerGroup with nodes=2), run inside network
namespace 0 by tests/parallel_backend/runtime/test_remote.py while node 1 runs `python -m parallel_backend.runtime.node`
in namespace 1.

    python tests/multinode_driver.py SCENARIO ARGS_JSON

Scenarios write `result.json` (and progress markers the test waits on) into args["out"]:
- parity: each mesh in args["meshes"]: start the group, load (the model by its models-folder name), forward a
  2-row call and a 1-row call (the cfg 1.0 fold), the max abs diff vs one rank; this namespace's sockets; stop.
- kill: a forward in which remote rank 2 sleeps; the test kills every process of namespace 1 meanwhile. Records the
  error and its time, the local ranks and segments left; then a start that finds node 1 missing (short
  rejoin_timeout); then, after asking the test to restart node 1, a start that waits for it to rejoin, and parity.
- refused: a start that node 1 (with another secret) cannot join; the error.
- queue: the shipped workflow wan21_t2v_two_nodes_parallel through a headless ComfyUI started here (127.0.0.1 of
  namespace 0), its Parallel Config pointed at this test's rendezvous and secret, against the same graph on
  ComfyUI's native loader; the UI file converted as the browser does must equal the API file.
- rank_kill: a load whose name on node 1 is another file (refused), the right one (parity), then node 1's rank 3
  killed by pid while it sleeps inside a forward; the error and how long it took.
- nodes: ComfyUI imported here, its models folder args["models"] (diffusion_models/, loras/): the pack's Parallel
  Config (nodes=2, degrees auto) and Parallel Model Loader, sampled with the native KSampler at cfg 4 and 1, with
  Parallel LoRA (a loras/ file node 1 has too) and with the native LoraLoaderModelOnly (tensors only node 0 has,
  shipped over the process group); each against native ComfyUI on the same files.
"""
import json
import os
import subprocess
import sys
import threading
import time
import traceback

import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.group import WorkerGroup, WorkerGroupError
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.runtime.transport import leftover_segments
from tiny_inputs import wan_inputs


def _config(a: dict, degrees: dict, rejoin: float | None = None) -> ParallelConfig:
    return ParallelConfig(world_size=4, device="cpu", dtype="fp32", nodes=2, ranks_per_node=2,
                          rendezvous=a["rendezvous"], secret_file=a["secret"], rejoin_timeout=rejoin or a["rejoin"],
                          threads_per_rank=1, **degrees)


def _reference(path: str):
    model = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"),
                                          torch.device("cpu")), path, "fp32")
    x, t, c = wan_inputs(batch=2)
    return (x, t, c), model.forward_rows(x, t, c)


def _forward_diffs(g: WorkerGroup, a: dict, ref) -> dict:
    (x, t, c), want = ref
    g.load(a["model"], "fp32", names={a["model"]: a["name"]})
    two = (g.forward(x, t, c) - want).abs().max().item()
    one = (g.forward(x[:1], t[:1], c[:1]) - want[:1]).abs().max().item()
    return {"batch2": two, "batch1": one}


def _sockets() -> dict:
    run = lambda *a: subprocess.run(["ss", "-Htn", *a], capture_output=True, text=True, check=True).stdout
    return {"listen": run("-l"), "established": run("state", "established")}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_file(path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def parity(a: dict) -> dict:
    ref = _reference(a["model"])
    out = {"meshes": {}}
    for name, degrees in a["meshes"].items():
        g = WorkerGroup(_config(a, degrees)).start()
        try:
            out["meshes"][name] = _forward_diffs(g, a, ref)
            out["meshes"][name]["remote_memory"] = g.device_memory[2]
            out["meshes"][name]["folds"] = [st["fold_per_forward"] for st in g.stats()]
            out["sockets"] = _sockets()
        finally:
            g.stop()
    return out


def _fault_forward(g: WorkerGroup, inputs, sleeper: int, after_1s) -> dict:
    """A forward in which rank `sleeper` sleeps; `after_1s` runs a second in (the fault). The error, when it came
    (time.time() and seconds after the fault), and what node 0 has left a second later."""
    pids = list(g.pids)
    threading.Timer(1.0, after_1s).start()
    t0, out = time.monotonic(), {"error": None}
    try:
        g.forward(*inputs, fault={"rank": sleeper, "kind": "sleep", "seconds": 30})
    except WorkerGroupError as e:
        out.update(error=str(e), error_at=time.time(), error_after_s=time.monotonic() - t0 - 1.0)
    time.sleep(1.0)
    out.update(local_ranks_alive=[p for p in pids if _alive(p)], segments_left=leftover_segments(os.getpid()),
               group_closed=g.closed)
    return out


def kill(a: dict) -> dict:
    ref = _reference(a["model"])
    (x, t, c), _ = ref
    out = {}
    g = WorkerGroup(_config(a, {"ulysses": 2, "ring": 2})).start()
    out["before"] = _forward_diffs(g, a, ref)
    # remote rank 2 sleeps inside the forward (node 0's ranks wait for it in their first collective); the test
    # kills node 1 once it sees the marker
    out.update(_fault_forward(g, (x, t, c), 2, lambda: open(os.path.join(a["out"], "forward_started"), "w").close()))
    # the next prompt: node 1 is still gone -> the start waits rejoin_timeout, then names the node
    t0 = time.monotonic()
    try:
        WorkerGroup(_config(a, {"ulysses": 2, "ring": 2}, rejoin=a["short_rejoin"])).start().stop()
        out["missing_error"] = None
    except WorkerGroupError as e:
        out["missing_error"] = str(e)
    out["missing_wait_s"] = time.monotonic() - t0
    out["after_missing_alive"] = [p for p in _children() if _alive(p)]
    # node 1 comes back while the next start waits for it
    open(os.path.join(a["out"], "restart_node1"), "w").close()
    t0 = time.monotonic()
    g = WorkerGroup(_config(a, {"ulysses": 2, "ring": 2})).start()
    out["rejoin_wait_s"] = time.monotonic() - t0
    try:
        out["after"] = _forward_diffs(g, a, ref)
    finally:
        g.stop()
    return out


def rank_kill(a: dict) -> dict:
    ref = _reference(a["model"])
    (x, t, c), _ = ref
    out = {}
    g = WorkerGroup(_config(a, {"ulysses": 2, "ring": 2})).start()
    t0 = time.monotonic()
    try:  # a file outside any models folder: node 1 cannot name its copy; every rank hears so (none waits)
        g.load(a["model"], "fp32")
        out["unnamed_error"] = None
    except WorkerGroupError as e:
        out["unnamed_error"] = str(e)
    out["unnamed_s"] = time.monotonic() - t0
    try:
        g.load(a["model"], "fp32", names={a["model"]: "diffusion_models/other.safetensors"})
        out["mismatch_error"] = None
    except WorkerGroupError as e:
        out["mismatch_error"] = str(e)
    out["after_mismatch"] = _forward_diffs(g, {**a, "name": "diffusion_models/tiny.safetensors"}, ref)
    pid = g.remote_pids[3]
    out.update(_fault_forward(g, (x, t, c), 3, lambda: os.kill(pid, 9)))
    return out


def queue(a: dict) -> dict:
    import comfy_host
    base = comfy_host.make_base_dir(os.path.join(a["out"], "comfy"), {"diffusion_models": [a["model"]]})
    api = comfy_host.load_workflow("wan21_t2v_two_nodes_parallel_api.json")
    name = os.path.basename(a["model"])
    out = {}
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        ui = comfy_host.load_workflow("wan21_t2v_two_nodes_parallel.json")
        out["ui_equals_api"] = comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"],
                                                                      "inputs": v["inputs"]} for k, v in api.items()}
        auto = {d: 0 for d in ("cfg", "ulysses", "ring", "tp", "dp")}
        pack = comfy_host.tiny_cpu_variant(api, name, world_size=4, degrees=auto, seed=5, prefix="latents/two_nodes")
        shipped = next(v["inputs"] for v in api.values() if v["class_type"] == "ParallelConfig")
        config = next(v["inputs"] for v in pack.values() if v["class_type"] == "ParallelConfig")
        out["shipped_config"] = {k: shipped[k] for k in ("nodes", "ranks_per_node", "world_size")}
        config.update(ranks_per_node=2, rendezvous=a["rendezvous"], secret_file=a["secret"])
        native = comfy_host.native_variant(comfy_host.tiny_cpu_variant(api, name, world_size=4, degrees=auto, seed=5,
                                                                       prefix="x"), prefix="latents/two_nodes_native")
        latents = {}
        for label, graph in (("pack", pack), ("native", native)):
            h = server.wait(server.queue(graph), timeout=240)
            if h["status"]["status_str"] != "success":
                raise RuntimeError(f"{label}: {h['status']}\n{server.log_tail()}")
            prefix = next(v["inputs"]["filename_prefix"] for v in graph.values() if v["class_type"] == "SaveLatent")
            latents[label], _ = comfy_host.saved_latent(base, prefix)
        out["log"] = open(server.log_path).read()[-6000:]
    # ComfyUI stopped (SIGTERM): its worker group's shared memory is gone with it
    out["server_segments_left"] = leftover_segments(server.proc.pid)
    out["diff"] = (latents["pack"] - latents["native"]).abs().max().item()
    out["mean_abs"] = latents["pack"].abs().mean().item()
    return out


def _children() -> list:
    """This process's children but multiprocessing's resource tracker (it lives as long as this process)."""
    r = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
    out = []
    for pid in map(int, r.stdout.split()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"resource_tracker" in f.read():
                    continue
        except OSError:
            continue
        out.append(pid)
    return out


def refused(a: dict) -> dict:
    t0 = time.monotonic()
    try:
        WorkerGroup(_config(a, {"ulysses": 2, "ring": 2})).start().stop()
        return {"error": None}
    except WorkerGroupError as e:
        return {"error": str(e), "wait_s": time.monotonic() - t0,
                "children_alive": [p for p in _children() if _alive(p)]}


def nodes(a: dict) -> dict:
    import comfy_host
    folder_paths = comfy_host.import_comfy()
    folder_paths.add_model_folder_path("diffusion_models", os.path.join(a["models"], "diffusion_models"))
    folder_paths.add_model_folder_path("loras", os.path.join(a["models"], "loras"))
    pack = comfy_host.import_pack()
    import comfy.sd

    import nodes as comfy_nodes
    g = torch.Generator().manual_seed(11)
    pos = [[torch.randn(1, 12, 4096, generator=g), {}]]
    neg = [[torch.randn(1, 12, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}

    def sample(model, cfg):
        return comfy_nodes.common_ksampler(model, 3, 3, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(
        4, 0, 0, 0, 0, 0, "fp32", "cpu", "sdpa", nodes=2, ranks_per_node=2, rendezvous=a["rendezvous"],
        secret_file=a["secret"], rejoin_timeout=a["rejoin"])[0]
    parallel, plan = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny.safetensors", "fp32", spec)
    native = comfy.sd.load_diffusion_model(os.path.join(a["models"], "diffusion_models", "tiny.safetensors"))
    out = {"plan": plan, "diffs": {}}
    for cfg in (4.0, 1.0):
        out["diffs"][f"KSampler cfg {cfg}"] = (sample(parallel, cfg) - sample(native, cfg)).abs().max().item()
    lora = "lora.safetensors"
    native_lora = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(native, lora, 0.8)[0]
    want = sample(native_lora, 1.0)
    with_lora = pack.NODE_CLASS_MAPPINGS["ParallelLora"]().apply(parallel, lora, 0.8)[0]
    out["diffs"]["Parallel LoRA (node 1's copy)"] = (sample(with_lora, 1.0) - want).abs().max().item()
    shipped = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(parallel, lora, 0.8)[0]
    out["diffs"]["native LoraLoaderModelOnly (shipped)"] = (sample(shipped, 1.0) - want).abs().max().item()
    out["lora_moves"] = (want - sample(native, 1.0)).abs().max().item()
    import parallel_backend.runtime.group as group
    out["folds"] = [st["fold_per_forward"][-1] for st in group.active_groups()[0].stats()]
    # a declared latent: auto mode weighs the meshes on the links the group measured (across nodes too) and restarts
    # the group where another is predicted faster (node 1 rejoins it)
    declared = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(
        4, 0, 0, 0, 0, 0, "fp32", "cpu", "sdpa", latent=latent, nodes=2, ranks_per_node=2,
        rendezvous=a["rendezvous"], secret_file=a["secret"], rejoin_timeout=a["rejoin"])[0]
    placed, out["auto_plan"] = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny.safetensors", "fp32",
                                                                                        declared)
    out["diffs"]["auto placement (declared latent), cfg 4.0"] = (sample(placed, 4.0) - sample(native, 4.0)).abs().max(
    ).item()
    group.stop_all()
    return out


if __name__ == "__main__":
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        result = {"parity": parity, "kill": kill, "refused": refused, "nodes": nodes,
                  "rank_kill": rank_kill, "queue": queue}[scenario](args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    with open(os.path.join(args["out"], "result.json"), "w") as f:
        json.dump(result, f, indent=1)
