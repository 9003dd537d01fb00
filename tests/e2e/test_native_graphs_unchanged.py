"""The pack never changes what a native graph does: in one headless ComfyUI (caching off, so every node runs each
time), a native graph with LoRA loaders, a block-replacement patch and ComfyUI's samplers gives the same latent
before and after a graph that used the pack's loader (and a native LoRA loader on the pack's MODEL, which installs
the pack's hook), bit for bit."""
import pytest
import torch

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_wan, write_wan_lora

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL, LORA = "tiny_wan_native.safetensors", "tiny_wan_lora.safetensors"


def _native_graph(prefix: str) -> dict:
    """UNETLoader -> LoraLoaderModelOnly x 2 -> SkipLayerGuidanceDiT -> ModelSamplingSD3 -> KSampler (dpmpp_2m)."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA,
                                                              "strength_model": 0.8}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": LORA,
                                                              "strength_model": -0.3}},
        "4": {"class_type": "SkipLayerGuidanceDiT", "inputs": {"model": ["3", 0], "double_layers": "1",
                                                               "single_layers": "", "scale": 2.0, "rescaling_scale": 0.0, "start_percent": 0.0,
                                                               "end_percent": 1.0}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 5.0}},
        "6": {"class_type": "PditTestConditioning", "inputs": {"seed": 1, "tokens": 12, "width": 4096}},
        "7": {"class_type": "PditTestConditioning", "inputs": {"seed": 2, "tokens": 12, "width": 4096}},
        "8": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 48, "length": 5,
                                                                   "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 7, "steps": 3, "cfg": 4.0,
                                                   "sampler_name": "dpmpp_2m", "scheduler": "simple",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": prefix}},
    }


def _pack_graph(prefix: str) -> dict:
    """The same model on the pack (2 CPU ranks, ulysses 2) with the native LoRA loader on its MODEL."""
    g = _native_graph(prefix)
    g["1"] = {"class_type": "ParallelModelLoader", "inputs": {"model_name": MODEL, "base_precision": "fp32",
                                                             "parallel_config": ["11", 0]}}
    g["11"] = {"class_type": "ParallelConfig", "inputs": {"world_size": 2, "cfg": 1, "ulysses": 2, "ring": 1, "tp": 1,
                                                         "dp": 1, "dtype": "fp32", "device": "cpu",
                                                         "attention": "sdpa", "first_device": 0}}
    return g


def _run(server, base, graph, prefix):
    h = server.wait(server.queue(graph), timeout=300)
    assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
    return comfy_host.saved_latent(base, prefix)[0]


def test_a_native_graph_is_the_same_before_and_after_a_pack_graph(tmp_path):
    ckpt = write_tiny_wan(str(tmp_path / MODEL), seed=8)
    lora = str(tmp_path / LORA)
    write_wan_lora(lora, ckpt, fmt="comfy", rank=4, alpha=2.0, seed=9)
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [ckpt], "loras": [lora]})
    with comfy_host.ComfyServer(base, extra_args=["--cache-none"]) as server:
        before = _run(server, base, _native_graph("native/before"), "native/before")
        on_pack = _run(server, base, _pack_graph("pack/run"), "pack/run")
        after = _run(server, base, _native_graph("native/after"), "native/after")
    diff = (on_pack - before).abs().max().item()
    print(f"native graph before / after a pack graph: identical={torch.equal(before, after)}; the pack graph vs "
          f"native: {diff:.2e}")
    assert torch.equal(before, after)
    assert diff <= 1e-4
