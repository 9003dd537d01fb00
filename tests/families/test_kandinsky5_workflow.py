"""The shipped Kandinsky 5 workflow through a real headless ComfyUI queue, on 2 CPU ranks (ulysses2), equal to the same
graph with ComfyUI's native Load Diffusion Model (same seed, conditioning, latent): only the loader differs.

ComfyUI's own loader detects a tiny Kandinsky 5 file fully, so the oracle is the native UNETLoader. The graph is the
shipped one (Kandinsky5ImageToVideo's latent and conditioning, ModelSamplingSD3, the native KSampler at cfg 5: cond
and uncond in one call, split over the cfg-less mesh's ranks by sequence) with the text encoders replaced by the test
conditioning node (Qwen-wide text plus CLIP-L's pooled vector) and the VAE by the test VAE (HunyuanVideo's latent
shape). An 80 x 48 x 5 video: a 2 x 6 x 10 latent, 15 tokens a frame, ragged on 2 ranks. Its VAE Decode is fed by
the Parallel VAE Loader as shipped (a tiny HunyuanVideo 1.0 VAE of ComfyUI's class, built at the file's width in the
server and its ranks: tests/comfy_site): the frames equal Load VAE + VAE Decode (Tiled) at that node's default widgets.
On a ComfyUI without the class (0.3.75) the loader refuses the file by class name.
"""
import pytest

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_hunyuan_video_vae, write_tiny_kandinsky5

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_kandinsky5.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps, cfg 5)


def _run(server, graph):
    return server.wait(server.queue(graph), timeout=300)


def _tiny(shipped: dict) -> dict:
    graph = comfy_host.tiny_cpu_variant(shipped, MODEL, seed=3, prefix="latents/k5_parallel")
    for node in graph.values():
        if node["class_type"] == "PditTestConditioning":  # Qwen2.5-VL hidden states + CLIP-L pooled
            node["inputs"].update(width=3584, pooled_width=768)
        elif node["class_type"] == "Kandinsky5ImageToVideo":
            node["inputs"].update(width=80, height=48, length=5)
    graph["6"] = {"class_type": "PditTestVAE", "inputs": {"seed": 1, "kind": "wan2.1"}}  # HunyuanVideo VAE's shapes
    return graph


def test_kandinsky5_workflow_through_prompt_queue(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    comfy_host.import_comfy()
    vae = write_tiny_hunyuan_video_vae(str(d / "hunyuan_video_vae_bf16.safetensors"), version="1.0")  # shipped name
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"),
                                    {"diffusion_models": [write_tiny_kandinsky5(str(d / MODEL), seed=41)],
                                     "vae": [vae]})
    shipped = comfy_host.load_workflow("kandinsky5_t2v_parallel_api.json")
    ui = comfy_host.load_workflow("kandinsky5_t2v_parallel.json")
    with comfy_host.ComfyServer(base, env=comfy_host.tiny_vae_env()) as server:  # the 1.0 VAE at the tiny width
        info = server.get("/object_info")
        graph = _tiny(shipped)
        if "Kandinsky5ImageToVideo" not in info:  # 0.3.75: no Kandinsky 5 at all
            graph["7"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 80, "height": 48,
                                                                             "length": 5, "batch_size": 1}}
            graph["9"]["inputs"].update(positive=["2", 0], negative=["3", 0], latent_image=["7", 0])
            h = _run(server, graph)
            assert h["status"]["status_str"] == "error"
            assert "this ComfyUI has no Kandinsky5 model class" in str(h["status"]), h["status"]
            return
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in shipped.items()}
        graph = comfy_host.keep_vae_nodes(shipped, graph, "latents/k5_parallel")  # VAE Decode on the pack's VAE
        h = _run(server, graph)
        assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
        native = comfy_host.native_vae_nodes(comfy_host.native_variant(graph, prefix="latents/k5_native"))
        native["90"]["inputs"]["filename_prefix"] = "latents/k5_native_frames"
        h = _run(server, native)
        assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
        out = comfy_host.saved_latent(base, "latents/k5_parallel")[0]
        ref = comfy_host.saved_latent(base, "latents/k5_native")[0]
        log = open(server.log_path).read()
        frames = comfy_host.frames_diff(base, "latents/k5_parallel", "latents/k5_native", (5, 48, 80, 3), TOL)
    assert out.shape == ref.shape == (1, 16, 2, 6, 10)
    assert out.abs().mean() > 0.1
    diff = (out - ref).abs().max().item()
    print(f"Kandinsky 5 queue, 2 CPU ranks (ulysses2) vs native UNETLoader + KSampler: {diff:.2e}; its Parallel VAE "
          f"decode vs Load VAE + VAE Decode (Tiled): {frames:.2e}")
    assert diff <= TOL, f"Kandinsky 5 parallel vs native: {diff:.2e}"
    assert "as Kandinsky5 on" in log, log[-3000:]
