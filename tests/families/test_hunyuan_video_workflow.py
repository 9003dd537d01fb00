"""The shipped HunyuanVideo 1.5 image-to-video workflow through a real headless ComfyUI queue on 2 CPU ranks (tp2),
equal to the same graph with the pack's loader and sampler swapped for ComfyUI's native UNETLoader and KSampler, in
the same server (same seed, conditioning, latent). The text-to-video workflow is the same graph without the image
nodes: checked as the browser queues it here (its sampling on the pack is covered by ComfyUI's own 1.5 T2V template in
test_templates.py, to keep the suite's time).

ComfyUI's own loader detects a tiny HunyuanVideo 1.5 file fully (HunyuanVideo15: 65 input channels, SigLIP projection
of 1152), so the native UNETLoader is the oracle. The text is 12 Qwen tokens and 4 ByT5 glyph tokens, the latent
(1, 32, 3, 5, 7); on tp2 each rank holds one of the 2 heads and its share of the fused single-block layers. I2V runs
ComfyUI's HunyuanVideo15ImageToVideo on a start image (test VAE of the 1.5 VAE's shapes: 32 channels, 16x) and SigLIP
tokens (test CLIP vision: 729 x 1152): its concat_cond reads the image / mask channels off the proxy's
img_in.proj.weight. Its VAE Decode is fed by the Parallel VAE Loader as shipped (a tiny 1.5 VAE of ComfyUI's class,
built at the file's width in the server and its ranks: tests/comfy_site): the frames equal Load VAE + VAE Decode
(Tiled) at that node's default widgets. (The templates in test_templates.py run 1.5 T2V / I2V and 1.0 T2V on ulysses2.)

LoRA: a LoRA in the diffusion-pipe layout ComfyUI reads for this class (every double / single block linear, the fused
single-block ones included) on an fp8_scaled copy of the file, on tp2 (each rank merges its rows / columns of the
fused layers' blocks, the fp8 weight re-rounded as ComfyUI's ModelPatcher rounds it), through the native
LoraLoaderModelOnly on the pack's MODEL and through Parallel LoRA, each equal to native LoraLoaderModelOnly.
"""
import os

import pytest
import torch

import comfy_host
from parallel_backend.testing.synthetic import (write_fp8_variant, write_hunyuan_video_lora, write_tiny_hunyuan_video,
                                                write_tiny_hunyuan_video_vae)

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_hunyuan_video15.safetensors"
FP8_MODEL = "tiny_hunyuan_video15_fp8_scaled.safetensors"
LORA = "tiny_hunyuan_video15_lora.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps, cfg 6)
SIZE = dict(width=112, height=80, length=9)  # latent 3 x 5 x 7
MESH = {"tp": 2}  # both tests on one warm group (the templates run HunyuanVideo on ulysses2)


def _texts(graph: dict) -> None:
    """The test conditioning as HunyuanVideo 1.5's text encoders give it: Qwen tokens and ByT5 glyph tokens (no text
    mask: the host's own forward takes a mask only for one row without ByT5 tokens; the parity test covers it)."""
    for node in graph.values():
        if node["class_type"] == "PditTestConditioning":
            node["inputs"].update(byt5_tokens=4)


def _i2v(api: dict, image: str) -> dict:
    """Test stand-ins for the VAE and SigLIP; the image, HunyuanVideo15ImageToVideo and the pack's nodes as shipped."""
    g = {k: dict(v, inputs=dict(v["inputs"])) for k, v in api.items()}
    for nid, node in list(g.items()):
        ct = node["class_type"]
        if ct == "VAELoader":
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 7, "kind": "hunyuan_video_1.5"}}
        elif ct == "CLIPVisionLoader":
            del g[nid]
        elif ct == "CLIPVisionEncode":
            g[nid] = {"class_type": "PditTestClipVision", "inputs": {"seed": 8, "kind": "siglip_384"}}
        elif ct == "LoadImage":
            node["inputs"]["image"] = image
        elif ct == "HunyuanVideo15ImageToVideo":
            node["inputs"].update(SIZE)
    tiny = comfy_host.tiny_cpu_variant(g, MODEL, seed=4, steps=3, prefix="latents/hy_i2v", text_width=64,
                                       degrees=MESH)
    _texts(tiny)
    return comfy_host.keep_vae_nodes(g, tiny, "latents/hy_i2v")  # VAE Decode on the Parallel VAE Loader, as shipped


def _run(server, base, graph, prefix):
    h = server.wait(server.queue(graph), timeout=240)
    assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
    return comfy_host.saved_latent(base, prefix)[0]


