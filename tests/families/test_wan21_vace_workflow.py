"""Wan 2.1 VACE: the shipped workflow (reference image through WanVaceToVideo, ComfyUI's native KSampler,
TrimVideoLatent) through a real headless ComfyUI on 2 CPU ranks (ulysses 2), equals the native Load Diffusion Model
run of the same graph; the UI file converts to the API file; the hints reach the ranks (the same graph without the
reference differs)."""
import os

import pytest
import torch

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_wan

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_wan21_vace.safetensors"
E2E_TOL = 1e-4


def _vace_variant(api, image, seed, prefix, reference=True):
    """A test stand-in for the VAE (the text encoder is swapped by tiny_cpu_variant); the image, WanVaceToVideo,
    KSampler, TrimVideoLatent and the pack's nodes run as shipped, at 64 x 64 x 5 frames."""
    g = {k: dict(v, inputs=dict(v["inputs"])) for k, v in api.items()}
    for nid, node in list(g.items()):
        ct = node["class_type"]
        if ct == "VAELoader":
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "wan2.1"}}
        elif ct == "LoadImage":
            node["inputs"]["image"] = image
        elif ct == "WanVaceToVideo":
            node["inputs"].update(width=64, height=64, length=5, strength=0.8)
            if not reference:
                del node["inputs"]["reference_image"]
    g = comfy_host.tiny_cpu_variant(g, MODEL, seed=seed, prefix=prefix, degrees={"ulysses": 2})
    for node in g.values():  # tiny_cpu_variant saves the sampler's latent: save the trimmed one instead
        if node["class_type"] == "SaveLatent":
            node["inputs"]["samples"] = [next(k for k, v in g.items() if v["class_type"] == "TrimVideoLatent"), 0]
    return g


def test_wan21_vace_workflow_through_prompt_queue(tmp_path):
    from PIL import Image
    ckpt = write_tiny_wan(str(tmp_path / MODEL), seed=13, preset="tiny-vace")
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [ckpt]})
    ramp = torch.linspace(0, 255, 64 * 64).reshape(64, 64, 1).expand(64, 64, 3).to(torch.uint8).contiguous().numpy()
    Image.fromarray(ramp).save(os.path.join(base, "input", "reference.png"))
    api = comfy_host.load_workflow("wan21_vace_parallel_api.json")
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        ui = comfy_host.load_workflow("wan21_vace_parallel.json")
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in api.items()}
        results = {}
        for name, graph in (("pack", _vace_variant(api, "reference.png", 3, "latents/vace")),
                            ("native", comfy_host.native_variant(_vace_variant(api, "reference.png", 3, "x"),
                                                                 prefix="latents/vace_native")),
                            ("pack_noref", _vace_variant(api, "reference.png", 3, "latents/vace_noref",
                                                         reference=False))):
            h = server.wait(server.queue(graph), timeout=240)
            assert h["status"]["status_str"] == "success", (name, h["status"], server.log_tail())
            prefix = next(v["inputs"]["filename_prefix"] for v in graph.values() if v["class_type"] == "SaveLatent")
            results[name], _ = comfy_host.saved_latent(base, prefix)
    out, ref = results["pack"], results["native"]
    assert out.shape == ref.shape == (1, 16, 2, 8, 8)  # the reference frame was trimmed off
    diff = (out - ref).abs().max().item()
    print(f"Wan 2.1 VACE through the queue (ulysses2, native KSampler) vs native: {diff:.2e}")
    assert diff <= E2E_TOL and out.abs().mean() > 0.1
    assert (results["pack_noref"] - out).abs().max() > 1e-2  # the reference changes the video
