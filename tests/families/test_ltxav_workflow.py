"""The shipped LTX-2 (audio + video) workflow through a real headless ComfyUI queue on 2 CPU ranks (ulysses2), equal to
the same graph with ComfyUI's native Load Diffusion Model (same seed, conditioning and latents): only the loader
differs.

ComfyUI 0.33's own loader detects the tiny LTX-2 file (its metadata config gives the tiny text and audio widths), so
the oracle is the native UNETLoader. The graph is the shipped one (ComfyUI's LTX-2 template's first pass:
EmptyLTXVLatentVideo and LTXVEmptyLatentAudio joined by LTXVConcatAVLatent, LTXVConditioning's frame rate,
LTXVScheduler, CFGGuider at cfg 4 and euler_ancestral in SamplerCustomAdvanced, LTXVSeparateAVLatent) with the
Gemma text encoder replaced by the test conditioning node (raw text of 12 and 9 tokens without a mask, as LTX-2's
encoder gives it; the connectors run on the ranks), the audio VAE by the test VAE (its latent shape), a 96 x 160 x 17
video (45 tokens, ragged on 2 ranks; 7 audio tokens), 4 steps, and both latents saved. The file is all-in-one, as the
release: the tiny DiT and a tiny LTX-2 video VAE under vae.* (synthetic.write_all_in_one). Its video decode runs as
shipped, on the Parallel VAE Loader reading the file's vae.* tensors on the DiT's ranks (smaller tiles, so both ranks
decode): the frames equal CheckpointLoaderSimple's VAE + VAE Decode (Tiled) at the same tiles. On a ComfyUI without
LTXAVModel (0.3.75) the shipped graph's LTX-2 nodes are missing and the loader refuses the file by class name.
"""
import pytest

import comfy_host
from parallel_backend.testing.synthetic import LTXAV_PRESETS, write_all_in_one, write_tiny_ltx_vae, write_tiny_ltxav

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_ltx2.safetensors"
TOL = 1e-4  # sampled latent, parallel vs native (fp32, 4 steps)
TEXT = LTXAV_PRESETS["tiny"]["caption_channels"]  # the raw (unprocessed) text width the connectors take
SHIPPED = "ltx2_t2v_parallel"
# the shipped graph's nodes ComfyUI 0.3.75 lacks: no LTX-2 there, and SaveAudio's module needs torchaudio, which the
# 0.3.75 test venv does not install
LTX2_NODES = ["LTXAVTextEncoderLoader", "LTXVAudioVAEDecode", "LTXVAudioVAELoader", "LTXVConcatAVLatent",
              "LTXVEmptyLatentAudio", "LTXVSeparateAVLatent", "SaveAudio"]
DROPPED = ("LTXAVTextEncoderLoader", "SaveAnimatedWEBP", "LTXVAudioVAEDecode", "SaveAudio")
DECODE_TILES = dict(tile_size=64, overlap=32, temporal_size=16, temporal_overlap=8)  # 2 x 2 x 2 latent tiles


def _tiny(shipped: dict, prefix: str) -> dict:
    """The shipped graph made tiny for CPU ranks; the pack's nodes and every other node's wiring as shipped."""
    g = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in shipped.items()
         if v["class_type"] not in DROPPED}
    tokens = iter((12, 9))
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPTextEncode":
            g[nid] = {"class_type": "PditTestConditioning", "inputs": {"seed": 100 + int(nid), "tokens": next(tokens),
                                                                       "width": TEXT}}
        elif ct == "LTXVAudioVAELoader":
            g[nid] = {"class_type": "PditTestVAE", "inputs": {"seed": 0, "kind": "ltx2-audio"}}
        elif ct == "ParallelConfig":
            inp.update(world_size=2, cfg=1, ulysses=2, ring=1, tp=1, dp=1, dtype="fp32", device="cpu")
        elif ct == "ParallelModelLoader":
            inp.update(model_name=MODEL, base_precision="fp32")
        elif ct == "EmptyLTXVLatentVideo":
            inp.update(width=96, height=160, length=17)
        elif ct == "LTXVEmptyLatentAudio":
            inp.update(frames_number=17)
        elif ct == "LTXVScheduler":
            inp.update(steps=4)
        elif ct == "ParallelVAELoader":
            inp.update(vae_name=MODEL, precision="fp32")
        elif ct == "VAEDecodeTiled":
            inp.update(DECODE_TILES)
            g["frames"] = {"class_type": "PditTestSaveImage", "inputs": {"images": [nid, 0],
                                                                         "filename_prefix": f"{prefix}_frames"}}
    split = next(k for k, v in g.items() if v["class_type"] == "LTXVSeparateAVLatent")
    for slot, stream in enumerate(("video", "audio")):
        g[f"save_{stream}"] = {"class_type": "SaveLatent", "inputs": {"samples": [split, slot],
                                                                      "filename_prefix": f"{prefix}_{stream}"}}
    return g


