"""The Wan variants ComfyUI detects by their extra keys, sharded on 4-rank meshes, equal ComfyUI's native forward
of the same class on the same file (fp32, <= 1e-4 max abs), with their extra inputs:

- VACE (VaceWanModel): `vace_context` (two hint streams, so the per-stream path runs) and `vace_strength`
  (a list of numbers, sent with the call); the hint blocks run sharded like the main blocks;
- Fun camera 2.1 (CameraWanModel on an I2V file: CLIP tokens too) and 2.2: `camera_conditions`, turned into
  patch-grid features by the control adapter (whole frames, before the split);
- Wan 2.2 Fun control (WanModel with the reference convolution): `reference_latent`, prepended as tokens;
- HuMo (HumoWanModel): `audio_embed` (per-frame audio cross-attention in every block: the tokens are split frame by
  frame) and `reference_latent` (reference frames appended to the sequence, with zero audio);
- Wan 2.2 Animate (AnimateWanModel, an I2V model): `pose_latents` and `face_pixel_values` (512 x 512 face crops
  through the motion encoder; its face blocks cross-attend frame by frame), on the 45-token case only (the motion
  encoder is slow on CPU). Its tiny file is laid out from ComfyUI's own class (the motion encoder's layout is large);
- Wan 2.2 S2V (WanModel_S2V): `audio_embed`, `reference_latent`, `reference_motion` (frame-pack motion tokens of
  coarser grids after the frames) and `control_video`; a plane of 35 tokens (ragged on 2 and 4 ranks) and of 16.

Token counts that divide the sequence degree (32) and that do not (45). Under tp2 each rank holds half of the
bytes of the blocks a variant adds (asserted within 5%), and ComfyUI picked the class the test expects.

The classes ComfyUI 0.33 added, on a host that has them (skipped elsewhere, naming the host; there the refusal runs):
- Animate 2 (WanAnimate2Model, picked by the file's metadata): `pose_latents` (the pose branch beside the video in
  every block: both streams split frame-aligned), `clip_fea_pose`, `context_pose`, `pose_strength`,
  `reference_strength`;
- SCAIL-2 (SCAIL2WanModel) and SCAIL: `reference_latent` (frames before the video), `pose_latents` at half size
  (tokens after the frames, held whole), SCAIL-2's `ref_mask_latents` / `sam_latents` and `ref_mask_flag` (False:
  the replacement mode's rope);
- WanDancer (WanDancerModel, its music attention fused as released): `audio_embed` (each eighth of a frame
  cross-attends its music token: the frames split in eighths), `clip_fea_ref`, `fps` (30, and 24 on the global
  patch embedding and head), `audio_inject_scale`;
- FlowRVS (WAN21_FlowRVS, by metadata: ComfyUI's WanModel);
on cfg2 x ulysses2, ring2 x tp2 and sharded weights x cfg2 x ulysses2.
A host without such a class refuses its file by name, and causal forcing (CausalWanModel) is refused by name.
"""
import math

import pytest
import torch
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import WAN_PRESETS, preset_shapes, wan_shapes, write_tiny_wan

pytestmark = pytest.mark.multirank
TOL = 1e-4
# preset -> (the class ComfyUI's detection builds, the module prefixes the variant adds)
PRESETS = {
    "tiny-vace": ("VaceWanModel", ("vace_blocks.",)),
    "tiny-camera": ("CameraWanModel", ("control_adapter.",)),
    "tiny-camera-2.2": ("CameraWanModel", ("control_adapter.",)),
    "tiny-fun-control-2.2": ("WanModel", ()),
    "tiny-humo": ("HumoWanModel", ("blocks.0.audio_cross_attn_wrapper.", "blocks.1.audio_cross_attn_wrapper.")),
    "tiny-animate": ("AnimateWanModel", ("face_adapter.",)),
    "tiny-s2v": ("WanModel_S2V", ("audio_injector.injector.",)),
}
S2V = dict(dim=512, ffn_dim=1024, num_heads=4, num_layers=2, in_dim=16)  # its audio injector at block 0 (and unused
#                                                                        ones for blocks 4.., as ComfyUI builds them)
S2V_SHAPES = ((2, 10, 14), (3, 8, 8))  # the frame packer's coarsest grid needs H, W >= 8
ANIMATE = dict(dim=512, ffn_dim=1024, num_heads=4, num_layers=5, in_dim=36)  # one face block (every 5th block)
SHAPES = ((2, 8, 8), (3, 6, 10))  # 32 tokens, and 45 (ragged on 2 and 4 sequence ranks)
T_ROWS = (900.0, 500.0)


