"""Parallel LoRA node (nodes/lora_node.py) in-process, against ComfyUI's native LoraLoaderModelOnly.

A ComfyUI-format Wan LoRA (`diffusion_model.blocks.N.self_attn.q.lora_down.weight` / `lora_up` /
`alpha`, plus `.diff` on a norm and `.diff_b` on biases) is merged on tp=2 ranks (each rank merges its
slice); sampling with it must give ComfyUI's native LoRA'd model's latent. The native LoraLoader /
LoraLoaderModelOnly on the pack's MODEL take the same path (merged on the ranks); other weight patches are
refused. LoHa, LoKr (factorised and not) and DoRA files through LoraLoaderModelOnly match ComfyUI's native result
on tp=2 and ulysses=2 meshes (the ranks patch each layer whole with ComfyUI's own code and keep their slices).
"""
import os
import shutil

import pytest
import torch

TOL = 1e-4  # latent after 4 euler steps, fp32
STEPS = 4
CFG = 1.0  # cond only: cfg 5 multiplies the ranks' fp32 rounding (tp=2 all-reduce order) by ~9 in the latent


@pytest.fixture(scope="module")
def loras(comfy, tmp_path_factory):
    from parallel_backend.testing.synthetic import write_wan_lora
    d = tmp_path_factory.mktemp("loras")
    model = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    write_wan_lora(str(d / "wan_lora_comfy.safetensors"), model, fmt="comfy", rank=4, alpha=2.0, seed=21, extras=True)
    from parallel_backend.testing.synthetic import ADAPTER_FORMATS, write_wan_adapter
    for i, kind in enumerate(ADAPTER_FORMATS):
        write_wan_adapter(str(d / f"wan_{kind}.safetensors"), model, kind, seed=51 + i)
    shutil.copy(model, d / "not_a_lora.safetensors")
    comfy["folder_paths"].add_model_folder_path("loras", str(d))
    return str(d)


@pytest.fixture(scope="module")
def stop_groups_after():
    yield
    import parallel_backend.runtime.group as group
    group.stop_all()


def _native(models_dir, lora_strength, pos, neg, latent, seed=3, lora="wan_lora_comfy.safetensors"):
    import comfy.sd

    import nodes
    model = comfy.sd.load_diffusion_model(f"{models_dir}/tiny_wan.safetensors")
    if lora_strength:
        model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, lora_strength)[0]
    return nodes.common_ksampler(model, seed, STEPS, CFG, "euler", "simple", pos, neg, latent)[0]["samples"]


def test_node_is_registered_with_tooltips(comfy, pack, loras):
    registered = pack.NODE_CLASS_MAPPINGS["ParallelLora"]
    node = getattr(registered, "classic", registered)  # the V3 class (where the host has it) wraps this one
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ParallelLora"] == "Parallel LoRA"
    assert node.CATEGORY == "parallel_dit" and node.DESCRIPTION
    inputs = node.INPUT_TYPES()["required"]
    assert set(inputs) == {"model", "lora_name", "strength"}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert "wan_lora_comfy.safetensors" in inputs["lora_name"][0]
    assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES)


@pytest.mark.multirank
def test_parallel_lora_matches_native_lora_loader_and_restrength_reuses_the_group(comfy, pack, loras, config_spec,
                                                                                   conds, stop_groups_after):
    import parallel_backend.runtime.group as group

    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    nodes = pack.NODE_CLASS_MAPPINGS
    model, plan = nodes["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", config_spec(world_size=2, tp=2))
    assert "tp=2" in plan
    g = group.active_groups()[0]
    starts, pids, loads = group.starts, list(g.pids), g.load_count
    sample = lambda m: nodes["ParallelSampler"]().sample(m, 3, STEPS, CFG, "euler", "simple", pos, neg,
                                                          latent)[0]["samples"]
    plain_ref = _native(comfy["models_dir"], 0, pos, neg, latent)
    results = {}
    for strength in (0.8, 0.4):
        lora_model = nodes["ParallelLora"]().apply(model, "wan_lora_comfy.safetensors", strength)[0]
        out = sample(lora_model)
        ref = _native(comfy["models_dir"], strength, pos, neg, latent)
        diff, moved = (out - ref).abs().max().item(), (ref - plain_ref).abs().max().item()
        print(f"Parallel LoRA x{strength} (tp=2) vs native LoraLoaderModelOnly: max abs {diff:.2e} "
              f"(the LoRA moves the latent by {moved:.3f})")
        assert diff <= TOL and moved > 100 * TOL
        results[strength] = out
    # the MODEL without the LoRA, used again: the ranks unmerge
    diff = (sample(model) - plain_ref).abs().max().item()
    print(f"loader MODEL again (LoRA unmerged on the ranks) vs native without LoRA: {diff:.2e}")
    assert diff <= TOL
    # stacking: the same LoRA twice at 0.4 is the 0.8 merge
    twice = nodes["ParallelLora"]().apply(nodes["ParallelLora"]().apply(model, "wan_lora_comfy.safetensors", 0.4)[0],
                                          "wan_lora_comfy.safetensors", 0.4)[0]
    assert (sample(twice) - results[0.8]).abs().max().item() <= TOL
    # every change happened in the same processes, and the model file was read once
    assert group.starts == starts and g.pids == pids and g.load_count == loads and g.alive()


