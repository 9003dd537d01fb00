"""Bad input is refused by the nodes before any process starts, with a message naming the fix."""
import os
import pickle

import psutil
import pytest
import torch
from safetensors.torch import save_file


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
    from parallel_backend.weights.reads import CheckpointError
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("PDIT_BOOBY_TRAP", str(marker))
    path = os.path.join(comfy["models_dir"], "evil.ckpt")
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Booby()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*pickle.*refused"):
        _loader(pack).load("evil.ckpt", "fp32", config_spec(ulysses=2))
    assert not marker.exists()


def test_truncated_file(comfy, pack, config_spec, no_new_processes):
    from parallel_backend.weights.reads import CheckpointError
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

    import parallel_backend.runtime.group as group
    from parallel_backend.testing.synthetic import write_tiny_wan

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
        proxy = pack.nodes.proxy.parallel_model_of(model)
        proxy.group()  # what the sampler's first model call does (the loader may defer a swap to it)
        with open("/proc/self/status") as f:
            peak = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
        g = group.active_groups()[0]
        ranks = g.rank_load_stats
        print(f"ComfyUI process peak RSS while loading a {os.path.getsize(path) >> 20} MiB file: "
              f"+{(peak - before) / 2**20:.1f} MiB; ranks hold {[r['param_bytes'] >> 20 for r in ranks]} MiB")
        assert peak - before < 32 * 2**20
        assert all(r["param_bytes"] > 100 * 2**20 for r in ranks) and model is not None
        # a node that calls the host model's own method here (LTX's duration head: preprocess_text_embeds) is told why
        with pytest.raises(AttributeError, match=r"WanModel\.unpatchify on the parallel MODEL.*cannot run on"):
            proxy.unpatchify  # noqa: B018
        assert not hasattr(proxy, "no_such_attribute")
    finally:
        monkeypatch.undo()
        group.stop_all()


# fp8 files as users get them: plain e4m3fn, ComfyUI fp8_scaled with fp32 biases (which ComfyUI 0.3.75 rounds to fp8
# when it loads them into its scaled-fp8 layers), and fp8_scaled with fp8 biases (as ComfyUI saves such a model); and
# ComfyUI's mixed-precision layout, quantized by its own code: named by the file's `_quantization_metadata` (0.3.75
# and later read it), by per-layer `comfy_quant` keys (hosts with convert_old_quants; here only the blocks quantized,
# the other linears bf16), and a block-scaled format (mxfp8, where the host has it: refused where weights are split)
FP8_FILES = {"fp8_e4m3fn": dict(scaled=False), "fp8_scaled": dict(scaled=True),
             "fp8_scaled_fp8_biases": dict(scaled=True, fp8_biases=True)}
QUANT_FILES = {"fp8_quant_metadata": dict(layout="metadata"),
               "fp8_comfy_quant_blocks": dict(layout="comfy_quant", only=("blocks.",)),
               "mxfp8_comfy_quant_blocks": dict(layout="comfy_quant", fmt="mxfp8", only=("blocks.",))}
FP8_LAYERS = {"fp8_comfy_quant_blocks": 20, "mxfp8_comfy_quant_blocks": 20}  # (the rest: all 26 linears)


def _host_reads(kw) -> bool:
    """Whether this ComfyUI reads a mixed-precision file so written (0.3.75 reads only the metadata, fp8 only)."""
    import comfy.quant_ops
    import comfy.utils
    keys = kw["layout"] == "metadata" or hasattr(comfy.utils, "convert_old_quants")
    return keys and kw.get("fmt", "float8_e4m3fn") in comfy.quant_ops.QUANT_ALGOS


@pytest.fixture(scope="module")
def fp8_files(comfy):
    from parallel_backend.testing.synthetic import write_fp8_variant, write_quantized_variant
    src = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    out = {name: os.path.basename(write_fp8_variant(src, os.path.join(comfy["models_dir"], f"tiny_wan_{name}.safetensors"),
                                                    **kw)) for name, kw in FP8_FILES.items()}
    for name, kw in QUANT_FILES.items():
        if _host_reads(kw):
            out[name] = os.path.basename(write_quantized_variant(
                src, os.path.join(comfy["models_dir"], f"tiny_wan_{name}.safetensors"), **kw))
    return out


