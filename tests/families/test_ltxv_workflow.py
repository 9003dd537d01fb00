"""The shipped LTX-Video workflow through a real headless ComfyUI queue, on 2 CPU ranks (ulysses2).

ComfyUI's native Load Diffusion Model loads a tiny LTXV file as it loads the release (its detection reads any width),
so the oracle is the same graph with the pack's loader and sampler swapped for UNETLoader and KSampler, in the same
server (same seed, conditioning with a padded text mask and LTXVConditioning's frame rate, latent). The latent is EmptyLTXVLatentVideo's
(1, 128, 3, 5, 3): 45 tokens, ragged on 2 ranks.
"""
import pytest

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_ltxv

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_ltxv.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps, cfg 3)


def _run(server, base, graph, prefix):
    h = server.wait(server.queue(graph), timeout=240)
    assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
    return comfy_host.saved_latent(base, prefix)[0]


def test_ltxv_workflow_through_prompt_queue(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"),
                                    {"diffusion_models": [write_tiny_ltxv(str(d / MODEL), seed=41)]})
    shipped = comfy_host.load_workflow("ltxv_t2v_parallel_api.json")
    ui = comfy_host.load_workflow("ltxv_t2v_parallel.json")
    assert {n["class_type"] for n in shipped.values()} >= {"CLIPLoader", "LTXVConditioning", "EmptyLTXVLatentVideo",
                                                           "ParallelConfig", "ParallelModelLoader",
                                                           "ParallelSampler", "VAEDecode"}
    assert next(n for n in shipped.values() if n["class_type"] == "CLIPLoader")["inputs"]["type"] == "ltxv"
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in shipped.items()}
        graph = comfy_host.tiny_cpu_variant(shipped, MODEL, seed=3, width=96, height=160, length=17,
                                            prefix="latents/ltxv")
        for node in graph.values():  # LTXV's T5 gives an attention mask with the text (here: 3 padded tokens)
            if node["class_type"] == "PditTestConditioning":
                node["inputs"]["masked_tail"] = 3
        out = _run(server, base, graph, "latents/ltxv")
        ref = _run(server, base, comfy_host.native_variant(graph, prefix="latents/ltxv_native"),
                   "latents/ltxv_native")
        assert out.shape == ref.shape == (1, 128, 3, 5, 3)
        diff = (out - ref).abs().max().item()
        assert diff <= TOL, f"LTXV parallel vs native: {diff:.2e}"
        assert out.abs().mean() > 0.1
        assert "as LTXV on" in open(server.log_path).read()
        print(f"queue, 2 CPU ranks (ulysses2) vs ComfyUI's native LTXV + KSampler: {diff:.2e}")
