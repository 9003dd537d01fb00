"""LoRAs on the pack's MODEL through a real headless ComfyUI (issue 26): a LoRA made for a 4-block model on a 2-block
model applies what matches and says what does not, as ComfyUI's own loader does ("lora key not loaded: ..." in the
log; Parallel LoRA's `lora_report` output counts them), and equals the native LoRA'd model; a LoRA of the wrong shape
is refused in the ComfyUI process, before any rank; a native loader's LoRA copy lives in the worker group's folder,
which goes with the group (Unload) and is written again for the next one; nothing is left in the server's temp
folder."""
import re
import time

import pytest

import comfy_host
from parallel_backend.runtime.transport import leftover_segments
from parallel_backend.testing.synthetic import write_tiny_wan, write_wan_lora

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_wan_lora_e2e.safetensors"
TOL = 1e-4


def _graph(lora_node: str, lora: str, seed: int, prefix: str, native: bool = False) -> dict:
    g = comfy_host.tiny_cpu_variant(comfy_host.load_workflow("wan21_t2v_parallel_api.json"), MODEL, seed=seed,
                                    steps=3, prefix=prefix, degrees={"ulysses": 2})
    g["7"]["inputs"]["cfg"] = 1.0  # cond only (the LoRA test's tolerance: see tests/nodes/test_lora_node.py)
    if native:
        g = comfy_host.native_variant(g, prefix=prefix)
    if lora_node == "ParallelLora":
        g["20"] = {"class_type": "ParallelLora", "inputs": {"model": ["5", 0], "lora_name": lora, "strength": 0.8}}
        g["21"] = {"class_type": "PreviewAny", "inputs": {"source": ["20", 1]}}
    else:
        g["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["5", 0], "lora_name": lora,
                                                                   "strength_model": 0.8}}
    g["7"]["inputs"]["model"] = ["20", 0]
    return g


def test_partial_and_wrong_loras_and_the_lora_copies(tmp_path):
    model = write_tiny_wan(str(tmp_path / MODEL), seed=5)
    bigger = write_tiny_wan(str(tmp_path / "four_blocks.safetensors"), seed=6, num_layers=4)
    wider = write_tiny_wan(str(tmp_path / "wider.safetensors"), seed=7, dim=1024, ffn_dim=2048)
    write_wan_lora(str(tmp_path / "for_four_blocks.safetensors"), bigger, rank=4, alpha=2.0, seed=21)
    write_wan_lora(str(tmp_path / "for_a_wider_model.safetensors"), wider, rank=4, alpha=2.0, seed=22)
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {
        "diffusion_models": [model],
        "loras": [str(tmp_path / "for_four_blocks.safetensors"), str(tmp_path / "for_a_wider_model.safetensors")]})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with comfy_host.ComfyServer(base, env={"TMPDIR": str(tmp)}) as server:
        results = {}
        for node in ("ParallelLora", "LoraLoaderModelOnly"):
            for native in (False, True):
                if native and node == "ParallelLora":
                    continue
                prefix = f"latents/{node}_{'native' if native else 'pack'}"
                h = server.wait(server.queue(_graph(node, "for_four_blocks.safetensors", 3, prefix, native)),
                                timeout=240)
                assert h["status"]["status_str"] == "success", h["status"]
                results[prefix], _ = comfy_host.saved_latent(base, prefix)
                if node == "ParallelLora":
                    report = h["outputs"]["21"]["text"][0]
        native_ref = results["latents/LoraLoaderModelOnly_native"]
        for prefix in ("latents/ParallelLora_pack", "latents/LoraLoaderModelOnly_pack"):
            diff = (results[prefix] - native_ref).abs().max().item()
            print(f"{prefix.split('/')[1]}: a 4-block LoRA on the 2-block model vs native LoraLoaderModelOnly: "
                  f"{diff:.2e}")
            assert diff <= TOL
        print(f"Parallel LoRA's lora_report: {report}")
        assert re.match(r"for_four_blocks\.safetensors at strength 0\.8: 60 of 120 LoRA tensors applied; 60 match no "
                        r"layer of tiny_wan_lora_e2e\.safetensors and were not loaded", report), report
        log = open(server.log_path).read()
        not_loaded = re.findall(r"lora key not loaded: (diffusion_model\.blocks\.(\d)\.\S+)", log)
        # ComfyUI's own loader (the native run) and the pack (twice: Parallel LoRA, LoraLoaderModelOnly) name them
        assert {b for _, b in not_loaded} == {"2", "3"} and len(not_loaded) == 3 * 60, len(not_loaded)

        # a LoRA of another width: refused in the ComfyUI process with the layer and the shapes, no rank traceback
        h = server.wait(server.queue(_graph("ParallelLora", "for_a_wider_model.safetensors", 3, "latents/wider")),
                        timeout=240)
        text = h["status"]["messages"][-1][1].get("exception_message", "")
        print(f"a LoRA for a wider model: {text}")
        assert h["status"]["status_str"] == "error"
        assert "which do not fit the model's" in text and "trained for another model" in text and "rank " not in text

        # the native loader's copy is in the group's folder; Unload removes it with the group; the MODEL ComfyUI
        # cached keeps the LoRA's tensors, and the next group gets them written again
        h = server.wait(server.queue(_graph("LoraLoaderModelOnly", "for_four_blocks.safetensors", 5,
                                            "latents/before_unload")), timeout=240)
        assert h["status"]["status_str"] == "success", h["status"]
        groups = comfy_host.pack_temp_files(str(tmp))
        assert len(groups) == 1 and groups[0].startswith("pdit_group_"), groups
        copies = sorted(p.name for p in (tmp / groups[0] / "loras").iterdir())
        assert len(copies) == 1 and copies[0].startswith("native_lora_"), copies
        server.post("/free", {"unload_models": True})
        deadline = time.monotonic() + 30
        while comfy_host.pack_temp_files(str(tmp)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert comfy_host.pack_temp_files(str(tmp)) == []  # the group and its folder are gone
        h = server.wait(server.queue(_graph("LoraLoaderModelOnly", "for_four_blocks.safetensors", 6,
                                            "latents/after_unload")), timeout=240)
        assert h["status"]["status_str"] == "success", h["status"]
        cached = [m[1]["nodes"] for m in h["status"]["messages"] if m[0] == "execution_cached"]
        assert cached and "20" in cached[0], cached  # the LoRA node did not run again: its MODEL came from the cache
        groups = comfy_host.pack_temp_files(str(tmp))
        assert [p.name for p in (tmp / groups[0] / "loras").iterdir()] == copies  # written again for the new group
        after, _ = comfy_host.saved_latent(base, "latents/after_unload")
        h = server.wait(server.queue(_graph("LoraLoaderModelOnly", "for_four_blocks.safetensors", 6,
                                            "latents/after_unload_native", native=True)), timeout=240)
        native6, _ = comfy_host.saved_latent(base, "latents/after_unload_native")
        diff = (after - native6).abs().max().item()
        print(f"after Unload, the cached native-loader MODEL on a fresh group vs native: {diff:.2e}")
        assert diff <= TOL
        server_pid = server.proc.pid
    assert leftover_segments(server_pid) == []
    assert comfy_host.pack_temp_files(str(tmp)) == [], "the server left files in its temp folder"
