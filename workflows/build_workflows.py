"""Writes the shipped workflows in both ComfyUI formats from one graph spec, so they cannot drift.

    python workflows/build_workflows.py          # rewrite workflows/*.json
UI format (drag into the browser): <name>.json. API format (POST /prompt): <name>_api.json.
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# class -> output (name, type) list; only what the shipped graphs use
OUTPUTS = {
    "CLIPLoader": [("CLIP", "CLIP")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "ParallelConfig": [("parallel_config", "PARALLEL_CONFIG")],
    "ParallelModelLoader": [("model", "MODEL"), ("parallel_plan", "STRING")],
    "EmptyHunyuanLatentVideo": [("LATENT", "LATENT")],
    "ParallelSampler": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAELoader": [("VAE", "VAE")],
    "ParallelVAELoader": [("VAE", "VAE")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveAnimatedWEBP": [],
    "SaveLatent": [],
    "UNETLoader": [("MODEL", "MODEL")],
    "ModelSamplingSD3": [("MODEL", "MODEL")],
    "KSamplerAdvanced": [("LATENT", "LATENT")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "Wan22ImageToVideoLatent": [("LATENT", "LATENT")],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
    "EmptyCosmosLatentVideo": [("LATENT", "LATENT")],
    "SaveImage": [],
    "CLIPVisionLoader": [("CLIP_VISION", "CLIP_VISION")],
    "CLIPVisionEncode": [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")],
    "WanImageToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
    "PditTestConditioning": [("CONDITIONING", "CONDITIONING")],  # test-only node (tests/comfy_test_nodes)
    "WanVaceToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
                       ("trim_latent", "INT")],
    "TrimVideoLatent": [("LATENT", "LATENT")],
    "LTXVConditioning": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "EmptyLTXVLatentVideo": [("LATENT", "LATENT")],
    "DualCLIPLoader": [("CLIP", "CLIP")],
    "EmptyHunyuanVideo15Latent": [("LATENT", "LATENT")],
    "HunyuanVideo15ImageToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
    "Kandinsky5ImageToVideo": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
                               ("cond_latent", "LATENT")],
    "LTXAVTextEncoderLoader": [("CLIP", "CLIP")],
    "LTXVAudioVAELoader": [("Audio VAE", "VAE")],
    "LTXVEmptyLatentAudio": [("Latent", "LATENT")],
    "LTXVConcatAVLatent": [("latent", "LATENT")],
    "RandomNoise": [("NOISE", "NOISE")],
    "KSamplerSelect": [("SAMPLER", "SAMPLER")],
    "LTXVScheduler": [("SIGMAS", "SIGMAS")],
    "CFGGuider": [("GUIDER", "GUIDER")],
    "SamplerCustomAdvanced": [("output", "LATENT"), ("denoised_output", "LATENT")],
    "LTXVSeparateAVLatent": [("video_latent", "LATENT"), ("audio_latent", "LATENT")],
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "VAEDecodeTiled": [("IMAGE", "IMAGE")],
    "LTXVAudioVAEDecode": [("Audio", "AUDIO")],
    "SaveAudio": [],
    "MiniMaxH3ImageToVideo": [("positive", "CONDITIONING"), ("LATENT", "LATENT")],
    "BasicScheduler": [("SIGMAS", "SIGMAS")],
    "BasicGuider": [("GUIDER", "GUIDER")],
    "VAEDecodeAudio": [("AUDIO", "AUDIO")],
}
# widgets followed by an extra UI-only value ("control_after_generate")
SEED_WIDGETS = {("ParallelSampler", "seed"), ("KSampler", "seed"), ("KSamplerAdvanced", "noise_seed"),
                ("PditTestConditioning", "seed"), ("RandomNoise", "noise_seed")}
# widgets followed by an extra UI-only value the frontend keeps after them
# widgets fed by a link (a widget converted to an input): the frontend keeps the widget's value in widgets_values
# and marks the input with "widget"; value = what the widget holds
LINKED_WIDGETS = {("TrimVideoLatent", "trim_amount"): 0}
TRAILING_UI_VALUES = {("LoadImage", "image"): "image"}  # the upload button


def link(node: int, slot: int = 0):
    return ("link", node, slot)


# Parallel Config's inputs in the node's order with the node's defaults: every widget the browser draws gets its value
# (so the box is sized for all of them), and a workflow names only what it changes
PARALLEL_CONFIG_DEFAULTS = {"world_size": 2, "cfg": 0, "ulysses": 0, "ring": 0, "tp": 0, "dp": 0, "dtype": "bf16",
                            "device": "cuda", "attention": "sdpa", "first_device": 0, "weights": "auto", "pp": 1,
                            "stage_split": "", "devices": "", "nodes": 1, "ranks_per_node": 0, "rendezvous": "",
                            "secret_file": "", "rejoin_timeout": 120.0}


def parallel_config(**changed) -> dict:
    unknown = set(changed) - set(PARALLEL_CONFIG_DEFAULTS)
    assert not unknown, f"not a Parallel Config widget: {sorted(unknown)}"
    return {**PARALLEL_CONFIG_DEFAULTS, **changed}


def parallel_loader(model_name: str, **changed) -> dict:
    """Parallel Model Loader's inputs in the node's order (fed by Parallel Config, node 4), defaults filled in."""
    inputs = {"model_name": model_name, "base_precision": "bf16", "parallel_config": link(4), "residency": "swap",
              "weight_dtype": "default", "compile": "off"}
    assert set(changed) <= set(inputs) - {"model_name", "parallel_config"}, sorted(changed)
    return {**inputs, **changed}


def parallel_vae_loader(vae_name: str) -> dict:
    """Parallel VAE Loader's inputs (fed by Parallel Config, node 4: the DiT's ranks decode)."""
    return {"vae_name": vae_name, "precision": "default", "parallel_config": link(4)}


WAN21_T2V = {
    "title": "Wan 2.1 text-to-video on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}),
        (2, "CLIPTextEncode", {"text": "a red fox running through fresh snow, golden hour, cinematic",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "blurry, low quality, static, watermark", "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("wan2.1_t2v_14B_bf16.safetensors")),
        (6, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        (7, "ParallelSampler", {"model": link(5), "seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                                "scheduler": "simple", "positive": link(2), "negative": link(3),
                                "latent_image": link(6), "denoise": 1.0}),
        (8, "ParallelVAELoader", parallel_vae_loader("wan_2.1_vae.safetensors")),
        (9, "VAEDecode", {"samples": link(7), "vae": link(8)}),
        (10, "SaveAnimatedWEBP", {"images": link(9), "filename_prefix": "parallel_dit/wan21_t2v", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

UMT5 = {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}
NEGATIVE = "blurry, low quality, static, watermark, deformed, extra limbs"

# Wan 2.2 A14B: ComfyUI's native two-expert graph (high-noise expert for the first steps, low-noise expert
# from the boundary step on, two KSamplerAdvanced) with both experts loaded by Parallel Model Loaders on
# one worker group. residency "resident": both experts stay on the ranks (2x weights per rank, no reload);
# "swap": each expert is read again when its sampler starts (1x weights, two loads per prompt).
# The decode runs on the same ranks (Parallel VAE Loader on the same Parallel Config).
WAN22_A14B_T2V = {
    "title": "Wan 2.2 A14B text-to-video (high / low noise experts) on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", dict(UMT5)),
        (2, "CLIPTextEncode", {"text": "a lighthouse on a cliff at dusk, waves breaking, drone shot, cinematic",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": NEGATIVE, "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                                               residency="resident")),
        (6, "ParallelModelLoader", parallel_loader("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
                                               residency="resident")),
        (7, "ModelSamplingSD3", {"model": link(5), "shift": 8.0}),
        (8, "ModelSamplingSD3", {"model": link(6), "shift": 8.0}),
        (9, "EmptyHunyuanLatentVideo", {"width": 1280, "height": 704, "length": 81, "batch_size": 1}),
        (10, "KSamplerAdvanced", {"model": link(7), "add_noise": "enable", "noise_seed": 42, "steps": 20, "cfg": 3.5,
                                  "sampler_name": "euler", "scheduler": "simple", "positive": link(2),
                                  "negative": link(3), "latent_image": link(9), "start_at_step": 0,
                                  "end_at_step": 10, "return_with_leftover_noise": "enable"}),
        (11, "KSamplerAdvanced", {"model": link(8), "add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 3.5,
                                  "sampler_name": "euler", "scheduler": "simple", "positive": link(2),
                                  "negative": link(3), "latent_image": link(10), "start_at_step": 10,
                                  "end_at_step": 10000, "return_with_leftover_noise": "disable"}),
        (12, "ParallelVAELoader", parallel_vae_loader("wan_2.1_vae.safetensors")),
        (13, "VAEDecode", {"samples": link(11), "vae": link(12)}),
        (14, "SaveAnimatedWEBP", {"images": link(13), "filename_prefix": "parallel_dit/wan22_a14b_t2v", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# Wan 2.2 TI2V-5B: 48-channel latent from Wan22ImageToVideoLatent (Wan 2.2 VAE); with a start image the
# first latent frame is kept clean and ComfyUI passes one timestep per latent frame (the pack handles it).
# The decode runs on the DiT's ranks (Parallel VAE Loader); the start image's one-frame encode stays on Load VAE: it
# may run before the DiT's loader has started the group, and the VAE loader would then start a second group for it.
WAN22_TI2V_5B = {
    "title": "Wan 2.2 TI2V-5B text/image-to-video on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", dict(UMT5)),
        (2, "CLIPTextEncode", {"text": "the cat in the picture turns its head and yawns, soft window light",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": NEGATIVE, "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("wan2.2_ti2v_5B_fp16.safetensors")),
        (6, "ModelSamplingSD3", {"model": link(5), "shift": 8.0}),
        (7, "VAELoader", {"vae_name": "wan2.2_vae.safetensors"}),
        (8, "LoadImage", {"image": "example.png"}),
        (9, "Wan22ImageToVideoLatent", {"vae": link(7), "width": 1280, "height": 704, "length": 121,
                                         "batch_size": 1, "start_image": link(8)}),
        (10, "ParallelSampler", {"model": link(6), "seed": 42, "steps": 20, "cfg": 5.0, "sampler_name": "uni_pc",
                                 "scheduler": "simple", "positive": link(2), "negative": link(3),
                                 "latent_image": link(9), "denoise": 1.0}),
        (13, "ParallelVAELoader", parallel_vae_loader("wan2.2_vae.safetensors")),
        (11, "VAEDecode", {"samples": link(10), "vae": link(13)}),
        (12, "SaveAnimatedWEBP", {"images": link(11), "filename_prefix": "parallel_dit/wan22_ti2v_5b", "fps": 24.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# Cosmos Predict2 2B text-to-image: ComfyUI's native Predict2 graph (old T5-XXL text encoder, EmptySD3LatentImage,
# Wan 2.1 VAE, decoded on the DiT's ranks by the Parallel VAE Loader) with the pack's three nodes in place of Load
# Diffusion Model and KSampler. For video-to-world, load a Video2World file and take the latent from
# CosmosPredict2ImageToVideoLatent (start image, its encode on Load VAE) instead.
COSMOS_PREDICT2_T2I = {
    "title": "Cosmos Predict2 2B text-to-image on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", {"clip_name": "oldt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "cosmos",
                           "device": "default"}),
        (2, "CLIPTextEncode", {"text": "a red vintage bicycle leaning against a sunlit brick wall, ivy, "
                                       "photorealistic, sharp focus", "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "blurry, low quality, watermark, text, deformed", "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("cosmos_predict2_2B_t2i.safetensors")),
        (6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        (7, "ParallelSampler", {"model": link(5), "seed": 42, "steps": 35, "cfg": 4.0, "sampler_name": "euler",
                                "scheduler": "simple", "positive": link(2), "negative": link(3),
                                "latent_image": link(6), "denoise": 1.0}),
        (8, "ParallelVAELoader", parallel_vae_loader("wan_2.1_vae.safetensors")),
        (9, "VAEDecode", {"samples": link(7), "vae": link(8)}),
        (10, "SaveImage", {"images": link(9), "filename_prefix": "parallel_dit/cosmos_predict2_t2i"}),
    ],
}

# Cosmos 1.0 7B text-to-world: ComfyUI's native Cosmos 1 graph (old T5-XXL text encoder, EmptyCosmosLatentVideo,
# the Cosmos 1.0 VAE cv8x8x8) with the pack's three nodes in place of Load Diffusion Model and KSampler, and the decode
# on the DiT's ranks (Parallel VAE Loader). The 14B file loads the same way (40 heads); for video-to-world, load a
# Video2World file and take the latent from CosmosImageToVideoLatent (start / end image, encoded on Load VAE) instead.
COSMOS1_T2W = {
    "title": "Cosmos 1.0 7B text-to-world on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", {"clip_name": "oldt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "cosmos",
                           "device": "default"}),
        (2, "CLIPTextEncode", {"text": "a drone shot gliding over a foggy pine forest at sunrise, light rays through "
                                       "the trees, cinematic, photorealistic", "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "blurry, low quality, watermark, text, deformed, static", "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("Cosmos-1_0-Diffusion-7B-Text2World.safetensors")),
        (6, "EmptyCosmosLatentVideo", {"width": 1280, "height": 704, "length": 121, "batch_size": 1}),
        (7, "ParallelSampler", {"model": link(5), "seed": 42, "steps": 30, "cfg": 6.5,
                                "sampler_name": "res_multistep", "scheduler": "karras", "positive": link(2),
                                "negative": link(3), "latent_image": link(6), "denoise": 1.0}),
        (8, "ParallelVAELoader", parallel_vae_loader("cosmos_cv8x8x8_1.0.safetensors")),
        (9, "VAEDecode", {"samples": link(7), "vae": link(8)}),
        (10, "SaveAnimatedWEBP", {"images": link(9), "filename_prefix": "parallel_dit/cosmos1_t2w", "fps": 24.0,
                                  "lossless": False, "quality": 85, "method": "default"}),
    ],
}

# LTX-Video 2B text-to-video: ComfyUI's native LTXV graph (T5-XXL text encoder, LTXVConditioning's frame rate,
# EmptyLTXVLatentVideo, the LTXV VAE) with the pack's three nodes in place of the checkpoint's model and the sampler.
# The release's checkpoint holds the DiT, the VAE and no text encoder: put it in models/diffusion_models for the
# Parallel Model Loader (it reads the DiT's keys only) and the VAE in models/vae.
LTXV_T2V = {
    "title": "LTX-Video 2B text-to-video on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "ltxv", "device": "default"}),
        (2, "CLIPTextEncode", {"text": "a paper boat drifting down a rain-soaked street at dusk, reflections of neon "
                                       "signs, slow camera pan, cinematic", "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "low quality, worst quality, deformed, distorted, watermark, static",
                               "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("ltx-video-2b-v0.9.5.safetensors")),
        (6, "LTXVConditioning", {"positive": link(2), "negative": link(3), "frame_rate": 24.0}),
        (7, "EmptyLTXVLatentVideo", {"width": 768, "height": 512, "length": 97, "batch_size": 1}),
        (8, "ParallelSampler", {"model": link(5), "seed": 42, "steps": 30, "cfg": 3.0, "sampler_name": "euler",
                                "scheduler": "simple", "positive": link(6, 0), "negative": link(6, 1),
                                "latent_image": link(7), "denoise": 1.0}),
        (9, "VAELoader", {"vae_name": "ltxv_vae.safetensors"}),
        (10, "VAEDecode", {"samples": link(8), "vae": link(9)}),
        (11, "SaveAnimatedWEBP", {"images": link(10), "filename_prefix": "parallel_dit/ltxv_t2v", "fps": 24.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# HunyuanVideo 1.5 (720p T2V / I2V files): ComfyUI's native graph (Qwen2.5-VL + ByT5 glyph text encoders through
# DualCLIPLoader, the flow shift of ModelSamplingSD3, cfg 6 as the Hunyuan team's table gives) with the pack's three
# nodes in place of Load Diffusion Model and the sampler.
HUNYUAN15_TEXT = {"clip_name1": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                  "clip_name2": "byt5_small_glyphxl_fp16.safetensors", "type": "hunyuan_video_15", "device": "default"}
HUNYUAN15_T2V = {
    "title": "HunyuanVideo 1.5 text-to-video on a parallel worker group",
    "nodes": [
        (1, "DualCLIPLoader", dict(HUNYUAN15_TEXT)),
        (2, "CLIPTextEncode", {"text": "a paper airplane gliding between skyscrapers towards the sunset, first-person "
                                       "camera following it, dreamlike colors", "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "", "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("hunyuanvideo1.5_720p_t2v_fp16.safetensors")),
        (6, "ModelSamplingSD3", {"model": link(5), "shift": 9.0}),
        (7, "EmptyHunyuanVideo15Latent", {"width": 1280, "height": 720, "length": 121, "batch_size": 1}),
        (8, "ParallelSampler", {"model": link(6), "seed": 42, "steps": 20, "cfg": 6.0, "sampler_name": "euler",
                                "scheduler": "simple", "positive": link(2), "negative": link(3),
                                "latent_image": link(7), "denoise": 1.0}),
        (9, "ParallelVAELoader", parallel_vae_loader("hunyuanvideo15_vae_fp16.safetensors")),
        (10, "VAEDecode", {"samples": link(8), "vae": link(9)}),
        (11, "SaveAnimatedWEBP", {"images": link(10), "filename_prefix": "parallel_dit/hunyuan_video15_t2v",
                                  "fps": 24.0, "lossless": False, "quality": 90, "method": "default"}),
    ],
}
# I2V: the start image VAE-encoded (on Load VAE, as TI2V-5B's) and its SigLIP tokens, through
# HunyuanVideo15ImageToVideo; the decode on the DiT's ranks (Parallel VAE Loader), as in T2V
HUNYUAN15_I2V = {
    "title": "HunyuanVideo 1.5 image-to-video on a parallel worker group",
    "nodes": [
        (1, "DualCLIPLoader", dict(HUNYUAN15_TEXT)),
        (2, "CLIPTextEncode", {"text": "the dinosaur in the picture lifts its head and walks through the misty forest",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "", "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("hunyuanvideo1.5_720p_i2v_fp16.safetensors")),
        (6, "ModelSamplingSD3", {"model": link(5), "shift": 7.0}),
        (7, "LoadImage", {"image": "example.png"}),
        (8, "CLIPVisionLoader", {"clip_name": "sigclip_vision_patch14_384.safetensors"}),
        (9, "CLIPVisionEncode", {"clip_vision": link(8), "image": link(7), "crop": "center"}),
        (10, "VAELoader", {"vae_name": "hunyuanvideo15_vae_fp16.safetensors"}),
        (11, "HunyuanVideo15ImageToVideo", {"positive": link(2), "negative": link(3), "vae": link(10), "width": 1280,
                                            "height": 720, "length": 121, "batch_size": 1, "start_image": link(7),
                                            "clip_vision_output": link(9)}),
        (12, "ParallelSampler", {"model": link(6), "seed": 42, "steps": 20, "cfg": 6.0, "sampler_name": "euler",
                                 "scheduler": "simple", "positive": link(11, 0), "negative": link(11, 1),
                                 "latent_image": link(11, 2), "denoise": 1.0}),
        (15, "ParallelVAELoader", parallel_vae_loader("hunyuanvideo15_vae_fp16.safetensors")),
        (13, "VAEDecode", {"samples": link(12), "vae": link(15)}),
        (14, "SaveAnimatedWEBP", {"images": link(13), "filename_prefix": "parallel_dit/hunyuan_video15_i2v",
                                  "fps": 24.0, "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# Kandinsky 5 Video Lite text-to-video (ComfyUI 0.33+): ComfyUI's own template (video_kandinsky5_t2v: Qwen2.5-VL +
# CLIP-L text, Kandinsky5ImageToVideo's empty latent, ModelSamplingSD3 shift 5, the native KSampler, the HunyuanVideo
# VAE) with only Load Diffusion Model swapped for the pack's two nodes; an animated WEBP instead of the template's
# CreateVideo + SaveVideo. The decode runs on the DiT's ranks (Parallel VAE Loader: HunyuanVideo 1.0's VAE); Load VAE
# stays on Kandinsky5ImageToVideo, which encodes only a start_image (give it one for image-to-video): that encode may
# run before the DiT's loader has started the group, as TI2V-5B's.
KANDINSKY5_T2V = {
    "title": "Kandinsky 5 Video Lite text-to-video on a parallel worker group",
    "nodes": [
        (1, "DualCLIPLoader", {"clip_name1": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "clip_name2": "clip_l.safetensors",
                               "type": "kandinsky5", "device": "default"}),
        (2, "CLIPTextEncode", {"text": "a lighthouse on a cliff at dusk, waves crashing below, seagulls circling, slow "
                                       "aerial orbit, warm light", "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "", "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("kandinsky5lite_t2v_sft_5s.safetensors")),
        (6, "VAELoader", {"vae_name": "hunyuan_video_vae_bf16.safetensors"}),
        (7, "Kandinsky5ImageToVideo", {"positive": link(2), "negative": link(3), "vae": link(6), "width": 768,
                                       "height": 512, "length": 121, "batch_size": 1}),
        (8, "ModelSamplingSD3", {"model": link(5), "shift": 5.0}),
        (9, "KSampler", {"model": link(8), "seed": 42, "steps": 50, "cfg": 5.0, "sampler_name": "euler_ancestral",
                         "scheduler": "beta", "positive": link(7, 0), "negative": link(7, 1),
                         "latent_image": link(7, 2), "denoise": 1.0}),
        (12, "ParallelVAELoader", parallel_vae_loader("hunyuan_video_vae_bf16.safetensors")),
        (10, "VAEDecode", {"samples": link(9), "vae": link(12)}),
        (11, "SaveAnimatedWEBP", {"images": link(10), "filename_prefix": "parallel_dit/kandinsky5_t2v", "fps": 24.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# LTX-2 19B text-to-video with audio (ComfyUI 0.33+): the first pass of ComfyUI's own template (video_ltx2_t2v: Gemma 3
# text through LTXAVTextEncoderLoader, LTXVConditioning's frame rate, the empty video and audio latents joined,
# LTXVScheduler, CFGGuider at cfg 4 and euler_ancestral in SamplerCustomAdvanced, the pair split and each decoded) with
# only the checkpoint's MODEL taken from the pack's two nodes. The release is one all-in-one file: put it (or a link
# to it) in models/diffusion_models too, where Parallel Model Loader reads its model.diffusion_model.* tensors, and in
# models/vae, where Parallel VAE Loader reads its vae.* tensors (the video decode on the DiT's ranks; the template's
# CheckpointLoaderSimple, which would load the whole 19B file in ComfyUI's process for its VAE, is gone). The audio
# VAE stays on LTXVAudioVAELoader (models/checkpoints). The template's x2 latent-upscale pass is not in this graph (it
# runs on the same MODEL: LTXVLatentUpsampler, then a 3-step CFGGuider pass with the distilled LoRA). An animated
# WEBP and the audio as a FLAC file instead of the template's CreateVideo + SaveVideo.
LTX2_CKPT = "ltx-2-19b-dev-fp8.safetensors"
LTX2_T2V = {
    "title": "LTX-2 19B text-to-video with audio on a parallel worker group",
    "nodes": [
        (1, "LTXAVTextEncoderLoader", {"text_encoder": "gemma_3_12B_it_fp4_mixed.safetensors", "ckpt_name": LTX2_CKPT,
                                       "device": "default"}),
        (2, "CLIPTextEncode", {"text": "A close-up of a cheerful girl puppet with curly auburn yarn hair and wide "
                                       "button eyes, holding a small red umbrella above her head. Rain falls gently "
                                       "around her. She looks upward and begins to sing with joy in English: \"It's "
                                       "raining, it's raining, I love it when its raining.\" The camera holds steady "
                                       "as the rain sparkles against the soft lighting.", "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": "blurry, low quality, still frame, frames, watermark, overlay, titles, has "
                                       "blurbox, has subtitles", "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader(LTX2_CKPT)),
        (6, "LTXVConditioning", {"positive": link(2), "negative": link(3), "frame_rate": 24.0}),
        (7, "EmptyLTXVLatentVideo", {"width": 640, "height": 352, "length": 121, "batch_size": 1}),
        (8, "LTXVAudioVAELoader", {"ckpt_name": LTX2_CKPT}),
        (9, "LTXVEmptyLatentAudio", {"frames_number": 121, "frame_rate": 24.0, "batch_size": 1,
                                     "audio_vae": link(8)}),
        (10, "LTXVConcatAVLatent", {"video_latent": link(7), "audio_latent": link(9)}),
        (11, "RandomNoise", {"noise_seed": 10}),
        (12, "KSamplerSelect", {"sampler_name": "euler_ancestral"}),
        (13, "LTXVScheduler", {"steps": 20, "max_shift": 2.05, "base_shift": 0.95, "stretch": True, "terminal": 0.1,
                               "latent": link(10)}),
        (14, "CFGGuider", {"model": link(5), "positive": link(6, 0), "negative": link(6, 1), "cfg": 4.0}),
        (15, "SamplerCustomAdvanced", {"noise": link(11), "guider": link(14), "sampler": link(12), "sigmas": link(13),
                                       "latent_image": link(10)}),
        (16, "LTXVSeparateAVLatent", {"av_latent": link(15)}),
        (17, "ParallelVAELoader", parallel_vae_loader(LTX2_CKPT)),
        (18, "VAEDecodeTiled", {"samples": link(16, 0), "vae": link(17), "tile_size": 512, "overlap": 64,
                                "temporal_size": 4096, "temporal_overlap": 8}),
        (19, "SaveAnimatedWEBP", {"images": link(18), "filename_prefix": "parallel_dit/ltx2_t2v", "fps": 24.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
        (20, "LTXVAudioVAEDecode", {"samples": link(16, 1), "audio_vae": link(8)}),
        (21, "SaveAudio", {"audio": link(20), "filename_prefix": "parallel_dit/ltx2_t2v"}),
    ],
}

# MiniMax H3 text-to-video with audio (ComfyUI 0.33+): ComfyUI's own template (video_minimax_h3_t2v: Qwen3-VL through
# CLIPLoader `minimax`, MiniMaxH3ImageToVideo's prompt and [video, audio] latent, 20 res_multistep steps with
# BasicScheduler and BasicGuider, each stream decoded by its VAE) with only Load Diffusion Model swapped for the
# pack's two nodes; its 8-step turbo LoRA path (off in the template) left out, the template's ResolutionSelector
# (16:9, 0.4 MP) and 5-second length as their values; an animated WEBP and the audio as a FLAC file instead of
# CreateVideo + SaveVideo. Give MiniMaxH3ImageToVideo a first_frame (and last_frame) for image-to-video.
MINIMAX_H3_T2V = {
    "title": "MiniMax H3 text-to-video with audio on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", {"clip_name": "qwen3vl_32b_minimax_h3_nvfp4_awq.safetensors", "type": "minimax",
                           "device": "default"}),
        (2, "VAELoader", {"vae_name": "minimax_h3_video_vae_int8_convrot.safetensors"}),
        (3, "VAELoader", {"vae_name": "minimax_h3_audio_vae_fp32.safetensors"}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("minimax_h3_fl2va_pruned_int8_convrot.safetensors")),
        (6, "MiniMaxH3ImageToVideo", {"clip": link(1), "vae": link(2), "prompt": "Realistic live-action cinematic "
                                      "look: at dusk on a cluster of skyscrapers, the protagonist sprints and leaps "
                                      "across rooftops with pursuers closing in behind, anamorphic lens, film grain, "
                                      "city volumetric fog. Audio: wind, rapid footsteps, a low score, an accent hit "
                                      "on each leap.", "width": 832, "height": 480, "length": 124}),
        (7, "RandomNoise", {"noise_seed": 42}),
        (8, "KSamplerSelect", {"sampler_name": "res_multistep"}),
        (9, "BasicScheduler", {"model": link(5), "scheduler": "simple", "steps": 20, "denoise": 1.0}),
        (10, "BasicGuider", {"model": link(5), "conditioning": link(6, 0)}),
        (11, "SamplerCustomAdvanced", {"noise": link(7), "guider": link(10), "sampler": link(8), "sigmas": link(9),
                                       "latent_image": link(6, 1)}),
        (12, "VAEDecode", {"samples": link(11), "vae": link(2)}),
        (13, "SaveAnimatedWEBP", {"images": link(12), "filename_prefix": "parallel_dit/minimax_h3_t2v", "fps": 24.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
        (14, "VAEDecodeAudio", {"samples": link(11), "vae": link(3)}),
        (15, "SaveAudio", {"audio": link(14), "filename_prefix": "parallel_dit/minimax_h3_t2v"}),
    ],
}

# Wan 2.1 image-to-video (480p / 720p I2V files): ComfyUI's native I2V graph, CLIP vision of the start image
# and WanImageToVideo's conditioning, with the pack's three nodes in place of Load Diffusion Model and KSampler.
# For first-last-frame, load an FLF2V file and use WanFirstLastFrameToVideo instead of WanImageToVideo.
WAN21_I2V = {
    "title": "Wan 2.1 image-to-video on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", dict(UMT5)),
        (2, "CLIPTextEncode", {"text": "the woman in the picture turns towards the camera and smiles, gentle wind",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": NEGATIVE, "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("wan2.1_i2v_480p_14B_bf16.safetensors")),
        (6, "CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"}),
        (7, "LoadImage", {"image": "example.png"}),
        (8, "CLIPVisionEncode", {"clip_vision": link(6), "image": link(7), "crop": "none"}),
        (9, "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        (10, "WanImageToVideo", {"positive": link(2), "negative": link(3), "vae": link(9), "width": 832,
                                 "height": 480, "length": 33, "batch_size": 1, "clip_vision_output": link(8),
                                 "start_image": link(7)}),
        (11, "ParallelSampler", {"model": link(5), "seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                                 "scheduler": "simple", "positive": link(10, 0), "negative": link(10, 1),
                                 "latent_image": link(10, 2), "denoise": 1.0}),
        (12, "VAEDecode", {"samples": link(11), "vae": link(9)}),
        (13, "SaveAnimatedWEBP", {"images": link(12), "filename_prefix": "parallel_dit/wan21_i2v", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# Wan 2.1 VACE 14B (reference-to-video; add a control video / masks to WanVaceToVideo for v2v, inpainting,
# outpainting): ComfyUI's native VACE graph, native KSampler included, with only Load Diffusion Model swapped for
# the pack's two nodes. WanVaceToVideo prepends the reference image as latent frames; TrimVideoLatent cuts them off.
WAN21_VACE = {
    "title": "Wan 2.1 VACE reference-to-video on a parallel worker group",
    "nodes": [
        (1, "CLIPLoader", dict(UMT5)),
        (2, "CLIPTextEncode", {"text": "the toy robot from the reference walks across a wooden desk, soft daylight",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": NEGATIVE, "clip": link(1)}),
        (4, "ParallelConfig", parallel_config()),
        (5, "ParallelModelLoader", parallel_loader("wan2.1_vace_14B_fp16.safetensors")),
        (6, "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        (7, "LoadImage", {"image": "example.png"}),
        (8, "WanVaceToVideo", {"positive": link(2), "negative": link(3), "vae": link(6), "width": 832,
                               "height": 480, "length": 49, "batch_size": 1, "strength": 1.0,
                               "reference_image": link(7)}),
        (9, "KSampler", {"model": link(5), "seed": 42, "steps": 20, "cfg": 5.0, "sampler_name": "uni_pc",
                         "scheduler": "simple", "positive": link(8, 0), "negative": link(8, 1),
                         "latent_image": link(8, 2), "denoise": 1.0}),
        (10, "TrimVideoLatent", {"samples": link(9), "trim_amount": link(8, 3)}),
        (11, "VAEDecode", {"samples": link(10), "vae": link(6)}),
        (12, "SaveAnimatedWEBP", {"images": link(11), "filename_prefix": "parallel_dit/wan21_vace", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# Wan 2.1 T2V 14B as a GGUF (city96's Q8_0, 15 GB: over a 16 GB card once the runtime is counted) on two 16 GB
# cards: the blocks' weights sharded over both (each holds half and gathers a block as it runs), the quantized
# linears kept quantized on the ranks. Swap Unet Loader (GGUF) for Parallel Model Loader; the rest is native.
WAN21_T2V_GGUF = {
    "title": "Wan 2.1 T2V 14B GGUF (Q8_0) with sharded weights on two GPUs",
    "nodes": [
        (1, "CLIPLoader", dict(UMT5)),
        (2, "CLIPTextEncode", {"text": "a red fox running through fresh snow, golden hour, cinematic",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": NEGATIVE, "clip": link(1)}),
        (4, "ParallelConfig", parallel_config(weights="sharded")),
        (5, "ParallelModelLoader", parallel_loader("wan2.1-t2v-14b-Q8_0.gguf")),
        (6, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        (7, "KSampler", {"model": link(5), "seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                         "scheduler": "simple", "positive": link(2), "negative": link(3), "latent_image": link(6),
                         "denoise": 1.0}),
        (8, "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        (9, "VAEDecode", {"samples": link(7), "vae": link(8)}),
        (10, "SaveAnimatedWEBP", {"images": link(9), "filename_prefix": "parallel_dit/wan21_t2v_gguf", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}),
    ],
}

# Two machines of 8 GPUs: this ComfyUI machine is node 0 (10.0.0.1 on the fast network); the other runs
# `python -m parallel_backend.runtime.node --rendezvous 10.0.0.1:29500 --node-rank 1 --nodes 2 --nproc-per-node 8
# --secret-file ~/pdit.secret` (README "Several machines"). Degrees auto: cfg 2 across the machines, ulysses 8 inside.
WAN21_T2V_TWO_NODES = {
    "title": "Wan 2.1 T2V 14B on two machines x 8 GPUs (cfg across, ulysses inside)",
    "nodes": [
        (1, "CLIPLoader", dict(UMT5)),
        (2, "CLIPTextEncode", {"text": "a red fox running through fresh snow, golden hour, cinematic",
                               "clip": link(1)}),
        (3, "CLIPTextEncode", {"text": NEGATIVE, "clip": link(1)}),
        (4, "ParallelConfig", parallel_config(world_size=16, nodes=2, ranks_per_node=8,
                                               rendezvous="10.0.0.1:29500", secret_file="~/pdit.secret")),
        (5, "ParallelModelLoader", parallel_loader("wan2.1_t2v_14B_bf16.safetensors")),
        (6, "EmptyHunyuanLatentVideo", {"width": 1280, "height": 720, "length": 81, "batch_size": 1}),
        (7, "KSampler", {"model": link(5), "seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                         "scheduler": "simple", "positive": link(2), "negative": link(3), "latent_image": link(6),
                         "denoise": 1.0}),
        (8, "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
        (9, "VAEDecode", {"samples": link(7), "vae": link(8)}),
        (10, "SaveAnimatedWEBP", {"images": link(9), "filename_prefix": "parallel_dit/wan21_t2v_two_nodes",
                                  "fps": 16.0, "lossless": False, "quality": 90, "method": "default"}),
    ],
}

WORKFLOWS = {"wan21_t2v_parallel": WAN21_T2V, "wan21_t2v_two_nodes_parallel": WAN21_T2V_TWO_NODES, "wan21_t2v_gguf_sharded_parallel": WAN21_T2V_GGUF, "wan21_i2v_parallel": WAN21_I2V, "wan22_a14b_t2v_parallel": WAN22_A14B_T2V,
             "wan22_ti2v_5b_parallel": WAN22_TI2V_5B, "cosmos_predict2_t2i_parallel": COSMOS_PREDICT2_T2I,
             "wan21_vace_parallel": WAN21_VACE, "cosmos1_t2w_parallel": COSMOS1_T2W,
             "ltxv_t2v_parallel": LTXV_T2V,
             "hunyuan_video15_t2v_parallel": HUNYUAN15_T2V, "hunyuan_video15_i2v_parallel": HUNYUAN15_I2V,
             "kandinsky5_t2v_parallel": KANDINSKY5_T2V,
             "ltx2_t2v_parallel": LTX2_T2V, "minimax_h3_t2v_parallel": MINIMAX_H3_T2V}


def spec_from_api(api: dict, title: str) -> dict:
    """The inverse of to_api: lets a test lay out a rewritten API graph for the browser."""
    nodes = []
    for nid in sorted(api, key=int):
        node = api[nid]
        inputs = {k: (link(int(v[0]), v[1]) if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        nodes.append((int(nid), node["class_type"], inputs))
    return {"title": title, "nodes": nodes}


def to_api(spec: dict) -> dict:
    api = {}
    for nid, cls, inputs in spec["nodes"]:
        api[str(nid)] = {"class_type": cls, "_meta": {"title": cls},
                         "inputs": {k: ([str(v[1]), v[2]] if isinstance(v, tuple) else v) for k, v in inputs.items()}}
    return api


def to_ui(spec: dict) -> dict:
    """litegraph workflow JSON (version 0.4) as the ComfyUI frontend saves it."""
    nodes, links, link_id = [], [], 0
    out_links = {}  # (node, slot) -> [link ids]
    in_links = {}   # (node, input name) -> link id
    types = {nid: cls for nid, cls, _ in spec["nodes"]}
    for nid, cls, inputs in spec["nodes"]:
        for name, v in inputs.items():
            if isinstance(v, tuple):
                link_id += 1
                src, slot = v[1], v[2]
                links.append([link_id, src, slot, nid, None, OUTPUTS[types[src]][slot][1]])
                out_links.setdefault((src, slot), []).append(link_id)
                in_links[(nid, name)] = link_id
    for i, (nid, cls, inputs) in enumerate(spec["nodes"]):
        ui_inputs, widgets = [], []
        for name, v in inputs.items():
            if isinstance(v, tuple):
                lid = in_links[(nid, name)]
                ltype = next(l[5] for l in links if l[0] == lid)
                for l in links:
                    if l[0] == lid:
                        l[4] = len(ui_inputs)
                ui_inputs.append({"name": name, "type": ltype, "link": lid})
                if (cls, name) in LINKED_WIDGETS:
                    ui_inputs[-1]["widget"] = {"name": name}
                    widgets.append(LINKED_WIDGETS[(cls, name)])
            else:
                widgets.append(v)
                if (cls, name) in SEED_WIDGETS:
                    widgets.append("fixed")
                if (cls, name) in TRAILING_UI_VALUES:
                    widgets.append(TRAILING_UI_VALUES[(cls, name)])
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, s), []), "slot_index": s}
                   for s, (n, t) in enumerate(OUTPUTS[cls])]
        # tall enough for its slots and widgets (a prompt text box gets room), so nodes do not overlap
        height = 30 + 22 * max(len(ui_inputs), len(outputs)) + 26 * len(widgets) + (90 if "text" in inputs else 0)
        nodes.append({"id": nid, "type": cls, "pos": [0, 0], "size": [300, max(80, height)],
                      "flags": {}, "order": i, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": cls}, "widgets_values": widgets})
    y = 80
    for row in range(0, len(nodes), 4):  # four nodes a row, in graph order
        for col, node in enumerate(nodes[row:row + 4]):
            node["pos"] = [60 + 330 * col, y]
        y += max(n["size"][1] for n in nodes[row:row + 4]) + 50
    return {"last_node_id": max(types), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"title": spec["title"]}, "version": 0.4}


def main():
    for name, spec in WORKFLOWS.items():
        for suffix, data in (("", to_ui(spec)), ("_api", to_api(spec))):
            with open(os.path.join(HERE, f"{name}{suffix}.json"), "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")


if __name__ == "__main__":
    main()
