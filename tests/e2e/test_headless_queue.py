"""End to end through a real headless ComfyUI: the shipped workflow, queued over HTTP, sampled by
the pack on 2 CPU ranks, equals the native Load Diffusion Model + KSampler run in the same server."""
import re
import time

import psutil
import pytest
import torch

import comfy_host
from parallel_backend.runtime.transport import leftover_segments
from parallel_backend.testing.synthetic import write_tiny_wan

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_wan_e2e.safetensors"


def _worker_pids(server):
    return sorted(c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)
                  if "multiprocessing" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline()))


def test_shipped_workflow_through_prompt_queue(tmp_path):
    ckpt = write_tiny_wan(str(tmp_path / MODEL), seed=5)
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [ckpt]})
    shipped = comfy_host.load_workflow("wan21_t2v_parallel_api.json")
    ui = comfy_host.load_workflow("wan21_t2v_parallel.json")
    tmp = tmp_path / "tmp"  # the server's temporary folder: the group keeps its files there
    tmp.mkdir()
    with comfy_host.ComfyServer(base, env={"TMPDIR": str(tmp)}) as server:
        info = server.get("/object_info")
        for node in ("ParallelConfig", "ParallelModelLoader", "ParallelSampler", "ParallelUnload"):
            assert node in info, f"{node} not registered:\n{server.log_tail()}"
            for section in ("required", "optional"):
                for name, spec in info[node]["input"].get(section, {}).items():
                    assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
        # the UI-format file is the same graph as the API-format file, per the live node definitions
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in shipped.items()}

        graph = comfy_host.tiny_cpu_variant(shipped, MODEL, seed=3)
        h = server.wait(server.queue(graph), timeout=240)
        assert h["status"]["status_str"] == "success", h["status"]
        out, path = comfy_host.saved_latent(base, "latents/parallel")
        pids = _worker_pids(server)
        assert len(pids) == 2, pids

        h = server.wait(server.queue(comfy_host.native_variant(graph)), timeout=240)
        assert h["status"]["status_str"] == "success", h["status"]
        ref, _ = comfy_host.saved_latent(base, "latents/native")
        assert out.shape == ref.shape == (1, 16, 2, 8, 8)
        diff = (out - ref).abs().max().item()
        print(f"parallel (2 ranks, ulysses2) vs native KSampler: max abs diff {diff:.2e}")
        assert diff <= 1e-4, f"parallel vs native max abs diff {diff}"
        assert out.abs().mean() > 0.1  # a real latent, not zeros

        # warm reuse: a new seed starts no process and loads no weights
        graph2 = comfy_host.tiny_cpu_variant(shipped, MODEL, seed=4, prefix="latents/second")
        h = server.wait(server.queue(graph2), timeout=240)
        assert h["status"]["status_str"] == "success", h["status"]
        assert _worker_pids(server) == pids
        log = open(server.log_path).read()
        assert len(re.findall(r"parallel_dit: loaded weights", log)) == 1, log[-3000:]
        assert "parallel_dit: reusing warm group" in log
        second, _ = comfy_host.saved_latent(base, "latents/second")
        assert not torch.equal(second, out)

        # Cancel over the API mid-run: the prompt stops, the group survives, the next prompt succeeds
        long_run = comfy_host.tiny_cpu_variant(shipped, MODEL, seed=9, steps=2000, prefix="latents/cancelled")
        pid = server.queue(long_run)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not server.get("/queue", timeout=30)["queue_running"]:
            time.sleep(0.2)
        time.sleep(3)  # let it take some steps
        t_cancel = time.monotonic()
        server.post("/interrupt", {})
        h = server.wait(pid, timeout=60)
        stopped_after = time.monotonic() - t_cancel
        msgs = [m[0] for m in h["status"].get("messages", [])]
        assert "execution_interrupted" in msgs, h["status"]
        print(f"cancel over /interrupt: prompt ended {stopped_after:.2f} s after the request")
        h = server.wait(server.queue(comfy_host.tiny_cpu_variant(shipped, MODEL, seed=3, prefix="latents/after")),
                        timeout=240)
        assert h["status"]["status_str"] == "success", h["status"]
        assert _worker_pids(server) == pids
        after, _ = comfy_host.saved_latent(base, "latents/after")
        assert torch.equal(after, out)  # same seed as the first run: same latent from the same warm group
        server_pid = server.proc.pid
    # server stopped by its pid: its ranks exit (they watch their parent) and leave no shm behind
    for pid in pids:
        try:
            psutil.Process(pid).wait(timeout=15)
        except psutil.NoSuchProcess:
            pass
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert leftover_segments(server_pid) == []
    assert comfy_host.pack_temp_files(str(tmp)) == []  # the group's folder went with it
