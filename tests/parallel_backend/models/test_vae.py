"""Parallel VAE shares (parallel_backend/models/vae.py) on 1, 2 and 3 CPU ranks against ComfyUI's own tiled decode and
encode of the same file: the ranks' shares summed, then ComfyUI's process_output, must equal `vae.decode_tiled` /
`vae.encode_tiled` with the same tile settings to TOL (fp32). Tile grids of 10 and 6 tiles (time x width; 10 = 5 / 5 and
4 / 3 / 3 over the ranks), encode grids of 5 and 3 and one tile per batch row (a latent smaller than a tile: rank 2 of 3 gets none).

Tiny random Wan 2.1 (width 16), Wan 2.2 (ComfyUI's class narrowed to width 16 / 32: its detection fixes the
release widths), HunyuanVideo 1.0 (Kandinsky 5's too; AutoencoderKL with 3-D convs, width 32), HunyuanVideo 1.5
(the vae_refiner autoencoder, widths 8..64), Cosmos 1.0 (its wavelet tokenizer, width 16) and LTX-2 (ComfyUI's
VideoVAE from the file's config, base width 8) VAE files (synthetic.tiny_vae_widths narrows ComfyUI's detection); ranks
forked once per world size (module fixtures). A VAE of ComfyUI's generic classes that is none of those (an SD / Flux
image VAE) is refused by its kind.
"""
from __future__ import annotations

import pytest
import torch

from parallel_backend.config import ParallelConfig

pytestmark = pytest.mark.multirank
TOL = 1e-5
# name -> (version, latent shape, decode_tiled keywords, pixel frames x height x width to encode, encode keywords)
CASES = {
    "wan21_grid": ("2.1", (1, 16, 3, 4, 16), dict(tile_x=4, tile_y=4, overlap=1, tile_t=2, overlap_t=1),
                   (5, 32, 128), dict(tile_x=32, tile_y=32, overlap=8, tile_t=4, overlap_t=4)),
    "wan21_batch2_one_tile": ("2.1", (2, 16, 2, 4, 4), dict(tile_x=8, tile_y=8, overlap=2, tile_t=4, overlap_t=1),
                              None, None),
    "wan22_grid": ("2.2", (1, 48, 3, 2, 7), dict(tile_x=3, tile_y=3, overlap=1, tile_t=2, overlap_t=1),
                   (5, 32, 64), dict(tile_x=32, tile_y=32, overlap=16, tile_t=4, overlap_t=4)),
    # HunyuanVideo 1.0 (Kandinsky 5's too) and 1.5: 5 decode tiles (2 / 2 / 1 on 3 ranks), 4 and 2 encode tiles
    "hunyuan_video_grid": ("hv1.0", (1, 16, 3, 2, 6), dict(tile_x=2, tile_y=2, overlap=1, tile_t=4, overlap_t=1),
                           (5, 16, 40), dict(tile_x=16, tile_y=16, overlap=8, tile_t=4, overlap_t=4)),
    "hunyuan_video15_grid": ("hv1.5", (1, 32, 3, 2, 6), dict(tile_x=2, tile_y=2, overlap=1, tile_t=4, overlap_t=1),
                             (5, 32, 48), dict(tile_x=32, tile_y=32, overlap=16, tile_t=4, overlap_t=4)),
    # Cosmos 1.0's tokenizer (8x in time and space): 4 decode tiles (2 / 1 / 1 on 3 ranks), 6 encode tiles
    "cosmos1_grid": ("c1.0", (1, 16, 3, 4, 6), dict(tile_x=4, tile_y=4, overlap=1, tile_t=2, overlap_t=1),
                     (9, 32, 64), dict(tile_x=32, tile_y=32, overlap=8, tile_t=8, overlap_t=4)),
    # LTX-2's video VAE (8x time, 32x space, 128 channels; its decoder draws no noise): 4 decode, 2 encode tiles
    "ltx2_grid": ("ltx2", (1, 128, 3, 2, 3), dict(tile_x=2, tile_y=2, overlap=1, tile_t=2, overlap_t=1),
                  (9, 64, 96), dict(tile_x=64, tile_y=64, overlap=32, tile_t=16, overlap_t=8)),
}


def _inputs(name):
    version, shape, _, pixels, _ = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    latent = torch.randn(shape, generator=g)
    image = None if pixels is None else torch.rand((*pixels, 3), generator=g)
    return latent, image


def _host_vae(path, version, device):
    from parallel_backend.models.vae import build_host_vae
    from parallel_backend.testing.synthetic import tiny_vae_widths
    with tiny_vae_widths():
        return build_host_vae(path, "fp32", device)