@pytest.mark.multirank
def test_native_lora_loaders_on_the_parallel_model_merge_on_the_ranks(comfy, pack, loras, config_spec, conds,
                                                                       stop_groups_after):
    """LoraLoaderModelOnly and LoraLoader, ComfyUI's own nodes, on the pack's MODEL: the LoRA reaches every rank's
    shard at the given strength (= native within 1e-4); a new strength re-merges on the same ranks."""
    import parallel_backend.runtime.group as group

    models_dir = comfy["models_dir"]
    import comfy.sd  # (rebinds the `comfy` fixture's name)

    import nodes as comfy_nodes  # ComfyUI's nodes.py

    UnsupportedPatchError = pack.nodes.patches.UnsupportedPatchError
    nodes = pack.NODE_CLASS_MAPPINGS
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    model, _ = nodes["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", config_spec(world_size=2, tp=2))
    g = group.active_groups()[0]
    pids, loads = list(g.pids), g.load_count
    sample = lambda m: comfy_nodes.common_ksampler(m, 3, STEPS, CFG, "euler", "simple", pos, neg, latent)[0]["samples"]
    for strength, loader in ((1.0, "LoraLoaderModelOnly"), (0.5, "LoraLoader")):
        if loader == "LoraLoaderModelOnly":
            lora_model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "wan_lora_comfy.safetensors",
                                                                                strength)[0]
        else:  # with a CLIP: its part is ComfyUI's own (this LoRA has no text-encoder keys); None stands in here
            lora_model = comfy_nodes.LoraLoader().load_lora(model, None, "wan_lora_comfy.safetensors", strength,
                                                            1.0)[0]
        out = sample(lora_model)
        ref = _native(models_dir, strength, pos, neg, latent)
        diff = (out - ref).abs().max().item()
        print(f"native {loader} x{strength} on the pack MODEL (tp=2) vs on the native model: {diff:.2e}")
        assert diff <= TOL
    assert g.pids == pids and g.load_count == loads  # re-merged in the same ranks, the model read once
    # strength 0 changes nothing and passes through, as natively
    assert comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "wan_lora_comfy.safetensors", 0.0)[0] is model
    # a weight patch that reached the patcher some other way is refused at the first model call
    patched = model.clone()
    patched.patches["diffusion_model.blocks.0.self_attn.q.weight"] = [(1.0, (torch.zeros(1),), 1.0, None, None)]
    pos, neg = conds
    with pytest.raises(UnsupportedPatchError, match=r"1 weight patches.*Parallel LoRA"):
        nodes["ParallelSampler"]().sample(patched, 0, 1, 5.0, "euler", "simple", pos, neg,
                                          {"samples": torch.zeros(1, 16, 1, 8, 8)})
    # Parallel LoRA refuses a native MODEL, and a file that is not a LoRA, before touching the group
    native = comfy.sd.load_diffusion_model(f"{models_dir}/tiny_wan.safetensors")
    with pytest.raises(ValueError, match="Parallel Model Loader.*native LoraLoader"):
        nodes["ParallelLora"]().apply(native, "wan_lora_comfy.safetensors", 1.0)
    from parallel_backend.weights.lora import LoraError
    with pytest.raises(LoraError, match=r"not_a_lora\.safetensors: not a LoRA file"):
        nodes["ParallelLora"]().apply(model, "not_a_lora.safetensors", 1.0)


_native_refs: dict = {}  # (lora, strength) -> native latent, shared by the meshes below


@pytest.mark.multirank
@pytest.mark.parametrize("degrees", [dict(tp=2), dict(ulysses=2), dict(ulysses=2, weights="sharded")],
                         ids=["tp2", "ulysses2", "ulysses2_sharded_weights"])
def test_native_lora_loader_with_loha_lokr_dora_matches_native(comfy, pack, loras, config_spec, conds, degrees,
                                                               stop_groups_after):
    """LoraLoaderModelOnly with LoHa / LoKr / DoRA files on the pack's MODEL = the same node on ComfyUI's native
    model within 1e-4 (fp32 latent after 4 euler steps); a new strength re-merges in the same ranks."""
    import nodes as comfy_nodes
    import parallel_backend.runtime.group as group

    models_dir = comfy["models_dir"]
    pos, neg = conds
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    group.stop_all()
    model, plan = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32",
                                                                         config_spec(world_size=2, **degrees))
    g = group.active_groups()[0]
    pids, loads = list(g.pids), g.load_count
    sample = lambda m: comfy_nodes.common_ksampler(m, 3, STEPS, CFG, "euler", "simple", pos, neg, latent)[0]["samples"]

    def native(lora, s):
        if (lora, s) not in _native_refs:
            _native_refs[lora, s] = _native(models_dir, s, pos, neg, latent, lora=lora)
        return _native_refs[lora, s]

    plain_ref = native(None, 0)
    worst = 0.0
    for kind, strength in (("loha", 1.0), ("lokr", 0.8), ("lokr_full", -0.6), ("dora", 1.0), ("dora", 0.5)):
        name = f"wan_{kind}.safetensors"
        lora_model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
        out = sample(lora_model)
        ref = native(name, strength)
        diff, moved = (out - ref).abs().max().item(), (ref - plain_ref).abs().max().item()
        print(f"native LoraLoaderModelOnly {kind} x{strength} on the pack MODEL ({plan.splitlines()[0]}) vs on the "
              f"native model: {diff:.2e} (the adapter moves the latent by {moved:.3f})")
        worst = max(worst, diff)
        assert diff <= TOL and moved > 100 * TOL
    print(f"worst LoHa / LoKr / DoRA difference vs native ({degrees}): {worst:.2e}")
    assert g.pids == pids and g.load_count == loads and g.alive()  # re-merged in the same ranks, the model read once
    diff = (sample(model) - plain_ref).abs().max().item()  # the loader's MODEL again: the ranks unmerge
    assert diff <= TOL
    group.stop_all()
