"""GGUF files through Parallel Model Loader: listed from ComfyUI's unet / diffusion_models folders, refused before
any process starts when bad (another architecture, an unknown quant type, a truncated file, a mislabelled one),
and sampled with sharded weights = ComfyUI's native KSampler on the same weights dequantized (ComfyUI 0.3.75 has
no GGUF loader of its own: the dequantized safetensors is the native reference)."""
import os

import pytest
import torch


@pytest.fixture(scope="module")
def unet_dir(comfy, tmp_path_factory):
    """A models/unet-style folder registered as ComfyUI registers it (a diffusion_models path) with GGUF files."""
    from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit

    d = tmp_path_factory.mktemp("unet")
    src = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    write_gguf_dit(src, str(d / "tiny_wan_Q8_0.gguf"), "Q8_0")
    write_dequantized_safetensors(str(d / "tiny_wan_Q8_0.gguf"), str(d / "tiny_wan_Q8_0_dequant.safetensors"))
    write_gguf_dit(src, str(d / "llama_arch.gguf"), "Q8_0", architecture="llama")
    write_gguf_dit(src, str(d / "labelled_cosmos.gguf"), "Q8_0", architecture="cosmos")
    data = (d / "tiny_wan_Q8_0.gguf").read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) - 4096])
    unknown = bytearray(data)
    name = b"blocks.0.self_attn.q.weight"
    at = unknown.index(name) + len(name) + 4 + 8 * 2  # n_dims (u32), two u64 dims, then the type id (u32)
    assert int.from_bytes(unknown[at:at + 4], "little") == 8  # Q8_0
    unknown[at:at + 4] = (250).to_bytes(4, "little")
    (d / "unknown_type.gguf").write_bytes(bytes(unknown))
    comfy["folder_paths"].add_model_folder_path("diffusion_models", str(d))
    return str(d)


def _loader(pack):
    return pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]()


def test_gguf_files_are_listed(pack, unet_dir):
    spec = _loader(pack).INPUT_TYPES()["required"]["model_name"]
    names = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert "tiny_wan_Q8_0.gguf" in names and "tiny_wan.safetensors" in names


@pytest.mark.parametrize("fname, message", [
    ("llama_arch.gguf", r"llama_arch\.gguf: GGUF architecture 'llama' is not a DiT"),
    ("unknown_type.gguf", r"unknown_type\.gguf: unknown GGML quant type 250"),
    ("truncated.gguf", r"truncated\.gguf: .*truncated"),
    ("labelled_cosmos.gguf", r"labelled_cosmos\.gguf: its tensors are a wan DiT but the GGUF says .*'cosmos'"),
])
def test_bad_gguf_refused_before_any_process(pack, config_spec, unet_dir, no_new_processes, fname, message):
    with pytest.raises(ValueError, match=message):
        _loader(pack).load(fname, "fp32", config_spec(world_size=2, ulysses=2))


@pytest.mark.multirank
def test_gguf_with_sharded_weights_equals_native_on_its_weights(comfy, pack, config_spec, conds, unet_dir):
    import comfy.sd as comfy_sd  # (the fixture `comfy` keeps its name)

    import nodes as comfy_nodes
    import parallel_backend.runtime.group as group

    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10)}
    native = comfy_sd.load_diffusion_model(os.path.join(unet_dir, "tiny_wan_Q8_0_dequant.safetensors"))
    ref = comfy_nodes.common_ksampler(native, 4, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    import parallel_backend.weights.gguf as gguf_mod

    def refuse(*a, **k):
        raise AssertionError("the ComfyUI process tried to read GGUF tensor data")
    try:
        with pytest.MonkeyPatch.context() as trap:  # this process reads the GGUF's metadata only; the ranks the rest
            for name in ("read_rows", "dequantize"):
                trap.setattr(gguf_mod, name, refuse)
            trap.setattr(gguf_mod.GGUFSliceReader, "_rows", refuse)
            model, plan = _loader(pack).load("tiny_wan_Q8_0.gguf", "fp32",
                                             config_spec(world_size=2, ulysses=2, weights="sharded"))
        out = comfy_nodes.common_ksampler(model, 4, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
        g = group.active_groups()[0]
        assert g.config.shard_weights and "sharded weights" in plan and "GGUF Q8_0: 20 linears kept quantized" in plan
        stats = g.rank_load_stats  # 2 blocks x 10 linears quantized (city96 keeps the embeddings and head whole)
        assert all(r.get("gguf_quantized_layers") == 20 and r["checkpoint_precision"] == "Q8_0" for r in stats), \
            [(r.get("gguf_quantized_layers"), r["checkpoint_precision"]) for r in stats]
    finally:
        group.stop_all()
    diff = (out - ref).abs().max().item()
    print(f"\nGGUF Q8_0, sharded weights x ulysses2, native KSampler vs native ComfyUI on the dequantized weights "
          f"(4 steps, cfg 5): {diff:.2e}")
    assert diff <= 1e-4


def test_plan_names_layers_dequantized_at_load(pack):
    import sys

    from parallel_backend.weights.gguf import GGUFHeader

    note = sys.modules[pack.__name__ + ".nodes.loader_node"].gguf_plan_note
    header = GGUFHeader({"blocks.0.self_attn.o.weight": ((768, 768), "Q4_K")}, "wan")
    info = {"gguf_quantized_layers": 18, "checkpoint_precision": "Q4_K",
            "gguf_dequantized_at_load": ["blocks.0.self_attn.o (Q4_K: 768 inputs / tp 2 is not whole 256-blocks)"]}
    text = note(header, info)
    assert "18 linears kept quantized, 1 dequantized at load" in text and "blocks.0.self_attn.o (Q4_K" in text
    assert note({"k": ((2, 2), "F32")}, info) == ""  # a safetensors header: nothing to say
