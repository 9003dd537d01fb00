"""Bad input is refused by the nodes before any process starts, with a message naming the fix."""
import os
import pickle

import psutil
import pytest
import torch
from safetensors.torch import save_file



@pytest.fixture
def no_new_processes():
    import parallel_backend.group as group
    before = (group.starts, {c.pid for c in psutil.Process().children(recursive=True)})
    yield
    assert group.starts == before[0], "a worker group was started"
    new = {c.pid for c in psutil.Process().children(recursive=True)} - before[1]
    assert not [p for p in new if "resource_tracker" not in " ".join(psutil.Process(p).cmdline())]


def _loader(pack):
    return pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]()


def test_more_gpus_than_visible(comfy, pack, config_spec, no_new_processes):
    from parallel_backend.config import ConfigError
    with pytest.raises(ConfigError, match="no CUDA GPU is visible|set world_size to at most"):
        config_spec(world_size=2, device="cuda", ulysses=2)


def test_degrees_not_multiplying_to_world(comfy, pack, config_spec, no_new_processes):
    from parallel_backend.config import ConfigError
    with pytest.raises(ConfigError, match="set world_size to 4"):
        config_spec(world_size=2, ulysses=2, ring=2)
    node = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]
    validate = getattr(node, "validate_inputs", None) or node.VALIDATE_INPUTS  # V3 host, or classic
    assert "does not divide world_size" in validate(world_size=3, ulysses=2)


def test_heads_not_divisible_by_ulysses(comfy, pack, config_spec, no_new_processes):
    from parallel_backend.config import ConfigError
    spec = config_spec(world_size=3, ulysses=3)  # the tiny Wan has 4 heads
    with pytest.raises(ConfigError, match=r"4 attention heads.*ulysses x tp = 3 x 1.*\[1, 2, 4\]"):
        _loader(pack).load("tiny_wan.safetensors", "fp32", spec)


def test_not_a_dit_file(comfy, pack, config_spec, no_new_processes):
    from parallel_backend.models import UnsupportedModelError
    path = os.path.join(comfy["models_dir"], "some_vae.safetensors")
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)}, path)
    with pytest.raises(UnsupportedModelError, match=r"some_vae\.safetensors.*supported: wan"):
        _loader(pack).load("some_vae.safetensors", "fp32", config_spec(ulysses=2))


class _Booby:
    def __reduce__(self):
        return (open, (os.environ["PDIT_BOOBY_TRAP"], "w"))


def test_pickle_checkpoint_is_refused_unopened(comfy, pack, config_spec, tmp_path, monkeypatch, no_new_processes):
    from parallel_backend.loading import CheckpointError
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("PDIT_BOOBY_TRAP", str(marker))
    path = os.path.join(comfy["models_dir"], "evil.ckpt")
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Booby()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*pickle.*refused"):
        _loader(pack).load("evil.ckpt", "fp32", config_spec(ulysses=2))
    assert not marker.exists()


def test_truncated_file(comfy, pack, config_spec, no_new_processes):
    from parallel_backend.loading import CheckpointError
    src = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    dst = os.path.join(comfy["models_dir"], "truncated.safetensors")
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(os.path.getsize(src) // 2))
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors.*truncated"):
        _loader(pack).load("truncated.safetensors", "fp32", config_spec(ulysses=2))


@pytest.mark.multirank
def test_loader_never_reads_weights_in_the_comfyui_process(comfy, pack, config_spec, monkeypatch):
    """The ComfyUI process reads headers only: every way to read tensor data is booby-trapped here (the
    ranks are separate processes), and its peak RSS stays far below the file it loads."""
    import safetensors
    import safetensors.torch

    import parallel_backend.group as group
    from parallel_backend.synthetic import write_tiny_wan

    path = os.path.join(comfy["models_dir"], "medium_wan.safetensors")
    import comfy.utils  # (rebinds the `comfy` fixture's name)
    write_tiny_wan(path, dim=1536, ffn_dim=6144, dtype=torch.bfloat16, fill=0.01)  # 202 MB
    spec = config_spec(world_size=2, tp=2)
    _loader(pack).load("tiny_wan.safetensors", "fp32", spec)  # group started, imports done

    def refuse(*a, **k):
        raise AssertionError("the ComfyUI process tried to read tensor data")
    for mod, name in ((safetensors, "safe_open"), (safetensors.torch, "safe_open"), (safetensors.torch, "load_file"),
                      (safetensors.torch, "load"), (comfy.utils, "load_torch_file"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak RSS
    before = psutil.Process().memory_info().rss
    try:
        model, _ = _loader(pack).load("medium_wan.safetensors", "bf16", spec)
        import sys
        proxy = sys.modules[pack.__name__ + ".nodes.comfy_model"].parallel_model_of(model)
        proxy.group()  # what the sampler's first model call does (the loader may defer a swap to it)
        with open("/proc/self/status") as f:
            peak = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
        g = group.active_groups()[0]
        ranks = g.rank_load_stats
        print(f"ComfyUI process peak RSS while loading a {os.path.getsize(path) >> 20} MiB file: "
              f"+{(peak - before) / 2**20:.1f} MiB; ranks hold {[r['param_bytes'] >> 20 for r in ranks]} MiB")
        assert peak - before < 32 * 2**20
        assert all(r["param_bytes"] > 100 * 2**20 for r in ranks) and model is not None
    finally:
        monkeypatch.undo()
        group.stop_all()


@pytest.mark.multirank
def test_fp8_scaled_file_matches_comfyui_native_scaled_fp8(comfy, pack, config_spec, conds):
    """A ComfyUI "fp8_scaled" file (fp8 linears with per-tensor `scale_weight`, fp8 biases, the `scaled_fp8`
    marker) sampled on tp=2 ranks that keep the weights fp8 equals ComfyUI's own scaled-fp8 model."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py

    import parallel_backend.group as group
    from parallel_backend.synthetic import write_fp8_variant

    models_dir = comfy["models_dir"]
    import comfy.sd  # (rebinds the `comfy` fixture's name)
    src = os.path.join(models_dir, "tiny_wan.safetensors")
    write_fp8_variant(src, os.path.join(models_dir, "tiny_wan_fp8_scaled.safetensors"), scaled=True, fp8_biases=True)
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    try:
        model, _ = _loader(pack).load("tiny_wan_fp8_scaled.safetensors", "fp32", config_spec(world_size=2, tp=2))
        out = pack.NODE_CLASS_MAPPINGS["ParallelSampler"]().sample(model, 4, 4, 1.0, "euler", "simple", pos, neg,
                                                                   latent)[0]["samples"]
        ranks = group.active_groups()[0].rank_load_stats
        assert all(r["fp8_layers"] == 24 and r["fp8_weight_bytes"] > 0 for r in ranks)
    finally:
        group.stop_all()
    native = comfy.sd.load_diffusion_model(os.path.join(models_dir, "tiny_wan_fp8_scaled.safetensors"))
    assert native.model.model_config.scaled_fp8 == torch.float8_e4m3fn
    ref = comfy_nodes.common_ksampler(native, 4, 4, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    diff = (out - ref).abs().max().item()
    print(f"fp8_scaled on tp=2 (weights fp8, fp32 compute) vs ComfyUI native scaled fp8: max abs {diff:.2e}")
    assert diff <= 1e-4