def _reads_scaled(model_config) -> bool:
    """Whether ComfyUI loaded the file into its scaled / quantized layers (0.3.75: the scaled_fp8 marker, or its
    mixed-precision ops for a metadata file; later: the mixed-precision ops' quant_config)."""
    attrs = ("scaled_fp8", "quant_config", "layer_quant_config")
    return any(getattr(model_config, a) is not None for a in attrs if hasattr(type(model_config), a))


@pytest.fixture(scope="module")
def fp8_native(comfy, fp8_files):
    """ComfyUI's own model for each fp8 file, sampled 4 euler steps at cfg 5 (the oracle)."""
    import comfy.sd as comfy_sd  # (the fixture `comfy` keeps its name)

    import nodes as comfy_nodes  # ComfyUI's nodes.py
    g = torch.Generator().manual_seed(11)
    pos, neg = [[torch.randn(1, 12, 4096, generator=g), {}]], [[torch.randn(1, 12, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10)}  # 45 tokens: ragged on 2 sequence ranks
    out = {}
    for name, fname in fp8_files.items():
        # a plain fp8 file as ComfyUI holds it on an fp8-capable GPU (UNETLoader's fp8_e4m3fn): an fp8 unet
        options = {"dtype": torch.float8_e4m3fn} if name == "fp8_e4m3fn" else {}
        native = comfy_sd.load_diffusion_model(os.path.join(comfy["models_dir"], fname), model_options=options)
        assert _reads_scaled(native.model.model_config) == (name != "fp8_e4m3fn")
        out[name] = comfy_nodes.common_ksampler(native, 4, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    return (pos, neg, latent), out


@pytest.mark.multirank
@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2), dict(tp=2), dict(cfg=2),
                                     dict(cfg=2, weights="sharded")],
                         ids=["ulysses2", "ring2", "tp2", "cfg2", "cfg2_sharded_weights"])
def test_fp8_files_sampled_on_the_pack_equal_comfyui_native(pack, config_spec, fp8_files, fp8_native, degrees):
    """Each fp8 / quantized layout, loaded by Parallel Model Loader on the mesh (weights kept fp8 / quantized, fp32
    compute) and sampled by Parallel Sampler, equals ComfyUI's own model of the same file sampled by KSampler; a
    block-scaled file on a mesh that splits weights is refused, naming the file, its format and what to set."""
    import parallel_backend.runtime.group as group

    (pos, neg, latent), refs = fp8_native
    sample = pack.NODE_CLASS_MAPPINGS["ParallelSampler"]().sample
    splits = degrees.get("tp", 1) > 1 or degrees.get("weights") == "sharded"
    diffs = {}
    try:
        for name, fname in fp8_files.items():
            spec = config_spec(world_size=2, **degrees)
            if name.startswith("mxfp8") and splits:
                with pytest.raises(Exception, match=rf"{fname}: .* quantized as mxfp8, whose scales are per block"
                                                    rf".*tp 1 and weights 'replicated'"):
                    model, _ = _loader(pack).load(fname, "fp32", spec)
                    sample(model, 4, 4, 5.0, "euler", "simple", pos, neg, latent)
                continue
            model, _ = _loader(pack).load(fname, "fp32", spec)
            out = sample(model, 4, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
            ranks = group.active_groups()[0].rank_load_stats
            assert all(r["fp8_layers"] == FP8_LAYERS.get(name, 26) and r["fp8_weight_bytes"] > 0 for r in ranks)
            assert group.active_groups()[0].config.shard_weights == (degrees.get("weights") == "sharded")
            diffs[name] = (out - refs[name]).abs().max().item()
    finally:
        group.stop_all()
    print(f"{degrees}: pack vs ComfyUI native after 4 steps at cfg 5: "
          + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))
    assert max(diffs.values()) <= 1e-4, diffs


