"""Parallel VAE Loader in-process: ComfyUI's own VAE Decode (Tiled), VAE Decode and VAE Encode nodes on the pack's VAE
(2 CPU ranks) against the same nodes on ComfyUI's Load VAE of the same tiny Wan 2.1 file."""
import pytest
import torch

pytestmark = pytest.mark.multirank
TOL = 1e-5
TILED = dict(tile_size=64, overlap=16, temporal_size=8, temporal_overlap=4)  # latent tiles 8 x 8 x 2: 6 tiles here


@pytest.fixture(scope="module")
def vaes(comfy, pack, tmp_path_factory):
    import nodes as comfy_nodes

    from parallel_backend.testing.synthetic import write_tiny_wan_vae
    d = tmp_path_factory.mktemp("vae")
    write_tiny_wan_vae(str(d / "tiny_wan21_vae.safetensors"))
    comfy["folder_paths"].add_model_folder_path("vae", str(d))
    native = comfy_nodes.VAELoader().load_vae("tiny_wan21_vae.safetensors")[0]
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(2, 1, 1, 1, 1, 2, "fp32", "cpu", "sdpa")[0]
    ours = pack.NODE_CLASS_MAPPINGS["ParallelVAELoader"]().load("tiny_wan21_vae.safetensors", "fp32", spec)[0]
    yield native, ours
    import parallel_backend.runtime.group as group
    group.stop_all()


def _latent(shape):
    return {"samples": torch.randn(shape, generator=torch.Generator().manual_seed(3))}


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.inference_mode()  # as ComfyUI's executor runs nodes
def test_vae_decode_tiled_matches_native_and_holds_no_weights(vaes):
    import nodes as comfy_nodes
    native, ours = vaes
    assert sum(p.numel() for p in ours.first_stage_model.parameters()) == 0
    latent = _latent((1, 16, 3, 8, 20))
    ref = comfy_nodes.VAEDecodeTiled().decode(native, latent, **TILED)[0]
    out = comfy_nodes.VAEDecodeTiled().decode(ours, latent, **TILED)[0]
    assert _max_diff(out, ref) <= TOL
    with pytest.raises(RuntimeError, match="runs on the parallel worker group"):
        ours.first_stage_model.decode(latent["samples"])


@torch.inference_mode()
def test_plain_decode_and_encode_are_the_tiled_nodes_with_their_defaults(vaes):
    import nodes as comfy_nodes
    native, ours = vaes
    latent = _latent((1, 16, 2, 6, 10))
    defaults = dict(tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8)
    out = comfy_nodes.VAEDecode().decode(ours, latent)[0]
    assert _max_diff(out, comfy_nodes.VAEDecodeTiled().decode(native, latent, **defaults)[0]) <= TOL
    # one tile at this size: plain decode equals ComfyUI's untiled decode too
    assert _max_diff(out, comfy_nodes.VAEDecode().decode(native, latent)[0]) <= TOL
    image = out[:5]
    enc = comfy_nodes.VAEEncode().encode(ours, image)[0]["samples"]
    ref = comfy_nodes.VAEEncodeTiled().encode(native, image, 512, 64, 64, 8)[0]["samples"]
    assert _max_diff(enc, ref) <= TOL


def test_cancel_stops_between_tiles_and_the_group_stays_warm(vaes):
    import comfy.model_management as mm

    import nodes as comfy_nodes
    import parallel_backend.runtime.group as group
    native, ours = vaes
    latent = _latent((1, 16, 3, 8, 20))
    g = group.active_groups()[0]
    mm.interrupt_current_processing(True)  # Cancel pressed: the ranks stop at the first tile they all reach
    try:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            comfy_nodes.VAEDecodeTiled().decode(ours, latent, **TILED)
    finally:
        mm.interrupt_current_processing(False)
    assert g.alive() and group.active_groups() == [g]
    with torch.inference_mode():
        out = comfy_nodes.VAEDecodeTiled().decode(ours, latent, **TILED)[0]
        ref = comfy_nodes.VAEDecodeTiled().decode(native, latent, **TILED)[0]
    assert _max_diff(out, ref) <= TOL


@torch.inference_mode()
def test_ltx2_video_vae_decodes_and_encodes_as_comfyuis_tiled_nodes(vaes, comfy, pack, tmp_path):
    """LTX-2's video VAE (ComfyUI builds it from the file's config; its decoder draws no noise) on the same ranks: VAE
    Decode (Tiled) over 16 tiles (latent tiles 2 x 2 x 2, stride 1) and VAE Encode equal the native nodes on ComfyUI's
    VAE of the same file with its config (what 0.33's Load VAE builds; 0.3.75's Load VAE ignores a file's config)."""
    from comfy import sd as comfy_sd
    from comfy import utils as comfy_utils

    import nodes as comfy_nodes
    from parallel_backend.testing.synthetic import write_tiny_ltx_vae
    path = write_tiny_ltx_vae(str(tmp_path / "tiny_ltx2_video_vae.safetensors"))
    comfy["folder_paths"].add_model_folder_path("vae", str(tmp_path))
    sd, metadata = comfy_utils.load_torch_file(path, return_metadata=True)
    native = comfy_sd.VAE(sd=sd, metadata=metadata)
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(2, 1, 1, 1, 1, 2, "fp32", "cpu", "sdpa")[0]
    ours = pack.NODE_CLASS_MAPPINGS["ParallelVAELoader"]().load("tiny_ltx2_video_vae.safetensors", "fp32", spec)[0]
    latent = _latent((1, 128, 3, 3, 5))
    tiles = dict(tile_size=64, overlap=32, temporal_size=16, temporal_overlap=8)  # in latent units 2, 1, 2, 1
    out = comfy_nodes.VAEDecodeTiled().decode(ours, latent, **tiles)[0]
    assert _max_diff(out, comfy_nodes.VAEDecodeTiled().decode(native, latent, **tiles)[0]) <= TOL
    image = out[:9]
    enc = comfy_nodes.VAEEncode().encode(ours, image)[0]["samples"]
    assert _max_diff(enc, comfy_nodes.VAEEncodeTiled().encode(native, image, 512, 64, 64, 8)[0]["samples"]) <= TOL


def test_a_rank_that_dies_during_a_decode_is_named(vaes):
    import os
    import signal
    import threading

    import nodes as comfy_nodes
    import parallel_backend.runtime.group as group
    _, ours = vaes
    g = group.active_groups()[0]
    threading.Timer(0.5, os.kill, (g.pids[1], signal.SIGKILL)).start()
    with pytest.raises(group.WorkerGroupError, match=r"rank 1 of .* died during vae_tiles \(was killed by signal "
                                                     r"SIGKILL\)"), torch.inference_mode():
        comfy_nodes.VAEDecodeTiled().decode(ours, _latent((1, 16, 5, 8, 44)), **TILED)
    assert not g.alive()
