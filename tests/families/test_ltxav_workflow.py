"""LTX-2 (audio + video) through a real headless ComfyUI queue on 2 CPU ranks (ulysses2), equal to ComfyUI's native
Load Diffusion Model on the same graph (same seed, conditioning and latent): only the loader differs.

ComfyUI 0.33's own loader detects the tiny LTX-2 file (its metadata config gives the tiny text and audio widths), so
the oracle is the native UNETLoader. The graph is ComfyUI's own LTX nodes: EmptyLTXVLatentVideo (45 video tokens,
ragged on 2 ranks) and LTXVEmptyLatentAudio (a shape-only audio VAE: 7 audio tokens) joined by LTXVConcatAVLatent,
LTXVConditioning's frame rate, raw text of 12 and 9 tokens without a mask (as LTX-2's Gemma encoder gives it; the
connectors run on the ranks and pad it with their registers), the native KSampler at
cfg 3 and LTXVSeparateAVLatent. On a ComfyUI without LTXAVModel (0.3.75) the loader refuses the file by class name.
"""
import pytest

import comfy_host
from parallel_backend.testing.synthetic import LTXAV_PRESETS, write_tiny_ltxav

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_ltx2.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps)
TEXT = LTXAV_PRESETS["tiny"]["caption_channels"]  # the raw (unprocessed) text width the connectors take


def _graph(loader: dict, prefix: str) -> dict:
    g = {"1": {"class_type": "PditTestConditioning", "inputs": {"seed": 101, "tokens": 12, "width": TEXT}},
         "2": {"class_type": "PditTestConditioning", "inputs": {"seed": 102, "tokens": 9, "width": TEXT}},
         "3": {"class_type": "LTXVConditioning", "inputs": {"positive": ["1", 0], "negative": ["2", 0],
                                                             "frame_rate": 25.0}},
         "10": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 96, "height": 160, "length": 17,
                                                                 "batch_size": 1}},
         "11": {"class_type": "PditTestVAE", "inputs": {"seed": 0, "kind": "ltx2-audio"}},
         "12": {"class_type": "LTXVEmptyLatentAudio", "inputs": {"frames_number": 17, "frame_rate": 25,
                                                                 "batch_size": 1, "audio_vae": ["11", 0]}},
         "13": {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["10", 0], "audio_latent": ["12", 0]}},
         "5": loader,
         "6": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 3, "steps": 4, "cfg": 3.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["3", 0], "negative": ["3", 1],
                                                    "latent_image": ["13", 0], "denoise": 1.0}},
         "7": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["6", 0]}},
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


def test_ltx2_audio_video_sampled_through_prompt_queue(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    path = write_tiny_ltxav(str(d / MODEL), seed=41)
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [path]})
    with comfy_host.ComfyServer(base) as server:
        if "LTXVEmptyLatentAudio" not in server.get("/object_info"):  # 0.3.75: no LTX-2 at all
            g = _graph(PARALLEL, "latents/p")
            g["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/p"}}
            g["6"]["inputs"]["latent_image"] = ["10", 0]
            for n in ("8", "9", "11", "12", "13"):
                del g[n]
            h = server.wait(server.queue(g), timeout=240)
            assert h["status"]["status_str"] == "error"
            assert "LTXAVModel (LTX-2 audio + video), which this ComfyUI does not have" in str(h["status"]), \
                h["status"]
            return
        runs = {}
        for name, loader in (("parallel", PARALLEL), ("native", NATIVE)):
            h = server.wait(server.queue(_graph(loader, f"latents/{name}")), timeout=300)
            assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
            runs[name] = [comfy_host.saved_latent(base, f"latents/{name}_{s}")[0] for s in ("video", "audio")]
        log = open(server.log_path).read()
    diffs = []
    for out, ref, shape in zip(runs["parallel"], runs["native"], [(1, 128, 3, 5, 3), (1, 8, 5, 16)]):
        assert out.shape == ref.shape == shape
        assert out.abs().mean() > 0.1
        diffs.append((out - ref).abs().max().item())
    print(f"LTX-2 queue, 2 CPU ranks (ulysses2) vs native UNETLoader + KSampler: video {diffs[0]:.2e}, "
          f"audio {diffs[1]:.2e}")
    assert max(diffs) <= TOL
    assert "as LTXAV on" in log, log[-3000:]