def _shapes_of(preset):
    if preset == "tiny-animate":
        return dict(in_dim=ANIMATE["in_dim"], i2v=True)
    if preset == "tiny-s2v":
        return dict(in_dim=S2V["in_dim"])
    return WAN_PRESETS[preset]


def _cases(preset):
    return {"tiny-animate": SHAPES[1:], "tiny-s2v": S2V_SHAPES}.get(preset, SHAPES)


def _write_s2v(path, seed):
    """A tiny Wan 2.2 S2V file: the key layout of ComfyUI's WanModel_S2V built on meta, random values (the audio
    encoder's layer weights positive, as it divides by their sum)."""
    comfy_host.import_comfy()
    import comfy.ops
    from comfy.ldm.wan.model import WanModel_S2V
    from safetensors.torch import save_file

    from parallel_backend.testing.synthetic import random_tensor

    model = WanModel_S2V(**S2V, device="meta", operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    sd = {k: random_tensor(k, tuple(v.shape), g) for k, v in model.state_dict().items()}
    sd["casual_audio_encoder.weights"] = torch.ones_like(sd["casual_audio_encoder.weights"])
    save_file(sd, path)
    return path


def _write_animate(path, seed):
    """A tiny Wan 2.2 Animate file: the key layout of ComfyUI's AnimateWanModel built on meta, random values (the
    motion encoder's StyleGAN-style layers scale their weights by 1 / sqrt(fan in) themselves: unit-variance weights
    there, so a face changes its output)."""
    comfy_host.import_comfy()
    import comfy.ops
    from comfy.ldm.wan.model_animate import AnimateWanModel
    from safetensors.torch import save_file

    from parallel_backend.testing.synthetic import random_tensor

    model = AnimateWanModel(**ANIMATE, device="meta", operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        equalized = k.startswith("motion_encoder.") and k.endswith(".weight") and v.ndim >= 2
        sd[k] = torch.randn(v.shape, generator=g) if equalized else random_tensor(k, tuple(v.shape), g)
    save_file(sd, path)
    return path


def _inputs(preset, thw, seed=0):
    """x, t, context and the variant's keyword inputs, as ComfyUI's BaseModel passes them (batched by row)."""
    g = torch.Generator().manual_seed(seed)
    p = _shapes_of(preset)
    t_, h, w = thw
    x = torch.randn(2, p["in_dim"], *thw, generator=g)
    ctx = torch.randn(2, 12, 4096, generator=g)
    kw = {}
    if p.get("i2v"):
        kw["clip_fea"] = torch.randn(2, 257, 1280, generator=g)
    if p.get("vace_layers"):
        kw["vace_context"] = torch.randn(2, 2, 96, *thw, generator=g)  # (B, streams, 32 latent + 64 mask, T, H, W)
        kw["vace_strength"] = [1.0, 0.6]
    if p.get("camera"):  # Plücker embedding at pixel size: the adapter unshuffles by 8, then patches by 2
        kw["camera_conditions"] = torch.randn(2, 24, t_, 8 * h, 8 * w, generator=g)
    if p.get("ref_conv_in_dim"):
        kw["reference_latent"] = torch.randn(2, p["ref_conv_in_dim"], h, w, generator=g)
    if p.get("humo"):  # whisper features per latent frame (window 8 x 5 layers x 1280) and one reference frame
        kw["audio_embed"] = torch.randn(2, t_, 8, 5, 1280, generator=g)
        kw["reference_latent"] = torch.randn(2, p["in_dim"], 1, h, w, generator=g)
    if preset == "tiny-s2v":  # wav2vec features (25 layers x 1024, 4 per latent frame), a reference frame, 19 frames
        #                       of past motion (the frame packer's buckets), a control video
        kw["audio_embed"] = torch.randn(2, 25, 1024, 4 * t_, generator=g)
        kw["reference_latent"] = torch.randn(2, 16, 1, h, w, generator=g)
        kw["reference_motion"] = torch.randn(2, 16, 19, h, w, generator=g)
        kw["control_video"] = torch.randn(2, 16, t_, h, w, generator=g)
    if preset == "tiny-animate":  # pose latents for frames 1.., face crops for frames 1.. (frame 0 is the reference)
        kw["pose_latents"] = torch.randn(2, 16, t_ - 1, h, w, generator=g)
        kw["face_pixel_values"] = torch.rand(2, 3, t_ - 1, 512, 512, generator=g) * 2 - 1
    return x, torch.tensor(T_ROWS), ctx, kw


def _added_bytes(model, prefixes) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.named_parameters() if n.startswith(prefixes))


def _run_mesh(mesh, paths):
    out = {}
    for preset, path in paths.items():
        m = ShardedModel(mesh, path, "fp32")
        out[(preset, "class")] = type(m.model).__name__
        out[(preset, "added_bytes")] = _added_bytes(m.model, PRESETS[preset][1]) if PRESETS[preset][1] else 0
        for thw in _cases(preset):
            x, t, ctx, kw = _inputs(preset, thw)
            out[(preset, thw)] = (m.rows(2), m.forward_rows(x, t, ctx, **kw))
        del m
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_variants")
    writers = {"tiny-animate": _write_animate, "tiny-s2v": _write_s2v}
    return {p: writers.get(p, lambda path, seed, p=p: write_tiny_wan(path, seed=seed, preset=p))(
        str(d / f"{p}.safetensors"), 5) for p in PRESETS}


@pytest.fixture(scope="module")
def native_outputs(checkpoints):
    comfy_host.import_comfy()
    import comfy.sd

    ref = {}
    for preset, path in checkpoints.items():
        dm = comfy.sd.load_diffusion_model(path).model.diffusion_model
        assert type(dm).__name__ == PRESETS[preset][0]
        for thw in _cases(preset):
            x, t, ctx, kw = _inputs(preset, thw)
            with torch.no_grad():
                ref[(preset, thw)] = dm(x, t, ctx, **kw).float()
        if preset == "tiny-vace":  # the hints matter: the same call without them differs
            with torch.no_grad():
                plain = dm(x, t, ctx, vace_context=torch.zeros_like(kw["vace_context"]), vace_strength=[0.0, 0.0])
            assert (plain.float() - ref[(preset, thw)]).abs().max() > 1e-2
        if preset == "tiny-animate":  # the face motion matters
            with torch.no_grad():
                plain = dm(x, t, ctx, **{**kw, "face_pixel_values": torch.zeros_like(kw["face_pixel_values"])})
            assert (plain.float() - ref[(preset, thw)]).abs().max() > 1e-2
        if preset == "tiny-s2v":  # the audio and the motion matter
            with torch.no_grad():
                for cond in ("audio_embed", "reference_motion"):
                    plain = dm(x, t, ctx, **{**kw, cond: torch.zeros_like(kw[cond])})
                    assert (plain.float() - ref[(preset, thw)]).abs().max() > 1e-2, cond
        if preset == "tiny-humo":  # the audio matters
            with torch.no_grad():
                plain = dm(x, t, ctx, audio_embed=torch.zeros_like(kw["audio_embed"]),
                           reference_latent=kw["reference_latent"])
            assert (plain.float() - ref[(preset, thw)]).abs().max() > 1e-2
    return ref




@pytest.fixture(scope="module")
def world4(checkpoints):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoints, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_variants_equal_comfyui_native(native_outputs, world4, mesh):
    per_rank = [r[mesh] for r in world4]
    assert_rows_match(native_outputs, per_rank, mesh, TOL)
    for preset, (cls, _) in PRESETS.items():
        assert all(r[(preset, "class")] == cls for r in per_rank)


def test_tp2_halves_the_added_blocks(world4):
    """ring2 x tp2: every rank holds half of the bytes of the blocks the variant adds (VACE's hint blocks with
    their projections; the camera adapter's convolutions; HuMo's and S2V's audio attention; Animate's face blocks),
    within 5%. (S2V's and Animate's files are laid out from ComfyUI's classes: their whole size is what a rank without
    TP holds.)"""
    r0_full = {p: world4[0]["cfg2xulysses2"][(p, "added_bytes")] for p in ("tiny-s2v", "tiny-animate")}
    for preset, (_, prefixes) in PRESETS.items():
        if not prefixes:
            continue
        full = (r0_full[preset] if preset in r0_full else
                4 * sum(torch.Size(shape).numel() for k, shape in wan_shapes(**WAN_PRESETS[preset]).items()
                        if k.startswith(prefixes)))
        for r in world4:
            held = r["ring2xtp2"][(preset, "added_bytes")]
            assert abs(held / (full / 2) - 1) <= 0.05, f"{preset}: a tp2 rank holds {held} of {full} bytes"
            assert r["cfg2xulysses2"][(preset, "added_bytes")] == full  # no TP: whole


# ---- the Wan classes ComfyUI 0.33 added ---------------------------------------------------------------------------
# preset -> (the class ComfyUI builds, the module prefixes the variant TP-splits, the shapes run)
PRESETS_033 = {
    "tiny-animate2": ("WanAnimate2Model", (), SHAPES),
    "tiny-scail2": ("SCAIL2WanModel", (), SHAPES),
    "tiny-scail": ("SCAILWanModel", (), SHAPES[1:]),
    "tiny-wandancer": ("WanDancerModel", ("music_injector.injector.",), ((2, 8, 12), (3, 8, 8))),  # eighths of a
    #                                                           frame of 3 tokens (ragged on 2 and 4) and of 2
    "tiny-flowrvs": ("WanModel", (), SHAPES[1:]),
}
# and with sharded weights: Animate 2's block methods are routed through the block's call, where FSDP gathers
MESHES_033 = {**MESHES_4, "sharded_cfg2xulysses2": dict(cfg=2, ulysses=2, shard_weights=True)}
REFUSED_033 = {**{p: c for p, (c, _, _) in PRESETS_033.items()}, "tiny-flowrvs": "WAN21_FlowRVS",
               "tiny-causal": "CausalWanModel"}


def _host() -> str:
    path = comfy_host.comfyui_path()
    version = {}
    with open(f"{path}/comfyui_version.py") as f:
        exec(f.read(), version)
    return f"ComfyUI {version.get('__version__', '?')} at {path}"


def _host_has(cls: str) -> bool:
    comfy_host.import_comfy()
    from parallel_backend.models.wan import host_has_class

    return host_has_class(cls)


def _inputs_033(preset, thw, seed=0, fps=30):
    """x, t, context and the class's keyword inputs, as ComfyUI's BaseModel passes them."""
    g = torch.Generator().manual_seed(seed)
    t_, h, w = thw
    x = torch.randn(2, WAN_PRESETS[preset]["in_dim"], *thw, generator=g)
    ctx = torch.randn(2, 12, 4096, generator=g)
    kw = {"clip_fea": torch.randn(2, 257, 1280, generator=g)} if WAN_PRESETS[preset].get("i2v") else {}
    if preset == "tiny-animate2":  # frame 0 is the reference image's slot: one pose frame fewer
        kw.update(pose_latents=torch.randn(2, 16, t_ - 1, h, w, generator=g),
                  clip_fea_pose=torch.randn(2, 257, 1280, generator=g),
                  context_pose=torch.randn(2, 10, 4096, generator=g), pose_strength=0.9, reference_strength=1.2)
    if preset in ("tiny-scail", "tiny-scail2"):  # latents + 4 mask channels; the pose video at half size
        kw.update(reference_latent=torch.randn(2, 20, 1, h, w, generator=g),
                  pose_latents=torch.randn(2, 20, t_, h // 2, w // 2, generator=g))
    if preset == "tiny-scail2":  # identity masks: the reference frame's and the pose video's; replacement mode
        kw.update(ref_mask_latents=torch.rand(2, 28, 1 + t_, h, w, generator=g).round(),
                  sam_latents=torch.rand(2, 28, t_, h // 2, w // 2, generator=g).round(), ref_mask_flag=False)
    if preset == "tiny-wandancer":  # music features (35 a frame of the music's own rate)
        kw.update(clip_fea_ref=torch.randn(2, 257, 1280, generator=g),
                  audio_embed=torch.randn(2, 4 * t_ + 1, 35, generator=g), fps=fps, audio_inject_scale=0.8)
    return x, torch.tensor(T_ROWS), ctx, kw


def _cases_033(preset):
    """(thw, fps): WanDancer also at 24 fps (its global patch embedding and head)."""
    shapes = PRESETS_033[preset][2]
    return [(thw, 30) for thw in shapes] + ([(shapes[0], 24)] if preset == "tiny-wandancer" else [])


def _run_mesh_033(mesh, paths):
    out = {}
    for preset, path in paths.items():
        m = ShardedModel(mesh, path, "fp32")
        out[(preset, "class")] = type(m.model).__name__
        out[(preset, "added_bytes")] = _added_bytes(m.model, PRESETS_033[preset][1]) if PRESETS_033[preset][1] else 0
        for thw, fps in _cases_033(preset):
            x, t, ctx, kw = _inputs_033(preset, thw, fps=fps)
            out[(preset, thw, fps)] = (m.rows(2), m.forward_rows(x, t, ctx, **kw))
            out[(preset, thw, fps, "tokens")] = (m.seq_state.local_len - m.seq_state.rest, m.seq_state.degree)
        del m
    return out


def _share(preset, thw, degree) -> int:
    """The frames' tokens one rank of a `degree`-way split holds: WanModel's in one run, the others frame-aligned
    (SCAIL's reference frame leads the latent's; WanDancer's unit is an eighth of a frame)."""
    runs = 8 if preset == "tiny-wandancer" else 1
    frames = (thw[0] + (preset in ("tiny-scail", "tiny-scail2"))) * runs
    plane = math.ceil(thw[1] / 2) * math.ceil(thw[2] / 2) // runs
    if preset == "tiny-flowrvs":
        return math.ceil(frames * plane / degree)
    return frames * math.ceil(plane / degree)


def _changes(dm, x, t, ctx, kw, ref, **swap) -> float:
    """How far the native output moves when these inputs are swapped (zeros, or another value)."""
    with torch.no_grad():
        return (dm(x, t, ctx, **{**kw, **swap}).float() - ref).abs().max().item()


@pytest.fixture(scope="module")
def checkpoints_033(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_variants_033")
    return {p: write_tiny_wan(str(d / f"{p}.safetensors"), seed=5, preset=p) for p in REFUSED_033}


@pytest.fixture(scope="module")
def native_033(checkpoints_033):
    if not all(_host_has(c) for c, _, _ in PRESETS_033.values()):
        pytest.skip(f"{_host()} lacks a class ComfyUI 0.33 added (its refusal is tested instead)")
    import comfy.sd

    ref = {}
    for preset, (cls, _, _) in PRESETS_033.items():
        dm = comfy.sd.load_diffusion_model(checkpoints_033[preset]).model.diffusion_model
        assert type(dm).__name__ == cls
        for thw, fps in _cases_033(preset):
            x, t, ctx, kw = _inputs_033(preset, thw, fps=fps)
            with torch.no_grad():
                ref[(preset, thw, fps)] = r = dm(x, t, ctx, **kw).float()
        # the inputs the plan splits or keeps whole matter (the same call with them zeroed or changed differs)
        moved = {"tiny-animate2": ("pose_latents", dict(reference_strength=1.0)),
                 "tiny-scail2": ("pose_latents", "sam_latents", dict(ref_mask_flag=True)),
                 "tiny-scail": ("pose_latents",), "tiny-wandancer": ("audio_embed",)}.get(preset, ())
        for swap in moved:
            swap = swap if isinstance(swap, dict) else {swap: torch.zeros_like(kw[swap])}
            assert _changes(dm, x, t, ctx, kw, r, **swap) > 1e-2, (preset, list(swap))
    return ref


@pytest.fixture(scope="module")
def world4_033(native_033, checkpoints_033):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    paths = {p: checkpoints_033[p] for p in PRESETS_033}
    return run_on_ranks(run_meshes, config, _run_mesh_033, paths, MESHES_033, timeout=900)


@pytest.mark.parametrize("mesh", list(MESHES_033))
def test_033_variants_equal_comfyui_native(native_033, world4_033, mesh):
    per_rank = [r[mesh] for r in world4_033]
    assert_rows_match(native_033, per_rank, mesh, TOL)
    for preset, (cls, _, _) in PRESETS_033.items():
        assert all(r[(preset, "class")] == cls for r in per_rank)
        for thw, fps in _cases_033(preset):  # every rank ran its share of the video's tokens (both streams split)
            for r in per_rank:
                held, degree = r[(preset, thw, fps, "tokens")]
                assert degree == 2 and held == _share(preset, thw, degree), (preset, thw, held)


def test_033_tp2_halves_wandancer_music_injector(world4_033):
    """ring2 x tp2: a rank holds half of the bytes of WanDancer's music injector attention (within 5%)."""
    full = world4_033[0]["cfg2xulysses2"][("tiny-wandancer", "added_bytes")]
    assert full == 4 * sum(torch.Size(v).numel() for k, v in preset_shapes("tiny-wandancer").items()
                           if k.startswith("music_injector.injector."))
    for r in world4_033:
        held = r["ring2xtp2"][("tiny-wandancer", "added_bytes")]
        assert abs(held / (full / 2) - 1) <= 0.05, f"a tp2 rank holds {held} of {full} bytes"


def _one_rank(path):
    from parallel_backend.runtime.mesh import single_rank_mesh

    config = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    return ShardedModel(single_rank_mesh(config, torch.device("cpu")), path, "fp32")


@pytest.mark.parametrize("preset", list(REFUSED_033))
def test_a_host_without_the_class_refuses_its_file_by_name(checkpoints_033, preset):
    """A ComfyUI without the class would build a plain WanModel from the file (its extra keys unused, its metadata
    unread) and sample another model: the loader refuses it, naming the class."""
    cls = REFUSED_033[preset]
    if _host_has(cls):
        tested = "causal forcing's refusal" if preset == "tiny-causal" else "its parity"
        pytest.skip(f"{_host()} has {cls} ({tested} is tested instead)")
    with pytest.raises(ValueError, match=f"ComfyUI's {cls}, which this ComfyUI does not have"):
        _one_rank(checkpoints_033[preset])


def test_causal_forcing_is_refused_by_name(checkpoints_033):
    """CausalWanModel's sampler keeps a KV cache across calls that the ranks do not hold: refused, naming it."""
    if not _host_has("CausalWanModel"):
        pytest.skip(f"{_host()} has no CausalWanModel (the refusal of a host without it is tested instead)")
    with pytest.raises(ValueError, match="CausalWanModel, which the parallel loader cannot run yet: causal forcing"):
        _one_rank(checkpoints_033["tiny-causal"])


# ---- a quantized embedding: S2V's trainable_cond_mask in an fp8_scaled file ------------------------------------------
def _run_s2v(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    x, t, ctx, kw = _inputs("tiny-s2v", S2V_SHAPES[0])
    return m.rows(2), m.forward_rows(x, t, ctx, **kw)


def test_s2v_fp8_scaled_with_its_quantized_embedding_equals_native(tmp_path):
    """In an fp8_scaled S2V file every 2-D weight has a scale, the reference-mask embedding's too: ComfyUI 0.33 loads
    that Embedding as a quantized layer (0.3.75 as its own fp8 embedding); the ranks load it the same way, whole."""
    from parallel_backend.testing.synthetic import write_fp8_variant

    comfy_host.import_comfy()
    import comfy.sd

    path = write_fp8_variant(_write_s2v(str(tmp_path / "s2v.safetensors"), seed=3),
                             str(tmp_path / "s2v_fp8_scaled.safetensors"), scaled=True)
    x, t, ctx, kw = _inputs("tiny-s2v", S2V_SHAPES[0])
    with torch.no_grad():
        ref = comfy.sd.load_diffusion_model(path).model.diffusion_model(x, t, ctx, **kw).float()
    got = torch.full_like(ref, float("nan"))
    for rows, y in run_on_ranks(_run_s2v, ParallelConfig(world_size=2, ulysses=2, device="cpu", dtype="fp32"), path):
        got[rows] = y
    diff = (got - ref).abs().max().item()
    print(f"S2V fp8_scaled (its embedding quantized) on ulysses2 vs native: {diff:.2e}")
    assert diff <= TOL
