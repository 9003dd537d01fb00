"""The shipped GGUF workflow (Wan 2.1 T2V Q8_0, Parallel Config weights 'sharded', ComfyUI's native KSampler)
through a real headless ComfyUI on 2 CPU ranks (ulysses 2 x sharded weights): the UI file converts to the API file,
and the latent equals the same graph on ComfyUI's native Load Diffusion Model with the GGUF's weights dequantized
(ComfyUI 0.3.75 has no GGUF loader of its own)."""
import pytest

import comfy_host
from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit
from parallel_backend.testing.synthetic import write_tiny_wan

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "wan2.1-t2v-14b-Q8_0.gguf"  # the name the shipped graph loads (a tiny Wan here)
DEQUANT = "wan2.1-t2v-tiny-Q8_0-dequantized.safetensors"
E2E_TOL = 1e-4


def test_wan21_gguf_sharded_workflow_through_prompt_queue(tmp_path):
    src = write_tiny_wan(str(tmp_path / "tiny.safetensors"), seed=17)
    gguf_path = str(tmp_path / MODEL)
    write_gguf_dit(src, gguf_path, "Q8_0")
    deq = write_dequantized_safetensors(gguf_path, str(tmp_path / DEQUANT))
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [gguf_path, deq]})
    api = comfy_host.load_workflow("wan21_t2v_gguf_sharded_parallel_api.json")
    config = next(v for v in api.values() if v["class_type"] == "ParallelConfig")
    assert config["inputs"]["weights"] == "sharded"
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        names = info["ParallelModelLoader"]["input"]["required"]["model_name"]
        assert MODEL in (names[1]["options"] if names[0] == "COMBO" else names[0])  # listed beside the safetensors
        ui = comfy_host.load_workflow("wan21_t2v_gguf_sharded_parallel.json")
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in api.items()}
        pack = comfy_host.tiny_cpu_variant(api, MODEL, seed=5, prefix="latents/gguf", degrees={"ulysses": 2})
        native = comfy_host.native_variant(comfy_host.tiny_cpu_variant(api, MODEL, seed=5, prefix="x"),
                                           prefix="latents/gguf_native")
        for node in native.values():
            if node["class_type"] == "UNETLoader":
                node["inputs"]["unet_name"] = DEQUANT
        results = {}
        for name, graph in (("pack", pack), ("native", native)):
            h = server.wait(server.queue(graph), timeout=240)
            assert h["status"]["status_str"] == "success", (name, h["status"], server.log_tail())
            prefix = next(v["inputs"]["filename_prefix"] for v in graph.values() if v["class_type"] == "SaveLatent")
            results[name], _ = comfy_host.saved_latent(base, prefix)
        log = open(server.log_path).read()
    assert "sharded weights" in log and "GGUF Q8_0: 20 linears kept quantized" in log, log[-3000:]
    diff = (results["pack"] - results["native"]).abs().max().item()
    print(f"\nGGUF Q8_0 workflow, sharded weights x ulysses2 vs native on the dequantized weights: {diff:.2e}")
    assert results["pack"].abs().mean() > 0.05 and diff <= E2E_TOL
