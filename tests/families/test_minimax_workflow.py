"""The shipped MiniMax H3 workflow through a real headless ComfyUI queue on 2 CPU ranks (ulysses2), equal to the same
graph with ComfyUI's native Load Diffusion Model (same seed, conditioning and latent): only the loader differs.

ComfyUI's own loader detects a tiny H3 file fully, so the oracle is the native UNETLoader. The graph is the shipped
one (ComfyUI's MiniMax H3 text-to-video template: MiniMaxH3ImageToVideo's prompt and [video, audio] nested latent,
res_multistep with BasicScheduler and BasicGuider in SamplerCustomAdvanced) with the Qwen3-VL text encoder replaced
by the test text-encoder object (MiniMaxH3ImageToVideo tokenizes and encodes with it: 12 tokens of the tiny file's
width), the video VAE by the test VAE of H3's latent shape, a 160 x 96 x 5 video (30 video tokens, 16 audio rows,
12 text tokens: 58 packed), 4 steps, and the decoders replaced by ComfyUI's AV split and SaveLatent. On a ComfyUI
without the class (0.3.75) the shipped graph's MiniMax nodes are missing and the loader refuses the file by class
name.
"""
import pytest

import comfy_host
from parallel_backend.testing.synthetic import MINIMAX_PRESETS, write_tiny_minimax

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_minimax_h3.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps)
SHIPPED = "minimax_h3_t2v_parallel"
# the shipped graph's nodes ComfyUI 0.3.75 lacks: no MiniMax H3 there; VAEDecodeAudio's and SaveAudio's module needs
# torchaudio, which the 0.3.75 test venv does not install
MINIMAX_NODES = ["MiniMaxH3ImageToVideo", "SaveAudio", "VAEDecodeAudio"]
DROPPED = ("VAEDecode", "SaveAnimatedWEBP", "VAEDecodeAudio", "SaveAudio")


def _tiny(shipped: dict, prefix: str) -> dict:
    """The shipped graph made tiny for CPU ranks; the pack's nodes and every other node's wiring as shipped."""
    g = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in shipped.items()
         if v["class_type"] not in DROPPED}
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPLoader":
            g[nid] = {"class_type": "PditTestTextEncoder", "inputs": {"width": MINIMAX_PRESETS["tiny"]["text_dim"]}}
        elif ct == "VAELoader" and "audio" in inp["vae_name"]:
            del g[nid]  # (only the replaced audio decoder used it)
        elif ct == "VAELoader":
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 0, "kind": "minimax_h3"}}
        elif ct == "ParallelConfig":
            inp.update(world_size=2, cfg=1, ulysses=2, ring=1, tp=1, dp=1, dtype="fp32", device="cpu")
        elif ct == "ParallelModelLoader":
            inp.update(model_name=MODEL, base_precision="fp32")
        elif ct == "MiniMaxH3ImageToVideo":
            inp.update(width=160, height=96, length=5)
        elif ct == "BasicScheduler":
            inp.update(steps=4)
    sampler = next(k for k, v in g.items() if v["class_type"] == "SamplerCustomAdvanced")
    g["split"] = {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": [sampler, 0]}}  # ComfyUI's AV split
    for slot, stream in enumerate(("video", "audio")):
        g[f"save_{stream}"] = {"class_type": "SaveLatent", "inputs": {"samples": ["split", slot],
                                                                      "filename_prefix": f"{prefix}_{stream}"}}
    return g


def _refused_without_minimax(server, shipped):
    """0.3.75: the shipped graph's MiniMax nodes are missing; the loader alone refuses the file by class name."""
    info = server.get("/object_info")
    assert sorted({v["class_type"] for v in shipped.values()} - set(info)) == MINIMAX_NODES
    comfy_host.refused_by_class(server, MODEL, 96,
                                {"class_type": "EmptyHunyuanLatentVideo",
                                 "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}},
                                "this ComfyUI has no MiniMaxH3 model class")


def test_shipped_minimax_h3_workflow_through_prompt_queue(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    path = write_tiny_minimax(str(d / MODEL), seed=41)
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [path]})
    shipped = comfy_host.load_workflow(SHIPPED + "_api.json")
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        if "MiniMaxH3ImageToVideo" not in info:  # 0.3.75: no MiniMax H3 at all
            _refused_without_minimax(server, shipped)
            return
        ui = comfy_host.load_workflow(SHIPPED + ".json")
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in shipped.items()}
        parallel = _tiny(shipped, "latents/parallel")
        runs = {}
        for name, graph in (("parallel", parallel), ("native", comfy_host.native_variant(
                parallel, "latents/native", replace="latents/parallel"))):
            h = server.wait(server.queue(graph), timeout=300)
            assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
            runs[name] = [comfy_host.saved_latent(base, f"latents/{name}_{s}")[0] for s in ("video", "audio")]
        log = open(server.log_path).read()
    diffs = []
    for out, ref, shape in zip(runs["parallel"], runs["native"], [(1, 24, 2, 6, 10), (1, 32, 2, 8)]):
        assert out.shape == ref.shape == shape
        assert out.abs().mean() > 0.1
        diffs.append((out - ref).abs().max().item())
    print(f"shipped MiniMax H3 workflow, 2 CPU ranks (ulysses2) vs native UNETLoader: video {diffs[0]:.2e}, "
          f"audio {diffs[1]:.2e}")
    assert max(diffs) <= TOL
    assert "as MiniMaxH3 on" in log, log[-3000:]
