"""The shipped Cosmos Predict2 workflow through a real headless ComfyUI queue, on 2 CPU ranks.

ComfyUI's native Load Diffusion Model cannot load a tiny Predict2 (its detection fixes depth and heads from the
width), so the oracle is ComfyUI's own CosmosPredict2 model built for the file by the test node
PditTestCosmosPredict2Loader (tests/comfy_test_nodes: ComfyUI's detection plus the file's depth and heads),
sampled by the native KSampler in the same server, from the same graph (same seed, conditioning and latent).

- text-to-image: the shipped graph (EmptySD3LatentImage: a 4-D latent ComfyUI gives a frame axis), 15 latent
  tokens (ragged on ulysses 2), its VAE Decode fed by the Parallel VAE Loader (ComfyUI's Wan 2.1 VAE class, a tiny
  file) against Load VAE + VAE Decode (Tiled) at that node's default widgets;
- video-to-world: the same graph on a Video2World file with CosmosPredict2ImageToVideoLatent and a start
  image (fake Wan 2.1-shaped VAE encoder): 17 input channels (ComfyUI's mask concat through the MODEL the
  pack builds from the family's ComfyUI model class) and one timestep per latent frame.
"""
import os

import pytest
import torch

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_cosmos, write_tiny_wan_vae

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
T2I, V2W = "tiny_cosmos_predict2_t2i.safetensors", "tiny_cosmos_predict2_v2w.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps)


def _native(graph, model_name, prefix):
    """The graph on ComfyUI's own model: Parallel Config / Loader -> PditTestCosmosPredict2Loader, KSampler."""
    g = comfy_host.native_variant(graph, prefix=prefix)
    for node in g.values():
        if node["class_type"] == "UNETLoader":
            node["class_type"], node["inputs"] = "PditTestCosmosPredict2Loader", {"unet_name": model_name}
    return g


def _v2w(api, seed, prefix):
    g = {k: dict(v, inputs=dict(v["inputs"])) for k, v in api.items()}
    vae = next(k for k, v in g.items() if v["class_type"] in ("VAELoader", "ParallelVAELoader"))
    g[vae] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "wan2.1"}}
    g["90"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    for node in g.values():
        if node["class_type"] == "EmptySD3LatentImage":  # latent (1, 16, 3, 6, 10): 45 tokens, frame 0 clean
            node["class_type"] = "CosmosPredict2ImageToVideoLatent"
            node["inputs"] = {"vae": [vae, 0], "width": 80, "height": 48, "length": 9, "batch_size": 1,
                              "start_image": ["90", 0]}
    return comfy_host.tiny_cpu_variant(g, V2W, seed=seed, prefix=prefix, text_width=1024)


def _run(server, base, graph, prefix):
    h = server.wait(server.queue(graph), timeout=240)
    assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
    return comfy_host.saved_latent(base, prefix)[0]


def test_cosmos_predict2_workflow_through_prompt_queue(tmp_path):
    from PIL import Image

    d = tmp_path / "models"
    d.mkdir()
    files = [write_tiny_cosmos(str(d / T2I), seed=31), write_tiny_cosmos(str(d / V2W), seed=32, preset="tiny-v2w")]
    comfy_host.import_comfy()
    vae = write_tiny_wan_vae(str(d / "wan_2.1_vae.safetensors"))  # the name the shipped graph loads
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": files, "vae": [vae]})
    ramp = torch.linspace(0, 255, 48 * 80).reshape(48, 80, 1).expand(48, 80, 3).to(torch.uint8).contiguous().numpy()
    Image.fromarray(ramp).save(os.path.join(base, "input", "start.png"))
    shipped = comfy_host.load_workflow("cosmos_predict2_t2i_parallel_api.json")
    ui = comfy_host.load_workflow("cosmos_predict2_t2i_parallel.json")
    assert {n["class_type"] for n in shipped.values()} >= {"CLIPLoader", "EmptySD3LatentImage", "ParallelConfig",
                                                           "ParallelModelLoader", "ParallelSampler", "VAEDecode",
                                                           "SaveImage"}
    assert next(n for n in shipped.values() if n["class_type"] == "CLIPLoader")["inputs"]["type"] == "cosmos"
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in shipped.items()}

        # text-to-image: latent (1, 16, 1, 6, 10) after ComfyUI adds the frame axis
        # its VAE Decode on the Parallel VAE Loader as shipped vs Load VAE + VAE Decode (Tiled) (tiny Wan 2.1 VAE)
        def t2i(prefix):
            return comfy_host.keep_vae_nodes(shipped, comfy_host.tiny_cpu_variant(
                shipped, T2I, seed=3, width=80, height=48, text_width=1024, prefix=prefix), prefix)
        out = _run(server, base, t2i("latents/t2i"), "latents/t2i")
        native = comfy_host.native_vae_nodes(_native(t2i("latents/t2i_native"), T2I, "latents/t2i_native"))
        ref = _run(server, base, native, "latents/t2i_native")
        assert out.shape == ref.shape == (1, 16, 1, 6, 10)
        d_t2i = (out - ref).abs().max().item()
        assert d_t2i <= TOL, f"Cosmos Predict2 t2i parallel vs native: {d_t2i:.2e}"
        d_frames = comfy_host.frames_diff(base, "latents/t2i", "latents/t2i_native", (1, 48, 80, 3), TOL)
        assert out.abs().mean() > 0.1
        log = open(server.log_path).read()
        assert "as CosmosT2IPredict2 on" in log, log[-3000:]

        # video-to-world with a start image
        out = _run(server, base, _v2w(shipped, 5, "latents/v2w"), "latents/v2w")
        ref = _run(server, base, _native(_v2w(shipped, 5, "latents/v2w"), V2W, "latents/v2w_native"),
                   "latents/v2w_native")
        assert out.shape == ref.shape == (1, 16, 3, 6, 10)
        d_v2w = (out - ref).abs().max().item()
        assert d_v2w <= TOL, f"Cosmos Predict2 video-to-world parallel vs native: {d_v2w:.2e}"
        assert "as CosmosI2VPredict2 on" in open(server.log_path).read()
        print(f"queue, 2 CPU ranks (ulysses2) vs ComfyUI's native Predict2 + KSampler: t2i {d_t2i:.2e} (its "
              f"Parallel VAE decode {d_frames:.2e}), video-to-world {d_v2w:.2e}")
