"""Native model-patch nodes on the pack's MODEL: step caches run around the group call, TorchCompileModel
compiles the ranks' blocks, model patches at the host class's patch points see the whole sequence as natively, and
what the ranks cannot honour is refused with a message.

- EasyCache / LazyCache (ComfyUI's DIFFUSION_MODEL and PREDICT_NOISE wrappers) run in the ComfyUI process around
  the proxy, as they run around the native model: a step they skip never reaches the ranks (counted on the
  group), and the latent equals native + the same cache.
- TorchCompileModel on the pack MODEL (and the loader's `compile` option) compiles the transformer blocks inside
  the ranks with inductor; the latent equals eager; after the first steps no step recompiles (counted).
"""
import pytest
import torch

pytestmark = pytest.mark.multirank
LATENT = (1, 16, 3, 6, 10)  # 45 tokens: ragged on 2 sequence ranks


def _native(models_dir):
    import comfy.sd
    return comfy.sd.load_diffusion_model(f"{models_dir}/tiny_wan.safetensors")


def _sample(model, pos, neg, steps, cfg, seed=5):
    import nodes as comfy_nodes
    latent = {"samples": torch.zeros(*LATENT)}
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def _forwards(group):
    return group.stats()[0]["forwards"]


@pytest.fixture(scope="module")
def pack_model(comfy, pack):
    """The tiny Wan on a warm ulysses2 group (the whole module shares it)."""
    import parallel_backend.runtime.group as group
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(2, 1, 2, 1, 1, 1, "fp32", "cpu", "sdpa")[0]
    model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec)
    yield model, group.active_groups()[0]
    group.stop_all()


@pytest.mark.parametrize("node", ["EasyCache", "LazyCache"])
def test_step_cache_skips_steps_before_the_group_and_equals_native(comfy, pack_model, conds, node):
    from comfy_extras import nodes_easycache

    cache = {"EasyCache": nodes_easycache.EasyCacheNode, "LazyCache": nodes_easycache.LazyCacheNode}[node]
    model, group = pack_model
    pos, neg = conds
    steps, threshold = 20, 1.5
    native_plain = _sample(_native(comfy["models_dir"]), pos, neg, steps, 1.0)
    native_cached = _sample(cache.execute(_native(comfy["models_dir"]), threshold, 0.1, 0.95, False)[0], pos, neg,
                            steps, 1.0)
    assert (native_cached - native_plain).abs().max().item() > 1e-2, "the cache skipped nothing natively"
    before = _forwards(group)
    out = _sample(cache.execute(model, threshold, 0.1, 0.95, False)[0], pos, neg, steps, 1.0)
    forwards = _forwards(group) - before
    diff = (out - native_cached).abs().max().item()
    print(f"{node} (reuse {threshold}, {steps} steps, cfg 1.0): group ran {forwards} forwards; pack vs native + "
          f"{node}: {diff:.2e}")
    assert forwards < steps
    assert diff <= 1e-4


def test_torch_compile_runs_on_the_ranks(comfy, pack, pack_model, conds):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    model, group = pack_model
    pos, neg = conds
    eager = _sample(model, pos, neg, 4, 1.0)
    compiled_model = TorchCompileModel.execute(model, "inductor")[0]
    graphs = lambda: [r["compiled_graphs_per_forward"] for r in group.stats()]
    first = _sample(compiled_model, pos, neg, 4, 1.0)
    after_first = graphs()
    again = _sample(compiled_model, pos, neg, 4, 1.0)
    after_again = graphs()
    diff = (first - eager).abs().max().item()
    print(f"TorchCompileModel(inductor) on the ranks vs eager: {diff:.2e}; graphs built per forward (rank 0): "
          f"{after_again[0][-8:]}")
    assert diff <= 1e-4 and torch.equal(first, again)
    for per_rank_first, per_rank in zip(after_first, after_again):
        assert per_rank[-1] > 0, "nothing was compiled on the ranks"
        # the second prompt (same shapes) and every step after the first two compiled nothing new
        assert per_rank[-1] == per_rank_first[-1] and len(set(per_rank[-6:])) == 1, per_rank
    # the plain MODEL again: the ranks go back to eager and reproduce the eager latent
    assert torch.equal(_sample(model, pos, neg, 4, 1.0), eager)


