"""The shipped Wan 2.1 T2V workflow through a real headless ComfyUI with its VAE Decode fed by the Parallel VAE Loader
(the DiT's 2 CPU ranks decode), the decoded video encoded again by ComfyUI's VAE Encode on the same VAE and saved as a
latent; against the same graph on ComfyUI's Load VAE + VAE Decode (Tiled) / VAE Encode (Tiled) with those nodes'
default widgets (what the pack's plain decode / encode run) and the native DiT loader."""
import psutil
import pytest

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_wan, write_tiny_wan_vae

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL, VAE = "tiny_wan_vae_e2e.safetensors", "tiny_wan21_vae_e2e.safetensors"
TOL = 1e-4


def _with_vae(shipped: dict, graph: dict, prefix: str) -> dict:
    """The tiny CPU graph with the shipped VAE loader and VAE Decode put back (the test's tiny VAE file), the decoded
    frames encoded by VAE Encode on the same VAE and saved as a latent."""
    g = dict(graph)
    loader = next(k for k, v in shipped.items() if v["class_type"] == "ParallelVAELoader")
    decode = next(k for k, v in shipped.items() if v["class_type"] == "VAEDecode")
    g[loader] = {"class_type": "ParallelVAELoader", "inputs": {**shipped[loader]["inputs"], "vae_name": VAE,
                                                               "precision": "fp32"}}
    g[decode] = shipped[decode]
    g["90"] = {"class_type": "VAEEncode", "inputs": {"pixels": [decode, 0], "vae": [loader, 0]}}
    g["91"] = {"class_type": "SaveLatent", "inputs": {"samples": ["90", 0], "filename_prefix": prefix}}
    return g


def _native(g: dict, prefix: str) -> dict:
    g = comfy_host.native_vae_nodes(comfy_host.native_variant(g))
    g["91"]["inputs"]["filename_prefix"] = prefix
    return g


def test_shipped_workflow_decodes_on_the_dits_ranks(tmp_path):
    ckpt = write_tiny_wan(str(tmp_path / MODEL), seed=5)
    comfy_host.import_comfy()
    vae = write_tiny_wan_vae(str(tmp_path / VAE))
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [ckpt], "vae": [vae]})
    shipped = comfy_host.load_workflow("wan21_t2v_parallel_api.json")
    with comfy_host.ComfyServer(base) as server:
        info = server.get("/object_info")["ParallelVAELoader"]["input"]["required"]
        assert all(spec[1].get("tooltip") for spec in info.values())
        graph = _with_vae(shipped, comfy_host.tiny_cpu_variant(shipped, MODEL, seed=3), "latents/vae_parallel")
        h = server.wait(server.queue(graph), timeout=300)
        assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
        out, _ = comfy_host.saved_latent(base, "latents/vae_parallel")
        h = server.wait(server.queue(_native(graph, "latents/vae_native")), timeout=300)
        assert h["status"]["status_str"] == "success", (h["status"], server.log_tail())
        ref, _ = comfy_host.saved_latent(base, "latents/vae_native")
        assert out.shape == ref.shape == (1, 16, 2, 8, 8)
        diff = (out - ref).abs().max().item()
        print(f"sample + Parallel VAE decode / encode (2 ranks) vs native: max abs diff {diff:.2e}")
        assert diff <= TOL
        assert out.abs().mean() > 1e-3  # a real round trip, not zeros
        ranks = [c for c in psutil.Process(server.proc.pid).children(recursive=True)
                 if "multiprocessing" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
        assert len(ranks) == 2, "the VAE started another group beside the DiT's"
