"""The shipped Cosmos 1.0 text-to-world workflow through a real headless ComfyUI queue, on 2 CPU ranks.

ComfyUI's native Load Diffusion Model cannot load a tiny Cosmos 1.0 file (its detection fixes depth and heads from
the width), so the oracle is ComfyUI's own CosmosVideo model built for the file by the test node
PditTestCosmos1Loader (tests/comfy_test_nodes: ComfyUI's detection plus the file's depth and heads), sampled by the
native KSampler in the same server, from the same graph (same seed, conditioning and latent): EmptyCosmosLatentVideo
of 17 frames at 80 x 48 (latent (1, 16, 3, 6, 10): 15 tokens per frame, ragged on ulysses 2). Its VAE Decode is fed by
the Parallel VAE Loader as shipped (a tiny Cosmos 1.0 tokenizer of ComfyUI's class, built at the file's width in the
server and its ranks: tests/comfy_site): the frames equal Load VAE + VAE Decode (Tiled) at that node's defaults.
"""
import pytest

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_cosmos1, write_tiny_cosmos1_vae

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
T2W = "tiny_cosmos1_t2w.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps)


def _native(graph, model_name, prefix):
    """The graph on ComfyUI's own model: Parallel Config / Loader -> PditTestCosmos1Loader, KSampler."""
    g = comfy_host.native_variant(graph, prefix=prefix)
    for node in g.values():
        if node["class_type"] == "UNETLoader":
            node["class_type"], node["inputs"] = "PditTestCosmos1Loader", {"unet_name": model_name}
    return g


def _run(server, base, graph, prefix):
    h = server.wait(server.queue(graph), timeout=240)
    assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
    return comfy_host.saved_latent(base, prefix)[0]


def test_cosmos1_workflow_through_prompt_queue(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    files = [write_tiny_cosmos1(str(d / T2W), seed=31)]
    comfy_host.import_comfy()
    vae = write_tiny_cosmos1_vae(str(d / "cosmos_cv8x8x8_1.0.safetensors"))  # the shipped name
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": files, "vae": [vae]})
    shipped = comfy_host.load_workflow("cosmos1_t2w_parallel_api.json")
    ui = comfy_host.load_workflow("cosmos1_t2w_parallel.json")
    assert {n["class_type"] for n in shipped.values()} >= {"CLIPLoader", "EmptyCosmosLatentVideo", "ParallelConfig",
                                                           "ParallelModelLoader", "ParallelSampler", "VAEDecode"}
    assert next(n for n in shipped.values() if n["class_type"] == "CLIPLoader")["inputs"]["type"] == "cosmos"
    assert next(n for n in shipped.values() if n["class_type"] == "ParallelVAELoader")["inputs"]["vae_name"] == (
        "cosmos_cv8x8x8_1.0.safetensors")
    with comfy_host.ComfyServer(base, env=comfy_host.tiny_vae_env()) as server:  # the tokenizer at the tiny width
        info = server.get("/object_info")
        # every node and input of the shipped graph exists in this ComfyUI (the UI file converts to the API file)
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in shipped.items()}
        graph = comfy_host.tiny_cpu_variant(shipped, T2W, seed=3, width=80, height=48, length=17, text_width=1024,
                                            prefix="latents/t2w")
        graph = comfy_host.keep_vae_nodes(shipped, graph, "latents/t2w")  # VAE Decode on the pack's VAE, as shipped
        out = _run(server, base, graph, "latents/t2w")
        native = comfy_host.native_vae_nodes(_native(graph, T2W, "latents/t2w_native"))
        native["90"]["inputs"]["filename_prefix"] = "latents/t2w_native_frames"
        ref = _run(server, base, native, "latents/t2w_native")
        frames = comfy_host.frames_diff(base, "latents/t2w", "latents/t2w_native", (17, 48, 80, 3), TOL)
        assert out.shape == ref.shape == (1, 16, 3, 6, 10)
        diff = (out - ref).abs().max().item()
        assert diff <= TOL, f"Cosmos 1.0 t2w parallel vs native: {diff:.2e}"
        assert out.abs().mean() > 0.1
        assert "as CosmosT2V on" in open(server.log_path).read()
        print(f"queue, 2 CPU ranks (ulysses2) vs ComfyUI's native Cosmos 1.0 + KSampler: t2w {diff:.2e}; its Parallel "
              f"VAE decode vs Load VAE + VAE Decode (Tiled): {frames:.2e}")
