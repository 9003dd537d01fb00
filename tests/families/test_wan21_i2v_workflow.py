"""Wan 2.1 I2V: the shipped workflow (CLIP vision + WanImageToVideo) through a real headless ComfyUI, on
2 CPU ranks, equals the native Load Diffusion Model + KSampler run of the same graph."""
import os

import pytest
import torch

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_wan

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_wan21_i2v.safetensors"
E2E_TOL = 1e-4


def _i2v_variant(api, image, seed, prefix):
    """Test stand-ins for the CLIP vision encoder and the VAE; the image, WanImageToVideo and the pack's
    nodes run as shipped."""
    g = {k: dict(v, inputs=dict(v["inputs"])) for k, v in api.items()}
    for nid, node in list(g.items()):
        ct = node["class_type"]
        if ct == "VAELoader":
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "wan2.1"}}
        elif ct == "CLIPVisionLoader":
            del g[nid]
        elif ct == "CLIPVisionEncode":
            g[nid] = {"class_type": "PditTestClipVision", "inputs": {"seed": 8}}
        elif ct == "LoadImage":
            node["inputs"]["image"] = image
        elif ct == "WanImageToVideo":
            node["inputs"].update(width=64, height=64, length=5)  # latent (1, 16, 2, 8, 8)
    return comfy_host.tiny_cpu_variant(g, MODEL, seed=seed, prefix=prefix, degrees={"tp": 2})


def test_wan21_i2v_workflow_through_prompt_queue(tmp_path):
    from PIL import Image
    ckpt = write_tiny_wan(str(tmp_path / MODEL), seed=12, preset="tiny-i2v")
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [ckpt]})
    ramp = torch.linspace(0, 255, 64 * 64).reshape(64, 64, 1).expand(64, 64, 3).to(torch.uint8).contiguous().numpy()
    Image.fromarray(ramp).save(os.path.join(base, "input", "start.png"))
    api = comfy_host.load_workflow("wan21_i2v_parallel_api.json")
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        ui = comfy_host.load_workflow("wan21_i2v_parallel.json")
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in api.items()}
        graph = _i2v_variant(api, "start.png", 3, "latents/i2v")
        h = server.wait(server.queue(graph), timeout=240)
        assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
        out, _ = comfy_host.saved_latent(base, "latents/i2v")
        h = server.wait(server.queue(comfy_host.native_variant(graph, prefix="latents/i2v_native")), timeout=240)
        assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
        ref, _ = comfy_host.saved_latent(base, "latents/i2v_native")
    assert out.shape == ref.shape == (1, 16, 2, 8, 8)
    diff = (out - ref).abs().max().item()
    print(f"Wan 2.1 I2V through the queue (tp2) vs native: {diff:.2e}")
    assert diff <= E2E_TOL and out.abs().mean() > 0.1
