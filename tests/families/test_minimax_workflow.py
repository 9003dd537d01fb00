"""MiniMax H3 through a real headless ComfyUI queue on 2 CPU ranks (ulysses2), equal to ComfyUI's native Load
Diffusion Model on the same graph (same seed, conditioning and latent): only the loader differs.

ComfyUI's own loader detects a tiny H3 file fully, so the oracle is the native UNETLoader. The graph is ComfyUI's
own MiniMax H3 nodes: EmptyMiniMaxH3LatentAV (a [video, audio] nested latent: 30 video tokens, 16 audio rows, 12
text tokens: 58 packed, ragged on 4), the native KSampler at cfg 3 (cond and uncond as separate calls: each runs on
the whole mesh) and SaveLatent. On a ComfyUI without the class (0.3.75) the loader refuses the file by class name.
"""
import pytest

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_minimax

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_minimax_h3.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps)


def _graph(loader: dict, prefix: str) -> dict:
    g = {"1": {"class_type": "PditTestConditioning", "inputs": {"seed": 101, "tokens": 12, "width": 96}},
         "2": {"class_type": "PditTestConditioning", "inputs": {"seed": 102, "tokens": 9, "width": 96}},
         "3": {"class_type": "EmptyMiniMaxH3LatentAV", "inputs": {"width": 160, "height": 96, "length": 5}},
         "5": loader,
         "6": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 3, "steps": 4, "cfg": 3.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["1", 0], "negative": ["2", 0],
                                                    "latent_image": ["3", 0], "denoise": 1.0}},
         "7": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["6", 0]}},  # ComfyUI's AV split
         "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix + "_video"}},
         "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 1], "filename_prefix": prefix + "_audio"}}}
    if loader["class_type"] == "ParallelModelLoader":
        g["4"] = {"class_type": "ParallelConfig", "inputs": {
            "world_size": 2, "cfg": 1, "ulysses": 2, "ring": 1, "tp": 1, "dp": 1, "dtype": "fp32", "device": "cpu",
            "attention": "sdpa"}}
    return g


PARALLEL = {"class_type": "ParallelModelLoader", "inputs": {"model_name": MODEL, "base_precision": "fp32",
                                                            "parallel_config": ["4", 0]}}
NATIVE = {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}}


def test_minimax_h3_sampled_through_prompt_queue(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    path = write_tiny_minimax(str(d / MODEL), seed=41)
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [path]})
    with comfy_host.ComfyServer(base) as server:
        if "EmptyMiniMaxH3LatentAV" not in server.get("/object_info"):  # 0.3.75: no MiniMax H3 at all
            g = _graph(PARALLEL, "latents/p")
            g["3"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                         "batch_size": 1}}
            g["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/p"}}
            del g["8"], g["9"]
            h = server.wait(server.queue(g), timeout=240)
            assert h["status"]["status_str"] == "error"
            assert "this ComfyUI has no MiniMaxH3 model class" in str(h["status"]), h["status"]
            return
        runs = {}
        for name, loader in (("parallel", PARALLEL), ("native", NATIVE)):
            h = server.wait(server.queue(_graph(loader, f"latents/{name}")), timeout=300)
            assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
            runs[name] = [comfy_host.saved_latent(base, f"latents/{name}_{s}")[0] for s in ("video", "audio")]
        log = open(server.log_path).read()
    diffs = []
    for out, ref, shape in zip(runs["parallel"], runs["native"], [(1, 24, 2, 6, 10), (1, 32, 2, 8)]):
        assert out.shape == ref.shape == shape
        assert out.abs().mean() > 0.1
        diffs.append((out - ref).abs().max().item())
    print(f"MiniMax H3 queue, 2 CPU ranks (ulysses2) vs native UNETLoader + KSampler: video {diffs[0]:.2e}, "
          f"audio {diffs[1]:.2e}")
    assert max(diffs) <= TOL
    assert "as MiniMaxH3 on" in log, log[-3000:]