@pytest.mark.multirank
@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])
def test_weight_dtype_holds_a_16_bit_file_as_the_native_loader_does(comfy, pack, config_spec, weight_dtype):
    """UNETLoader's weight_dtype on an fp16 file (ComfyUI's chrono edit and VACE inpainting templates): ComfyUI holds
    the weights in fp8 and casts per layer; Parallel Model Loader's weight_dtype does the same on the ranks (ulysses2),
    so swapping the loader keeps the result (4 steps at cfg 5 = native within 1e-4; the fp8 storage moves the
    latent), each rank holding its linears in fp8."""
    import comfy.sd as comfy_sd  # (the fixture `comfy` keeps its name)

    import nodes as comfy_nodes
    import parallel_backend.runtime.group as group
    from parallel_backend.testing.synthetic import write_tiny_wan

    fname = "tiny_wan_fp16_storage.safetensors"
    path = os.path.join(comfy["models_dir"], fname)
    if not os.path.exists(path):
        write_tiny_wan(path, seed=12, dtype=torch.float16)
    g = torch.Generator().manual_seed(11)
    pos, neg = [[torch.randn(1, 12, 4096, generator=g), {}]], [[torch.randn(1, 12, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10)}
    run = lambda m: comfy_nodes.common_ksampler(m, 4, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    native_model = comfy_nodes.UNETLoader().load_unet(fname, weight_dtype)[0]
    ref, plain = run(native_model), run(comfy_sd.load_diffusion_model(path))
    try:
        model, _ = _loader(pack).load(fname, "fp32", config_spec(world_size=2, ulysses=2), weight_dtype=weight_dtype)
        out = run(model)
        ranks = group.active_groups()[0].rank_load_stats
    finally:
        group.stop_all()
    diff, moved = (out - ref).abs().max().item(), (ref - plain).abs().max().item()
    print(f"weight_dtype {weight_dtype} on ulysses2 vs UNETLoader {weight_dtype}: {diff:.2e} (fp8 storage moves the "
          f"latent by {moved:.3f})")
    assert all(r["fp8_layers"] == 26 for r in ranks)
    assert moved > 1e-3 and diff <= 1e-4


def test_wan_class_without_a_plan_is_refused_by_name(comfy, pack, config_spec, monkeypatch, no_new_processes):
    """A Wan file ComfyUI detects as a class the family has no plan for (every class of ComfyUI 0.3.75 has one: a
    newer host's class, stood in for here by HuMo with its entry removed) is refused at load, before any rank starts,
    naming the class ComfyUI detected and the reason; it never runs without its extra blocks."""
    from parallel_backend.models import wan
    from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes

    tensors = {k: torch.zeros(v) for k, v in wan_shapes(**WAN_PRESETS["tiny-humo"]).items()}
    save_file(tensors, os.path.join(comfy["models_dir"], "tiny_humo.safetensors"))
    monkeypatch.delitem(wan.VARIANTS, "HumoWanModel")
    monkeypatch.setitem(wan.NOT_YET, "HumoWanModel", "its audio blocks have no parallel plan in this test")
    with pytest.raises(ValueError, match=r"tiny_humo\.safetensors: ComfyUI detects this file as HumoWanModel, which "
                                         r"the parallel loader cannot run yet: its audio blocks have no parallel plan "
                                         r"in this test.*native Load Diffusion Model"):
        _loader(pack).load("tiny_humo.safetensors", "fp32", config_spec(ulysses=2))


def test_file_comfyui_knows_but_the_pack_does_not_names_comfyuis_class(comfy, pack, config_spec, no_new_processes):
    """A DiT ComfyUI recognises but no family of the pack takes (here a Cosmos Predict2.5 file: Predict2 blocks plus
    the text projection the pack's Predict2 family refuses) is refused before any rank starts, naming the class
    ComfyUI's detection gives."""
    from parallel_backend.models import UnsupportedModelError
    from parallel_backend.testing.synthetic import COSMOS_PRESETS, cosmos_predict2_shapes

    tensors = {f"net.{k}": torch.zeros(v) for k, v in cosmos_predict2_shapes(**COSMOS_PRESETS["tiny"]).items()}
    tensors["net.crossattn_proj.0.weight"] = torch.zeros(1024, 8)
    save_file(tensors, os.path.join(comfy["models_dir"], "predict2_5.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"predict2_5\.safetensors.*ComfyUI detects it as "
                                                    r"CosmosT2IPredict2 \(MiniTrainDIT\).*native Load Diffusion"):
        _loader(pack).load("predict2_5.safetensors", "fp32", config_spec(ulysses=2))


def test_auto_weights_pick_sharded_or_tp_by_bytes_for_the_latent(comfy, pack, monkeypatch, no_new_processes):
    """A model that does not fit one device: auto mode shards the weights for a video latent (gathers < TP's
    all-reduces) and picks TP for a one-image latent, and `parallel_plan` says why; as the Config node makes it."""
    planner = pack_backend(pack, "planner")
    monkeypatch.setattr(planner, "fits_one_device", lambda *a, **k: False)
    reads, models = pack_backend(pack, "weights.reads"), pack_backend(pack, "models")
    path = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    header = reads.read_header(path)
    family = models.detect_family(header, path)
    shape = family.model_shape(header)
    make = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make
    video = {"samples": torch.zeros(1, 16, 21, 60, 104)}  # 480p, 81 frames: 32,760 tokens
    image = {"samples": torch.zeros(1, 16, 1, 8, 8)}      # 16 tokens
    spec = make(2, 0, 0, 0, 0, 0, "fp32", "cpu", "sdpa", latent=video)[0]
    config, why = planner.resolve_config(spec, shape, header, family, "fp32")
    assert config.shard_weights and config.tp == 1 and "sharded weights because" in why and "32760 tokens" in why
    spec = make(2, 0, 0, 0, 0, 0, "fp32", "cpu", "sdpa", latent=image)[0]
    config, why = planner.resolve_config(spec, shape, header, family, "fp32")
    assert not config.shard_weights and config.tp == 2 and why.startswith("tp rather than sharded weights")
    spec = make(2, 0, 0, 0, 0, 0, "fp32", "cpu", "sdpa", weights="replicated", latent=video)[0]
    config, _ = planner.resolve_config(spec, shape, header, family, "fp32")
    assert not config.shard_weights and config.tp == 2  # replicated: TP is the only way to fit
    print(f"\nauto, video: {planner.resolve_config(make(2, 0, 0, 0, 0, 0, 'fp32', 'cpu', 'sdpa', latent=video)[0], shape, header, family, 'fp32')[1]}")


def _loader_module(pack):
    import sys
    return sys.modules[pack.__name__ + ".nodes.loader_node"]


def pack_backend(pack, name):
    """The engine module `parallel_backend.<name>` as the nodes hold it (nodes/engine.py, by its plain name)."""
    import sys
    pack.nodes.engine  # noqa: B018  (imported with the nodes)
    return sys.modules[f"parallel_backend.{name}"]


@pytest.mark.multirank
def test_plan_that_cannot_fit_is_refused_before_loading(comfy, pack, config_spec, monkeypatch):
    """The ranks report their devices' free memory when the group starts; a plan whose weights (+ the reserve for
    activations) do not fit one of them is refused before any weight is read, naming the device, the bytes and a
    plan that fits, and the empty group is stopped. (CPU ranks: the devices' accounting is faked.)"""
    import parallel_backend.runtime.group as group
    from parallel_backend.config import ParallelConfig
    from parallel_backend.planner import RESERVE_AFTER_START, weights_per_rank

    planner = pack_backend(pack, "planner")
    reads, models = pack_backend(pack, "weights.reads"), pack_backend(pack, "models")
    path = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    header = reads.read_header(path)
    family = models.detect_family(header, path)
    mb = planner.model_bytes(header, family, "fp32")
    # GPU 1 holds the rest and one and a half blocks: not the whole model (nor sharded weights' two gathered blocks
    # of this 2-block model), but half of each block (tp=2) or one pipeline stage
    # (the reserve a rank still needs once started: the check runs on the free memory the ranks report at start)
    free1 = RESERVE_AFTER_START["cpu"] + mb.rest + mb.blocks[0] * 3 // 2
    assert weights_per_rank(ParallelConfig(world_size=2, ulysses=2, device="cpu"), mb)[1] + RESERVE_AFTER_START["cpu"] > free1
    fake = [{"device": "cuda:0", "free": 8 << 30, "total": 8 << 30, "shared": False},
            {"device": "cuda:1", "free": free1, "total": free1, "shared": False}]
    real_start = group.WorkerGroup.start

    def start(self, interrupt=None):
        real_start(self, interrupt)
        assert [m["device"] for m in self.device_memory] == ["cpu", "cpu"]  # what real CPU ranks report
        self.device_memory = fake
        return self
    loads, real_load = [], group.WorkerGroup.load
    monkeypatch.setattr(group.WorkerGroup, "start", start)
    monkeypatch.setattr(group.WorkerGroup, "load", lambda self, *a, **k: loads.append(a) or real_load(self, *a, **k))
    group.stop_all()
    with pytest.raises(ValueError, match=r"cuda:1 would need \d+ MiB \(weights .* but has \d+ MiB free; tp=2 would fit"):
        _loader(pack).load("tiny_wan.safetensors", "fp32", config_spec(world_size=2, ulysses=2))
    assert loads == [] and not any(g.alive() for g in group.active_groups())  # nothing read; devices given back
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(2, 1, 1, 1, 1, 1, "fp32", "cpu", "sdpa", pp=2,
                                                             stage_split="8,1")[0]
    model, plan = _loader(pack).load("tiny_wan.safetensors", "fp32", spec)
    assert "pp=2" in plan and len(loads) == 1
    group.stop_all()


def test_pp_stages_follow_each_gpus_memory_unless_split_by_the_user(comfy, pack, monkeypatch, no_new_processes):
    """pp > 1 without stage_split: the stages are sized by each stage's smallest GPU (the driver's totals; faked
    here); with auto pp on unequal GPUs that no symmetric plan fits, pp is picked and said so."""
    planner = pack_backend(pack, "planner")
    reads, models = pack_backend(pack, "weights.reads"), pack_backend(pack, "models")
    path = os.path.join(comfy["models_dir"], "tiny_wan.safetensors")
    header = reads.read_header(path)
    family = models.detect_family(header, path)
    shape = family.model_shape(header)
    monkeypatch.setattr(planner, "device_totals", lambda spec: [24 << 30, 24 << 30, 16 << 30, 16 << 30])
    make = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make
    spec = make(4, 1, 2, 1, 1, 1, "fp32", "cpu", "sdpa", pp=2)[0]
    config, why = planner.resolve_config(spec, shape, header, family, "fp32")
    assert config.pp == 2 and config.ulysses == 2 and config.stage_split == (24, 16), (config, why)
    assert "stage_split 24,16 from each stage's GPU memory" in why
    spec = make(4, 1, 2, 1, 1, 1, "fp32", "cpu", "sdpa", pp=2, stage_split="3,1")[0]
    assert planner.resolve_config(spec, shape, header, family, "fp32")[0].stage_split == (3, 1)
    # auto pp (0): unequal GPUs that no symmetric plan fits (Wan 14B-sized weights, faked) -> stages by memory
    monkeypatch.setattr(planner, "device_totals", lambda spec: [24 << 30, 12 << 30])
    monkeypatch.setattr(planner, "model_bytes", lambda *a: planner.ModelBytes(tuple([702_000_000] * 40), 464_000_000))
    spec = make(2, 0, 0, 0, 0, 0, "fp32", "cpu", "sdpa", pp=0)[0]
    config, why = planner.resolve_config(spec, shape, header, family, "fp32")
    assert config.pp == 2 and config.stage_split == (24, 12) and "because the GPUs differ (24, 12 GiB)" in why, why
    print(f"\nauto pp: {why}")