def _rank_fn(mesh, paths):
    from parallel_backend.models.host import import_host
    import_host("cpu")
    from parallel_backend.models.vae import decode_share, encode_share

    world, out = mesh.config.world_size, {}
    for name, (version, _, dec, _, enc) in CASES.items():
        vae = _host_vae(paths[version], version, mesh.device)
        latent, image = _inputs(name)
        calls = []
        with torch.inference_mode():
            out[name] = {"decode": decode_share(vae, latent, dec, mesh.rank, world, on_tile=lambda: calls.append(1)),
                         "tiles": len(calls)}
            if image is not None:
                out[name]["encode"] = encode_share(vae, image, enc, mesh.rank, world)
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    import comfy_host
    comfy_host.import_comfy()
    from parallel_backend.testing.synthetic import (write_tiny_cosmos1_vae, write_tiny_hunyuan_video_vae,
                                                    write_tiny_ltx_vae, write_tiny_wan_vae)
    d = tmp_path_factory.mktemp("vae")
    paths = {v: write_tiny_wan_vae(str(d / f"wan{v}_vae.safetensors"), version=v) for v in ("2.1", "2.2")}
    for v in ("1.0", "1.5"):
        paths["hv" + v] = write_tiny_hunyuan_video_vae(str(d / f"hunyuan_video{v}_vae.safetensors"), version=v)
    paths["c1.0"] = write_tiny_cosmos1_vae(str(d / "cosmos_cv8x8x8_1.0.safetensors"))
    paths["ltx2"] = write_tiny_ltx_vae(str(d / "ltx2_video_vae.safetensors"))
    return paths


@pytest.fixture(scope="module")
def native(paths):
    """ComfyUI's own results: decode_tiled / encode_tiled with the same settings."""
    out = {}
    for name, (version, _, dec, _, enc) in CASES.items():
        vae = _host_vae(paths[version], version, torch.device("cpu"))
        vae.output_device = torch.device("cpu")
        latent, image = _inputs(name)
        with torch.inference_mode():  # as ComfyUI runs its nodes
            out[name] = {"decode_tiled": vae.decode_tiled(latent, **dec),
                         "process_output": vae.process_output}
            if image is not None:
                out[name]["encode_tiled"] = vae.encode_tiled(image, **enc)
    return out


@pytest.fixture(scope="module", params=[1, 2, 3])
def ranks(request, paths):
    from parallel_backend.testing.spmd import run_on_ranks
    return run_on_ranks(_rank_fn, ParallelConfig(world_size=request.param, ulysses=request.param, device="cpu", dtype="fp32"), paths,
                        timeout=600)


@pytest.mark.parametrize("name", list(CASES))
def test_shares_sum_to_comfyuis_tiled_decode_and_encode(ranks, native, name):
    ref = native[name]
    decoded = ref["process_output"](sum(r[name]["decode"] for r in ranks)).movedim(1, -1)
    assert decoded.shape == ref["decode_tiled"].shape
    err = (decoded - ref["decode_tiled"]).abs().max().item()
    assert err <= TOL, f"{name} on {len(ranks)} ranks: decode {err:.2e} from ComfyUI's decode_tiled"
    assert len({r[name]["tiles"] for r in ranks}) == 1  # every rank passes every tile (Cancel stops all at one)
    if "encode_tiled" in ref:
        encoded = sum(r[name]["encode"] for r in ranks)
        err = (encoded - ref["encode_tiled"]).abs().max().item()
        assert err <= TOL, f"{name} on {len(ranks)} ranks: encode {err:.2e} from ComfyUI's encode_tiled"


def test_a_vae_the_pack_cannot_split_is_refused_by_name():
    import torch.nn as nn

    from parallel_backend.models.vae import VAERefused, split_of
    with pytest.raises(VAERefused, match=r"cannot split this VAE \(torch.nn.modules.linear.Linear\).*Load VAE"):
        split_of(nn.Linear(2, 2))


def test_a_vae_that_draws_noise_in_its_decode_is_refused_with_the_reason(tmp_path):
    """LTX-Video 0.9.1+'s VAE (ComfyUI's VideoVAE, timestep-conditioned by its config) adds torch.randn noise to every
    decode: refused, the reason named; LTX-2's (same class, no conditioning) splits (ltx2_grid above)."""
    import comfy_host
    comfy_host.import_comfy()
    from parallel_backend.models.vae import VAERefused, build_host_vae
    from parallel_backend.testing.synthetic import write_tiny_ltx_vae
    path = write_tiny_ltx_vae(str(tmp_path / "ltxv_0.9.5_vae.safetensors"), timestep_conditioning=True)
    with pytest.raises(VAERefused, match=r"VideoVAE\[noise\]\): LTX-Video 0.9.1\+'s timestep-conditioned decoder "
                                         r"adds unseeded noise.*Load VAE"):
        build_host_vae(path, "fp32", torch.device("cpu"))


def test_an_image_vae_of_comfyuis_generic_class_is_refused_by_its_kind():
    """SD / Flux VAEs share AutoencoderKL / AutoencodingEngine with HunyuanVideo's: their 2-D decoder is not split."""
    import comfy_host
    comfy_host.import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from parallel_backend.models.vae import VAERefused, split_of
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        sd_vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    with pytest.raises(VAERefused, match=r"\(comfy.ldm.models.autoencoder.AutoencoderKL\[comfy.ldm.modules."
                                         r"diffusionmodules.model.Decoder\]\).*HunyuanVideo 1.5 VAE"):
        split_of(sd_vae)
