"""nodes/fit.py in-process: a call's activations are ComfyUI's own estimate for the model class, asked of the pack's
MODEL exactly as ComfyUI asks its native one, and the declared latent's share per rank. No worker group starts."""
import os
import sys

import pytest


def _fit(pack):
    return sys.modules[pack.__name__ + ".nodes.fit"]


@pytest.mark.parametrize("shape", [(2, 16, 21, 60, 104), (1, 16, 1, 128, 128)])
def test_call_activations_are_comfyuis_own_estimate_of_the_native_model(comfy, pack, shape, no_new_processes):
    path = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    import comfy.sd  # (rebinds the `comfy` fixture's name)
    native = comfy.sd.load_diffusion_model(path)
    header = pack.nodes.engine.reads.read_header(path)
    model_config, sd, _ = pack.nodes.host_model.host_model_config("wan", path, "fp32", header)
    model_config.unet_config["disable_unet_model_creation"] = True
    base = model_config.get_model(sd, "")
    base.memory_required = lambda *a, **k: 0  # as the pack's MODEL answers ComfyUI's memory manager
    ours = _fit(pack).call_activations(base, shape)
    theirs = native.model.memory_required(shape)
    print(f"{shape}: pack {ours / 2**20:.1f} MiB, native ComfyUI {theirs / 2**20:.1f} MiB")
    assert ours == int(theirs) > 0
    assert _fit(pack).call_activations(None, shape) is None


def test_declared_latent_counts_cond_and_uncond_and_the_rank_share(comfy, pack, no_new_processes):
    from parallel_backend.config import ParallelConfig
    host_model = pack.nodes.host_model
    path = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    header = pack.nodes.engine.reads.read_header(path)

    def declared(config, latent):
        return _fit(pack).declared_activations(config, *host_model.host_model_config("wan", path, "fp32",
                                                                                      header)[:2], latent)
    one = declared(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), (1, 16, 5, 64, 64))
    two = declared(ParallelConfig(world_size=2, ulysses=2, device="cpu", dtype="fp32"), (1, 16, 5, 64, 64))
    assert one > 0 and abs(two - one / 2) <= 1  # each of 2 ranks holds half the tokens of both rows
    assert declared(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), None) == 0
