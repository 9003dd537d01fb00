"""Wan 2.2 on the worker group and through a real headless ComfyUI.

- A14B: one group holds both experts (high- and low-noise files) resident, or swaps them; each
  expert's output on the group equals its single-process forward whatever the other one did.
- The shipped workflows wan22_a14b_t2v_parallel (two Parallel Model Loaders + two KSamplerAdvanced
  split at a boundary step) and wan22_ti2v_5b_parallel (Wan22ImageToVideoLatent with a start image:
  per-frame timesteps) are the same graphs in UI and API form, and queued over HTTP on 2 CPU ranks
  (ulysses2) equal ComfyUI's native graphs (two UNETLoaders / one UNETLoader) in the same server. The A14B
  experts are fp8_scaled files under the names ComfyUI's own Wan 2.2 template uses (the files most users
  download), with fp32 biases that ComfyUI rounds to fp8 on load. Both VAE Decodes are fed by the Parallel VAE
  Loader as shipped: the decoded frames equal Load VAE + VAE Decode (Tiled) at that node's default widgets (tiny Wan
  2.1 / 2.2 VAEs of ComfyUI's classes; the 2.2 one built at the file's width in the server and its ranks:
  tests/comfy_site).
"""
import os
import re

import pytest
import torch

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.group import WorkerGroup, WorkerGroupError
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.synthetic import write_tiny_wan, write_tiny_wan_vae

pytestmark = pytest.mark.multirank
TOL = 1e-5    # group vs single process, one forward (fp32)
E2E_TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps)
VAE_TOL = 1e-4  # those latents decoded (tiny Wan 2.1 / 2.2 VAEs): the Parallel VAE Loader vs Load VAE
HIGH, LOW, TI2V = "tiny_wan22_high_noise.safetensors", "tiny_wan22_low_noise.safetensors", "tiny_wan22_ti2v.safetensors"
# what the shipped A14B workflow (and ComfyUI's own Wan 2.2 14B template) names
HIGH_FP8, LOW_FP8 = ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                     "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan22")
    return {"high": write_tiny_wan(str(d / HIGH), seed=21), "low": write_tiny_wan(str(d / LOW), seed=22),
            "ti2v": write_tiny_wan(str(d / TI2V), seed=23, preset="tiny-ti2v")}


def _inputs(channels, seed, per_frame=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 3, 6, 10, generator=g)  # 45 tokens: ragged on 2 ranks
    t = torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]]) if per_frame else torch.tensor([700.0, 300.0])
    return x, t, torch.randn(2, 12, 4096, generator=g)


def test_group_holds_two_experts_resident_or_swapped(files):
    refs = {}
    for name, path in files.items():
        m = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"),
                                          torch.device("cpu")), path, "fp32")
        x, t, ctx = _inputs(m.shape.in_channels, seed=len(refs), per_frame=name == "ti2v")
        refs[name] = ((x, t, ctx), m.forward_rows(x, t, ctx))
        del m
    g = WorkerGroup(ParallelConfig(world_size=2, ulysses=2, device="cpu", dtype="fp32")).start()
    key = {n: g.model_key_for(p, "fp32") for n, p in files.items()}

    def check(name):
        (x, t, ctx), ref = refs[name]
        diff = (g.forward(x, t, ctx, model_key=key[name]) - ref).abs().max().item()
        assert diff <= TOL, f"{name}: group vs single process {diff:.2e}"
        return diff

    def held():
        s = g.stats()
        return [r["models"] for r in s], [r["param_bytes_all"] for r in s]

    try:
        worst = 0.0
        g.load(files["high"], "fp32")                      # swap (default)
        worst = max(worst, check("high"))
        one_model = held()[1]
        g.load(files["low"], "fp32", resident=True)        # high was not resident: dropped
        assert held()[0] == [1, 1] and g.load_count == 2
        with pytest.raises(WorkerGroupError, match="not loaded"):
            g.forward(*refs["high"][0], model_key=key["high"])
        g.load(files["high"], "fp32", resident=True)       # low is resident: both stay
        counts, nbytes = held()
        assert counts == [2, 2] and nbytes == [2 * b for b in one_model] and g.load_count == 3
        for name in ("low", "high", "low", "high"):         # switching reads nothing and copies nothing
            g.load(files[name], "fp32", resident=True)
            worst = max(worst, check(name))
        assert g.load_count == 3
        # both marked swap: using one drops the other (no read), going back reads the file again
        g.load(files["high"], "fp32")
        g.load(files["low"], "fp32")
        assert held()[0] == [1, 1] and g.load_count == 3
        worst = max(worst, check("low"))
        g.load(files["high"], "fp32")
        assert held()[0] == [1, 1] and g.load_count == 4
        worst = max(worst, check("high"))
        # TI2V-5B on the same group: (B, frames) timesteps cross the shared memory as they are
        g.load(files["ti2v"], "fp32")
        worst = max(worst, check("ti2v"))
        print(f"experts on one group (ulysses2): worst diff vs single process {worst:.2e}; "
              f"param bytes per rank: one expert {one_model[0]}, both resident {nbytes[0]}")
    finally:
        g.stop()