def test_loader_compile_option(comfy, pack, pack_model, conds):
    import parallel_backend.runtime.group as group

    eager_model, g = pack_model
    pos, neg = conds
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(2, 1, 2, 1, 1, 1, "fp32", "cpu", "sdpa")[0]
    model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec,
                                                                      compile="inductor")
    assert group.active_groups() == [g]  # the same warm group and weights
    out = _sample(model, pos, neg, 4, 1.0)
    assert all(r["compile"] == {"backend": "inductor"} for r in g.stats())
    eager = _sample(eager_model, pos, neg, 4, 1.0)
    assert all(r["compile"] is None for r in g.stats())
    assert (out - eager).abs().max().item() <= 1e-4


def test_unsupported_compile_backend_and_patches_are_refused(comfy, pack_model, conds):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model, _ = pack_model
    pos, neg = conds
    m = model.clone()
    set_torch_compile_wrapper(model=m, backend="cudagraphs")
    with pytest.raises(Exception, match="cudagraphs' needs CUDA ranks"):
        _sample(m, pos, neg, 1, 1.0)
    m = model.clone()
    set_torch_compile_wrapper(model=m, backend="tvm")
    with pytest.raises(Exception, match="backend 'tvm' is not supported"):
        _sample(m, pos, neg, 1, 1.0)
    # a block replacement that cannot be pickled (it holds a lock) cannot reach the ranks: refused, not dropped
    import threading
    lock = threading.Lock()
    m = model.clone()
    m.set_model_patch_replace(lambda args, extra: (lock, args)[1], "dit", "double_block", 0)
    with pytest.raises(Exception, match=r"the model patch .*lambda.* cannot be sent to the worker ranks"):
        _sample(m, pos, neg, 1, 1.0)


def test_rope_options_reach_the_host_model(comfy, pack_model, conds):
    """RoPE scale / shift (ModelPatcher.set_model_rope_options) are applied by ComfyUI's own WanModel on the ranks."""
    model, _ = pack_model
    pos, neg = conds
    roped = lambda m: (lambda c: (c.set_model_rope_options(1.0, 0.0, 1.0, 0.0, 2.0, 1.0), c)[1])(m.clone())
    native = _native(comfy["models_dir"])
    ref = _sample(roped(native), pos, neg, 4, 1.0)
    moved = (ref - _sample(native, pos, neg, 4, 1.0)).abs().max().item()
    diff = (_sample(roped(model), pos, neg, 4, 1.0) - ref).abs().max().item()
    print(f"rope_options (scale_t 2, shift_t 1) on the pack vs native: {diff:.2e} (they move the latent by {moved:.3f})")
    assert moved > 1e-3 and diff <= 1e-4


@pytest.fixture(scope="module")
def pack_model_4(comfy, pack):
    """The tiny Wan on a cfg2 x ulysses2 group (4 CPU ranks)."""
    import parallel_backend.runtime.group as group
    group.stop_all()
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(4, 2, 2, 1, 1, 1, "fp32", "cpu", "sdpa")[0]
    model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec)
    yield model
    group.stop_all()