def _shipped(server, name):
    api, ui = comfy_host.load_workflow(f"{name}_api.json"), comfy_host.load_workflow(f"{name}.json")
    assert comfy_host.ui_to_api(ui, server.get("/object_info")) == {
        k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    return api


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from PIL import Image
    d = tmp_path_factory.mktemp("hunyuan_queue")
    model = write_tiny_hunyuan_video(str(d / MODEL), seed=41)
    write_fp8_variant(model, str(d / FP8_MODEL), scaled=True)
    write_hunyuan_video_lora(str(d / LORA), model, seed=42)
    comfy_host.import_comfy()
    vae = write_tiny_hunyuan_video_vae(str(d / "hunyuanvideo15_vae_fp16.safetensors"), version="1.5")  # shipped name
    base = comfy_host.make_base_dir(str(d / "comfy"), {"diffusion_models": [model, str(d / FP8_MODEL)],
                                                       "loras": [str(d / LORA)], "vae": [vae]})
    ramp = torch.linspace(0, 255, 80 * 112).reshape(80, 112, 1).expand(80, 112, 3).to(torch.uint8).contiguous()
    Image.fromarray(ramp.numpy()).save(os.path.join(base, "input", "start.png"))
    with comfy_host.ComfyServer(base, env=comfy_host.tiny_vae_env()) as s:  # the 1.5 VAE at the tiny file's width
        yield s, base


def test_hunyuan_video15_i2v_through_prompt_queue(server):
    server, base = server
    t2v = _shipped(server, "hunyuan_video15_t2v_parallel")
    assert {n["class_type"] for n in t2v.values()} >= {"DualCLIPLoader", "EmptyHunyuanVideo15Latent",
                                                       "ModelSamplingSD3", "ParallelModelLoader", "ParallelSampler"}
    i2v = _shipped(server, "hunyuan_video15_i2v_parallel")
    assert "HunyuanVideo15ImageToVideo" in {n["class_type"] for n in i2v.values()}
    graph = _i2v(i2v, "start.png")
    out = _run(server, base, graph, "latents/hy_i2v")
    native = comfy_host.native_vae_nodes(comfy_host.native_variant(graph, prefix="latents/hy_i2v_native"))
    native["90"]["inputs"]["filename_prefix"] = "latents/hy_i2v_native_frames"
    ref = _run(server, base, native, "latents/hy_i2v_native")
    log = open(server.log_path).read()
    assert out.shape == ref.shape == (1, 32, 3, 5, 7) and out.abs().mean() > 0.1
    diff = (out - ref).abs().max().item()
    frames = comfy_host.frames_diff(base, "latents/hy_i2v", "latents/hy_i2v_native", (9, 80, 112, 3), TOL)
    print(f"HunyuanVideo 1.5 I2V queue, 2 CPU ranks (tp2) vs native UNETLoader + KSampler: {diff:.2e}; its "
          f"Parallel VAE decode vs Load VAE + VAE Decode (Tiled): {frames:.2e}")
    assert diff <= TOL
    assert "as HunyuanVideo15 on" in log, log[-3000:]


def _lora_graph(loader: str, lora_node: str, prefix: str) -> dict:
    """The shipped T2V graph on the fp8_scaled file at cfg 1 (one row a call), tp2, a LoRA at 0.8 after the loader."""
    g = comfy_host.tiny_cpu_variant(comfy_host.load_workflow("hunyuan_video15_t2v_parallel_api.json"), FP8_MODEL,
                                    seed=5, steps=3, prefix=prefix, text_width=64, degrees=MESH, **SIZE)
    _texts(g)
    g["8"]["inputs"]["cfg"] = 1.0
    if loader == "native":
        g = comfy_host.native_variant(g, prefix=prefix)
    if lora_node is None:
        return g
    g["20"] = ({"class_type": "ParallelLora", "inputs": {"model": ["5", 0], "lora_name": LORA, "strength": 0.8}}
               if lora_node == "ParallelLora" else
               {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["5", 0], "lora_name": LORA,
                                                                "strength_model": 0.8}})
    g["6"]["inputs"]["model"] = ["20", 0]
    return g


def test_hunyuan_video15_lora_on_fp8_scaled_file_with_tp(server):
    server, base = server
    runs = {}
    for loader, node in (("pack", "LoraLoaderModelOnly"), ("pack", "ParallelLora"), ("native", "LoraLoaderModelOnly")):
        prefix = f"latents/lora_{loader}_{node}"
        runs[(loader, node)] = _run(server, base, _lora_graph(loader, node, prefix), prefix)
    ref = runs[("native", "LoraLoaderModelOnly")]
    no_lora = _run(server, base, _lora_graph("native", None, "latents/lora_none"), "latents/lora_none")
    log = open(server.log_path).read()
    assert "lora key not loaded" not in log, log[-3000:]
    assert ref.abs().mean() > 0.1 and (ref - no_lora).abs().max() > 1e-2  # the LoRA changes the model
    diffs = {node: (runs[("pack", node)] - ref).abs().max().item() for node in ("LoraLoaderModelOnly", "ParallelLora")}
    print(f"HunyuanVideo 1.5 fp8_scaled + LoRA, 2 CPU ranks (tp2) vs native LoraLoaderModelOnly: {diffs}")
    assert max(diffs.values()) <= TOL