# ---- through the real ComfyUI queue ---------------------------------------------------------------
def _loads(log: str) -> int:
    return len(re.findall(r"parallel_dit: loaded weights", log))


def _a14b_variant(api, residency, seed, prefix, steps=4, boundary=2, decode=False):
    """The shipped A14B graph made tiny (see comfy_host.tiny_cpu_variant), each loader on its expert: the
    files the graph names, written as tiny fp8_scaled experts. decode: its Parallel VAE Loader and VAE Decode kept
    (a tiny Wan 2.1 VAE under the shipped name), the frames saved as floats."""
    g = comfy_host.tiny_cpu_variant(api, HIGH_FP8, seed=seed, prefix=prefix)
    if decode:
        comfy_host.keep_vae_nodes(api, g, prefix)
    for nid, node in g.items():
        inp = node["inputs"]
        if node["class_type"] == "ParallelModelLoader":
            inp["residency"] = residency
            inp["model_name"] = api[nid]["inputs"]["model_name"]
        elif node["class_type"] == "KSamplerAdvanced":
            inp.update(steps=steps, sampler_name="euler", scheduler="simple", cfg=5.0)
            if inp["add_noise"] == "enable":
                inp.update(noise_seed=seed, end_at_step=boundary)
            else:
                inp.update(start_at_step=boundary)
    return g


def _ti2v_variant(api, image, seed, prefix):
    """The shipped TI2V graph made tiny, its VAE nodes kept (the tiny Wan 2.2 VAE file under the shipped name: Load VAE
    encodes the start image, the Parallel VAE Loader feeds VAE Decode), the decoded frames saved as floats beside the
    sampled latent."""
    g = {k: dict(v, inputs=dict(v["inputs"])) for k, v in api.items()}
    for nid, node in g.items():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = image
        elif node["class_type"] == "Wan22ImageToVideoLatent":
            node["inputs"].update(width=96, height=64, length=9)  # latent (1, 48, 3, 4, 6): 18 tokens
    return comfy_host.keep_vae_nodes(g, comfy_host.tiny_cpu_variant(g, TI2V, seed=seed, prefix=prefix), prefix)


def _run(server, base, graph, prefix):
    h = server.wait(server.queue(graph), timeout=240)
    assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
    return comfy_host.saved_latent(base, prefix)[0]