def test_skip_layer_guidance_crosses_to_the_ranks(comfy, pack_model_4, conds):
    """SkipLayerGuidanceDiT's block replacement (a local function) is pickled to the ranks, where ComfyUI's own
    WanModel applies it on each shard: the latent equals native + SkipLayerGuidanceDiT."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    pos, neg = conds
    slg = lambda m: SkipLayerGuidanceDiT.execute(m, 3.0, 0.0, 1.0, "1", "")[0]
    native = _native(comfy["models_dir"])
    ref = _sample(slg(native), pos, neg, 4, 5.0)
    moved = (ref - _sample(native, pos, neg, 4, 5.0)).abs().max().item()
    out = _sample(slg(pack_model_4), pos, neg, 4, 5.0)
    diff = (out - ref).abs().max().item()
    print(f"SkipLayerGuidanceDiT (skip block 1, scale 3) on cfg2 x ulysses2 vs native: {diff:.2e} (it moves the "
          f"latent by {moved:.3f})")
    assert moved > 1e-2 and diff <= 1e-4


# ---- model patches at the host class's patch points, on split meshes ------------------------------------------------
PATCH_MESHES = {"ulysses2": (2, 1, 2, 1, 1, 1), "ring2": (2, 1, 1, 2, 1, 1), "tp2": (2, 1, 1, 1, 2, 1),
                "cfg2": (2, 2, 1, 1, 1, 1)}  # world, cfg, ulysses, ring, tp, dp; the latent's 45 tokens are ragged


def _token_global_patches() -> dict:
    """Patches that look across tokens (and heads), one per patch point of ComfyUI's Wan, made here as local
    functions (they cross to the ranks by value). attn2 also reads the per-call cond_or_uncond, per row."""
    def attn1(d):  # after self-attention: x (B, S, heads * head_dim), q / k (B, S, heads, head_dim)
        x, q, k = d["x"], d["q"], d["k"]
        return x + 0.05 * (x.mean(1, keepdim=True) + (q.mean((1, 2)) * k.std((1, 2))).sum(-1)[:, None, None])

    def attn2(d):  # after cross-attention: x (B, S, dim)
        x, kinds = d["x"], d["transformer_options"]["cond_or_uncond"]
        per_row = torch.tensor(kinds, dtype=x.dtype).repeat_interleave(x.shape[0] // len(kinds))
        return x - 0.1 * x.mean(1, keepdim=True) * (1 + per_row.view(-1, 1, 1))

    def double_block(d):  # after each block: img (B, S, dim)
        return {**d, "img": d["img"] + 0.05 * d["img"].flip(1)}

    def replace(args, extra):  # block 1 replaced: the original block, then a mean over tokens
        img = extra["original_block"](args)["img"]
        return {"img": img - 0.1 * img.mean(1, keepdim=True)}
    return {"attn1_patch": attn1, "attn2_patch": attn2, "double_block": double_block, "replace": replace}


def _patched(model, point, fn):
    m = model.clone()
    if point == "replace":
        m.set_model_patch_replace(fn, "dit", "double_block", 1)
    else:
        m.set_model_patch(fn, point)
    return m


def _host_applies(point: str) -> bool:
    """Whether this host's Wan calls the point (0.3.75: block replacements only; 0.33: attn1 / attn2 / double_block)."""
    import inspect

    import comfy.ldm.wan.model
    return point == "replace" or f'"{point}" in patches' in inspect.getsource(comfy.ldm.wan.model)


_NATIVE_PATCHED: dict = {}


@pytest.fixture
def native_patched(comfy, conds):
    """Native ComfyUI with each token-global patch (and without), sampled once for every mesh below."""
    if not _NATIVE_PATCHED:
        native = _native(comfy["models_dir"])
        pos, neg = conds
        _NATIVE_PATCHED["plain"] = _sample(native, pos, neg, 3, 4.0)
        for point, fn in _token_global_patches().items():
            _NATIVE_PATCHED[point] = _sample(_patched(native, point, fn), pos, neg, 3, 4.0)
    return _NATIVE_PATCHED


@pytest.mark.parametrize("mesh", list(PATCH_MESHES))
def test_token_global_patches_equal_native_on_split_meshes(comfy, pack, conds, native_patched, mesh):
    """Each patch point ComfyUI's Wan applies hands the patch the whole sequence (and every head) on the pack, as
    natively: the latent equals native + the same patch (a point this host's Wan does not have is ignored on both)."""
    import parallel_backend.runtime.group as group

    pos, neg = conds
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(*PATCH_MESHES[mesh], "fp32", "cpu", "sdpa")[0]
    model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec)
    diffs, moved = {}, {}
    try:
        for point, fn in _token_global_patches().items():
            ref = native_patched[point]
            moved[point] = (ref - native_patched["plain"]).abs().max().item()
            diffs[point] = (_sample(_patched(model, point, fn), pos, neg, 3, 4.0) - ref).abs().max().item()
    finally:
        group.stop_all()
    print(f"{mesh}: token-global patches on the pack vs native + patch {diffs}; the patches move the latent by "
          f"{moved}")
    for point in diffs:
        assert (moved[point] > 1e-2) == _host_applies(point), (point, moved[point])
        assert diffs[point] <= 1e-4, (point, diffs[point])


def test_patches_between_blocks_are_refused_on_pipeline_stages(comfy, pack, conds):
    import parallel_backend.runtime.group as group

    if not _host_applies("double_block"):
        pytest.skip("this host's Wan has no double_block patch point (ComfyUI 0.3.75): nothing to refuse")
    pos, neg = conds
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(2, 1, 1, 1, 1, 1, "fp32", "cpu", "sdpa", pp=2)[0]
    model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec)
    try:
        m = _patched(model, "double_block", _token_global_patches()["double_block"])
        with pytest.raises(Exception, match=r"double_block.*set pp to 1"):
            _sample(m, pos, neg, 1, 1.0)
    finally:
        group.stop_all()