def _refused_without_ltx2(server, shipped):
    """0.3.75: the shipped graph's LTX-2 nodes are missing; the loader alone refuses the file by class name."""
    info = server.get("/object_info")
    assert sorted({v["class_type"] for v in shipped.values()} - set(info)) == LTX2_NODES
    comfy_host.refused_by_class(server, MODEL, TEXT,
                                {"class_type": "EmptyLTXVLatentVideo",
                                 "inputs": {"width": 96, "height": 160, "length": 17, "batch_size": 1}},
                                "LTXAVModel (LTX-2 audio + video), which this ComfyUI does not have")


def _native(parallel: dict) -> dict:
    """The oracle: UNETLoader for the DiT, CheckpointLoaderSimple's VAE of the same file for the video decode."""
    g = comfy_host.native_variant(parallel, "latents/native", replace="latents/parallel")
    vae = next(k for k, v in g.items() if v["class_type"] == "ParallelVAELoader")
    g[vae] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MODEL}}
    next(v for v in g.values() if v["class_type"] == "VAEDecodeTiled")["inputs"]["vae"] = [vae, 2]
    g["frames"]["inputs"]["filename_prefix"] = "latents/native_frames"
    return g


def test_shipped_ltx2_workflow_through_prompt_queue(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    comfy_host.import_comfy()
    dit, vae = write_tiny_ltxav(str(d / "dit.safetensors"), seed=41), write_tiny_ltx_vae(str(d / "vae.safetensors"))
    path = write_all_in_one(str(d / MODEL), dit, vae)  # as the release: DiT, VAE and config in one file
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [path], "vae": [path],
                                                              "checkpoints": [path]})
    shipped = comfy_host.load_workflow(SHIPPED + "_api.json")
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")
        if "LTXVEmptyLatentAudio" not in info:  # 0.3.75: no LTX-2 at all
            _refused_without_ltx2(server, shipped)
            return
        ui = comfy_host.load_workflow(SHIPPED + ".json")
        assert comfy_host.ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in shipped.items()}
        parallel = _tiny(shipped, "latents/parallel")
        runs = {}
        for name, graph in (("parallel", parallel), ("native", _native(parallel))):
            h = server.wait(server.queue(graph), timeout=300)
            assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
            runs[name] = [comfy_host.saved_latent(base, f"latents/{name}_{s}")[0] for s in ("video", "audio")]
        log = open(server.log_path).read()
        frames = comfy_host.frames_diff(base, "latents/parallel", "latents/native", (17, 160, 96, 3), TOL)
    diffs = []
    for out, ref, shape in zip(runs["parallel"], runs["native"], [(1, 128, 3, 5, 3), (1, 8, 5, 16)]):
        assert out.shape == ref.shape == shape
        assert out.abs().mean() > 0.1
        diffs.append((out - ref).abs().max().item())
    print(f"shipped LTX-2 workflow, 2 CPU ranks (ulysses2) vs native UNETLoader: video {diffs[0]:.2e}, "
          f"audio {diffs[1]:.2e}; its video decode on the Parallel VAE Loader (the file's vae.*) vs "
          f"CheckpointLoaderSimple's VAE: {frames:.2e}")
    assert max(diffs) <= TOL
    assert "as LTXAV on" in log, log[-3000:]