@pytest.mark.e2e
def test_wan22_workflows_through_prompt_queue(files, tmp_path):
    from PIL import Image

    from parallel_backend.testing.synthetic import write_fp8_variant

    experts = [write_fp8_variant(files[k], str(tmp_path / name), scaled=True) for k, name in (("high", HIGH_FP8),
                                                                                             ("low", LOW_FP8))]
    comfy_host.import_comfy()
    vaes = [write_tiny_wan_vae(str(tmp_path / "wan2.2_vae.safetensors"), version="2.2"),  # the names the graphs load
            write_tiny_wan_vae(str(tmp_path / "wan_2.1_vae.safetensors"))]
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": list(files.values()) + experts,
                                                              "vae": vaes})
    ramp = torch.linspace(0, 255, 64 * 96).reshape(64, 96, 1).expand(64, 96, 3).to(torch.uint8).contiguous().numpy()
    Image.fromarray(ramp).save(os.path.join(base, "input", "start.png"))
    a14b = comfy_host.load_workflow("wan22_a14b_t2v_parallel_api.json")
    ti2v = comfy_host.load_workflow("wan22_ti2v_5b_parallel_api.json")
    with comfy_host.ComfyServer(base, env=comfy_host.tiny_vae_env()) as server:
        info = server.get("/object_info")
        assert info["ParallelModelLoader"]["input"]["optional"]["residency"][1]["tooltip"]
        for name, api in (("wan22_a14b_t2v_parallel", a14b), ("wan22_ti2v_5b_parallel", ti2v)):
            ui = comfy_host.load_workflow(f"{name}.json")
            assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                      for k, v in api.items()}, name
        log = lambda: open(server.log_path).read()

        # A14B, both experts resident: two loads, then none for a new seed
        n0 = _loads(log())
        res3 = _run(server, base, _a14b_variant(a14b, "resident", 3, "latents/res3", decode=True), "latents/res3")
        assert _loads(log()) - n0 == 2, log()[-4000:]
        native3 = _run(server, base, comfy_host.native_vae_nodes(comfy_host.native_variant(
            _a14b_variant(a14b, "resident", 3, "latents/native3", decode=True), prefix="latents/native3")),
            "latents/native3")
        assert res3.shape == native3.shape == (1, 16, 2, 8, 8)
        d_res = (res3 - native3).abs().max().item()
        assert d_res <= E2E_TOL, f"A14B resident vs native two-UNETLoader graph: {d_res:.2e}"
        d_a14b_frames = comfy_host.frames_diff(base, "latents/res3", "latents/native3", (5, 64, 64, 3), VAE_TOL)
        n1 = _loads(log())
        res4 = _run(server, base, _a14b_variant(a14b, "resident", 4, "latents/res4"), "latents/res4")
        assert _loads(log()) == n1, "resident experts were read again"
        assert not torch.equal(res4, res3)

        # the same graph with swap: the experts are read again on each switch (2 loads per prompt once
        # the previously resident pair is gone), and the latent is the resident one
        _run(server, base, _a14b_variant(a14b, "swap", 3, "latents/swap3"), "latents/swap3")
        n2 = _loads(log())
        swap4 = _run(server, base, _a14b_variant(a14b, "swap", 4, "latents/swap4"), "latents/swap4")
        assert _loads(log()) - n2 == 2, log()[-4000:]
        d_swap = (swap4 - res4).abs().max().item()
        assert d_swap <= TOL, f"A14B swap vs resident: {d_swap:.2e}"

        # TI2V-5B with a start image: per-frame timesteps through the proxy and the ranks; its VAE Decode on the
        # DiT's ranks (Parallel VAE Loader) against Load VAE + VAE Decode (Tiled) at that node's default widgets
        out = _run(server, base, _ti2v_variant(ti2v, "start.png", 5, "latents/ti2v"), "latents/ti2v")
        native = comfy_host.native_vae_nodes(comfy_host.native_variant(
            _ti2v_variant(ti2v, "start.png", 5, "latents/ti2v_native"), prefix="latents/ti2v_native"))
        ref = _run(server, base, native, "latents/ti2v_native")
        assert out.shape == ref.shape == (1, 48, 3, 4, 6)
        d_ti2v = (out - ref).abs().max().item()
        assert d_ti2v <= E2E_TOL, f"TI2V-5B parallel vs native: {d_ti2v:.2e}"
        assert out.abs().mean() > 0.1
        d_frames = comfy_host.frames_diff(base, "latents/ti2v", "latents/ti2v_native", (9, 64, 96, 3), VAE_TOL)
        print(f"queue, 2 CPU ranks (ulysses2): A14B fp8_scaled resident vs native {d_res:.2e}, its decoded frames "
              f"{d_a14b_frames:.2e}, swap vs resident {d_swap:.2e}; TI2V-5B vs native {d_ti2v:.2e}, its decoded "
              f"frames {d_frames:.2e}")