# ---- InfiniteTalk (WanInfiniteTalkToVideo's patches, ComfyUI 0.33+) ------------------------------------------------
WAN_1280 = dict(dim=1280, ffn_dim=1280)  # 10 heads of 128 (even: ulysses 2, tp 2); MultiTalk attends with 40 heads of 32


def _infinite_talk(model, length: int, grid: tuple, seed: int = 21):
    """`model` patched as WanInfiniteTalkToVideo patches it for two speakers (comfy_extras/nodes_wan.py, 0.33): a
    tiny MultiTalk model patch of ComfyUI's own classes with random weights, two speakers' audio features ("add"
    mode) projected by it into transformer_options["audio_embeds"], its audio cross-attention after every block's
    cross-attention (attn2_patch) and the speakers' attention map from the first frame's keys (attn1_patch)."""
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.wan.model_multitalk import MultiTalkCrossAttnPatch, MultiTalkGetAttnMapPatch, project_audio_features
    from comfy_extras.nodes_model_patch import MultiTalkModelPatch

    g = torch.Generator().manual_seed(seed)
    net = MultiTalkModelPatch(in_dim=WAN_1280["dim"], intermediate_dim=32, out_dim=64, num_layers=2,
                              operations=comfy.ops.manual_cast)
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    patch_model = comfy.model_patcher.CoreModelPatcher(net, load_device=torch.device("cpu"),
                                                       offload_device=torch.device("cpu"))
    speakers = [torch.randn(length, 12, 768, generator=g) for _ in range(2)]
    padded = [torch.cat([speakers[0], torch.zeros_like(speakers[1])]), torch.cat([torch.zeros_like(speakers[0]),
                                                                                    speakers[1]])]
    audio_embeds = project_audio_features(net.audio_proj, padded, 0, length)
    _, h, w = grid
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, :, : w // 2], masks[1, :, w // 2:] = True, True  # speaker 1 on the left, speaker 2 on the right
    m = model.clone()
    m.model_options["transformer_options"]["audio_embeds"] = audio_embeds
    m.set_model_patch(MultiTalkCrossAttnPatch(patch_model, 1.0), "attn2_patch")
    m.set_model_patch(MultiTalkGetAttnMapPatch(masks.view(2, -1)), "attn1_patch")
    return m


@pytest.fixture(scope="module")
def wan_1280(comfy):
    pytest.importorskip("comfy.ldm.wan.model_multitalk", reason="this host has no InfiniteTalk (ComfyUI 0.3.75)")
    from parallel_backend.testing.synthetic import write_tiny_wan
    write_tiny_wan(f"{comfy['models_dir']}/tiny_wan_1280.safetensors", seed=4, **WAN_1280)
    return "tiny_wan_1280.safetensors"


@pytest.mark.parametrize("mesh", ["ulysses2", "ring2", "tp2"])
def test_infinite_talk_patches_equal_native(comfy, pack, conds, wan_1280, mesh):
    """InfiniteTalk's two patches look across tokens (a per-frame audio cross-attention, a speaker map from the
    first frame's keys) and hold a model of their own: on the pack each crosses once, its model on the ranks'
    device, and sees the whole sequence; the latent equals native ComfyUI with the same patches."""
    import parallel_backend.runtime.group as group

    pos, neg = conds
    latent_shape, length, grid = (1, 16, 3, 6, 10), 9, (3, 3, 5)
    native = _native_file(f"{comfy['models_dir']}/{wan_1280}")
    sample = lambda m: comfy_sample(m, pos, neg, latent_shape)
    ref = sample(_infinite_talk(native, length, grid))
    moved = (ref - sample(native)).abs().max().item()
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(*PATCH_MESHES[mesh], "fp32", "cpu", "sdpa")[0]
    model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load(wan_1280, "fp32", spec)
    try:
        out = sample(_infinite_talk(model, length, grid))
    finally:
        group.stop_all()
    diff = (out - ref).abs().max().item()
    print(f"InfiniteTalk (2 speakers) on {mesh} vs native: {diff:.2e} (the patches move the latent by {moved:.3f})")
    assert moved > 1e-2 and diff <= 1e-4


def _native_file(path):
    import comfy.sd
    return comfy.sd.load_diffusion_model(path)


def comfy_sample(model, pos, neg, shape, steps=3):
    import nodes as comfy_nodes
    latent = {"samples": torch.zeros(*shape)}
    return comfy_nodes.common_ksampler(model, 5, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
