"""LTX-2 audio + video, sharded on 4-rank meshes (cfg2 x ulysses2, ring2 x tp2), on 3 ranks (ring3) and on
1 rank, equals ComfyUI 0.33's native LTXAVModel forward on the same file, <= 1e-4 max abs in fp32 (video and audio),
for two layouts (LAYOUTS): LTX-2 (2.0, the 19B release's) and LTX-2.3 (LTX-2.5's too, at other widths: every
attention gated per head, the text cross-attention modulated by its own AdaLN rows and the prompt AdaLNs, the text
connectors as wide as their streams and gated, split rope in float64, middle-of-token positions). Each rank run
builds both files on each mesh.

The oracle is ComfyUI's own loader (`comfy.sd.load_diffusion_model` detects the tiny file as LTXAV, its metadata
config giving the tiny text and audio widths); each case runs its `diffusion_model` with what ComfyUI's LTXAV
BaseModel passes: the [video, audio] pair, the timestep (or the (video, audio) pair process_timestep makes from the
denoise masks), the connectors' text (video and audio halves), the text mask and frame rate. The ranks get the pair
packed into one tensor with its stream shapes and the audio timestep as a cond, as the MODEL proxy sends them.

Cases: video and audio token counts that divide no sequence degree (45 video / 7 audio tokens; 31 / 5), one timestep
per row, per-token video timesteps (frame 0 kept: image-to-video, ComfyUI's per-frame CompressedTimestep) and
per-token audio timesteps (the first audio tokens kept), a padded text mask, and raw text (the text encoder's
`unprocessed_ltxav_embeds`: the text connectors run, natively in LTXAV.extra_conds, on the ranks in the forward).
"""
import os

import pytest
import torch
from mesh_parity import MESHES_4, assert_rows_match, run_meshes

import comfy_host
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import LTXAV_PRESETS, write_tiny_ltxav

pytestmark = [pytest.mark.multirank, pytest.mark.skipif(
    not os.path.isfile(os.path.join(comfy_host.comfyui_path(), "comfy", "ldm", "lightricks", "av_model.py")),
    reason="this ComfyUI has no LTXAVModel (0.3.75: its refusal is tests/parallel_backend/models/test_ltxv.py's)")]
TOL = 1e-4
T_ROWS = (0.7, 0.7)  # cond and uncond at one sigma, as samplers call (see ROWS_DIFFER)
TEXT_TOKENS = 12
LAYOUTS = {"2.0": "tiny", "2.3": "tiny_2_3"}  # label (the keys' stream prefix) -> LTXAV_PRESETS entry
RAW = "raw"  # a case's text: raw (the connectors run), else processed (the connectors' output), with a padded mask

# case -> (video frames, height, width), audio latent frames, per-token video timestep (i2v), per-token audio
# timestep (audio kept at its start), text
CASES = {
    "t2v_45v_7a_masked_text": ((3, 5, 3), 7, False, False, True),
    "i2v_45v_7a": ((3, 5, 3), 7, True, False, False),
    "a2v_45v_7a": ((3, 5, 3), 7, False, True, False),
    "t2v_31v_5a": ((1, 1, 31), 5, False, False, False),
    "t2v_raw_text_31v_5a": ((1, 1, 31), 5, False, False, RAW),
}
# rows at different timesteps: LTXAVModel gates its cross-attentions by the largest timestep of the whole batch, so
# a replica split of the rows (cfg / dp) is refused; every other split equals native
ROWS_DIFFER = "rows_differ_45v_7a"
CASES[ROWS_DIFFER] = CASES["i2v_45v_7a"]


def _text_width(layout, raw):
    """The text's width: 2.0's raw Gemma text is caption_channels wide, the connectors' output twice that (video |
    audio); 2.3's text encoder projects to the streams' widths, raw and processed alike (video | audio)."""
    p = LTXAV_PRESETS[LAYOUTS[layout]]
    if p.get("version") == "2.3":
        return p["width"] + p["audio_width"]
    return p["caption_channels"] * (1 if raw else 2)


def _inputs(case, layout="2.0", seed=0):
    """(video, audio, timestep(s), context, {keyword inputs}) as ComfyUI's LTXAV BaseModel hands them to its
    diffusion model (raw text: with the text encoder's flag, which extra_conds reads)."""
    thw, audio_len, i2v, a2v, text = CASES[case]
    g = torch.Generator().manual_seed(seed)
    vx = torch.randn(2, 128, *thw, generator=g)
    ax = torch.randn(2, 8, audio_len, 16, generator=g)  # LTXAVModel's audio latent: 8 channels x 16 bins
    ctx = torch.randn(2, TEXT_TOKENS, _text_width(layout, text == RAW), generator=g)
    t = torch.tensor((0.8, 0.3) if case == ROWS_DIFFER else T_ROWS)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    if text is True:
        mask[0, 9:] = 0
        mask[1, 5:] = 0
    kw = {"frame_rate": 24, "attention_mask": mask}
    if text == RAW:
        kw = {"frame_rate": 24, "unprocessed_ltxav_embeds": True}
    v_t, a_t = t, t
    if i2v:  # LTXAV.process_timestep: the denoise mask times sigma, one entry per video token
        dm = torch.ones(2, 1, *thw)
        dm[:, :, 0] = 0.0
        v_t = (dm * t.view(2, 1, 1, 1, 1)).flatten(2)[:, 0]
        kw["denoise_mask"] = dm
    if a2v:  # ... and per audio token (the first 3 kept)
        adm = torch.ones(2, 1, audio_len, 1)
        adm[:, :, :3] = 0.0
        a_t = (adm * t.view(2, 1, 1, 1))[:, 0, :, 0]
    return vx, ax, (v_t, a_t), ctx, kw


def _keys(layout, case):
    """The (video, audio) output keys of a case: ("<layout> video", case), ("<layout> audio", case)."""
    return (f"{layout} video", case), (f"{layout} audio", case)


def _run(model, layout="2.0"):
    import comfy.utils

    out = {}
    for case in CASES:
        vx, ax, (v_t, a_t), ctx, kw = _inputs(case, layout)
        video_key, audio_key = _keys(layout, case)
        x, shapes = comfy.utils.pack_latents([vx, ax])
        try:
            y = model.forward_rows(x, v_t, ctx, a_timestep=a_t, latent_shapes=[tuple(s) for s in shapes], **kw)
        except ValueError as e:
            out[video_key] = out[audio_key] = str(e)
            continue
        rows = model.rows(2)
        if y is None:
            out[video_key] = out[audio_key] = (rows, None)
            continue
        video, audio = comfy.utils.unpack_latents(y, shapes)
        out[video_key], out[audio_key] = (rows, video), (rows, audio)
    return out


def _run_mesh(mesh, paths):
    """Every layout's file on this mesh (one rank run for both)."""
    return {k: v for layout, path in paths.items() for k, v in _run(ShardedModel(mesh, path, "fp32"), layout).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The 2.0 layout's file (the LoRA / fp8 variants are made of it)."""
    return write_tiny_ltxav(str(tmp_path_factory.mktemp("ltxav") / "ltx2_tiny.safetensors"), seed=5)


@pytest.fixture(scope="module")
def checkpoints(checkpoint, tmp_path_factory):
    """layout -> tiny file."""
    d = tmp_path_factory.mktemp("ltxav_2_3")
    return {"2.0": checkpoint, "2.3": write_tiny_ltxav(str(d / "ltx2_3_tiny.safetensors"), seed=5, preset="tiny_2_3")}


def ltxav_native(path):
    """ComfyUI's own LTXAV model for the file, as its Load Diffusion Model loads it (fp32)."""
    comfy_host.import_comfy()
    import comfy.sd

    return comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32}).model


def _native(diffusion_model, layout, case):
    """ComfyUI's forward of a case: raw text through the connectors first, as LTXAV.extra_conds does."""
    vx, ax, t, ctx, kw = _inputs(case, layout)
    with torch.no_grad():
        if kw.pop("unprocessed_ltxav_embeds", False):
            ctx = diffusion_model.preprocess_text_embeds(ctx, unprocessed=True)
        return diffusion_model([vx, ax], t, ctx, **kw)


@pytest.fixture(scope="module")
def native_models(checkpoints):
    """layout -> ComfyUI's LTXAVModel of its file."""
    out = {}
    for layout, path in checkpoints.items():
        base = ltxav_native(path)
        assert type(base).__name__ == "LTXAV" and type(base.diffusion_model).__name__ == "LTXAVModel"
        out[layout] = base.diffusion_model
    return out


@pytest.fixture(scope="module")
def native_outputs(native_models):
    ref = {}
    for layout, model in native_models.items():
        for case in CASES:
            video, audio = _native(model, layout, case)
            video_key, audio_key = _keys(layout, case)
            ref[video_key], ref[audio_key] = video.float(), audio.float()
    return ref


def test_the_2_3_layout_is_built_with_its_flags(native_models):
    """ComfyUI's loader builds the 2.3 file with its metadata's flags: gated attention (blocks and connectors),
    cross-attention AdaLN (9 rows, the prompt AdaLNs), no caption projection, split rope in float64."""
    model = native_models["2.3"]
    block = model.transformer_blocks[0]
    assert model.cross_attention_adaln and block.scale_shift_table.shape[0] == 9
    assert model.prompt_adaln_single is not None and model.audio_prompt_adaln_single is not None
    assert all(getattr(block, a).to_gate_logits is not None for a in ("attn1", "attn2", "audio_to_video_attn"))
    assert model.video_embeddings_connector.transformer_1d_blocks[0].attn1.to_gate_logits is not None
    assert model.caption_proj_before_connector and not model.caption_projection_first_linear
    assert model.split_positional_embedding == "split" and model.freq_grid_generator.__name__.endswith("_np")


def test_native_outputs_are_not_trivial(native_outputs):
    """The audio reaches the video and back (the cross-attentions act), per-token timesteps change both, and the
    text reaches both streams (raw text through the connectors)."""
    for layout in LAYOUTS:
        out = {(k[0].split()[1], k[1]): v for k, v in native_outputs.items() if k[0].startswith(layout + " ")}
        v, a = out[("video", "t2v_45v_7a_masked_text")], out[("audio", "t2v_45v_7a_masked_text")]
        assert v.abs().mean() > 0.1 and a.abs().mean() > 0.1
        for stream in ("video", "audio"):
            assert (out[(stream, "a2v_45v_7a")] - out[(stream, "i2v_45v_7a")]).abs().max() > 1e-2
            assert (out[(stream, "t2v_raw_text_31v_5a")] - out[(stream, "t2v_31v_5a")]).abs().max() > 1e-2


def test_one_rank_equals_comfyui_native(checkpoints, native_outputs):
    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    assert_rows_match(native_outputs, [_run_mesh(mesh, checkpoints)], "1 rank", TOL)


@pytest.fixture(scope="module")
def world4(checkpoints):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4["cfg2xulysses2"])
    return run_on_ranks(run_meshes, config, _run_mesh, checkpoints, MESHES_4, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES_4))
def test_sharded_forward_equals_comfyui_native(native_outputs, world4, mesh):
    config = ParallelConfig(world_size=4, device="cpu", dtype="fp32", **MESHES_4[mesh])
    per_rank = [r[mesh] for r in world4]
    if config.cfg > 1:  # the replicas split the rows: rows at different timesteps are refused with what to change
        assert all("set cfg and dp to 1" in r[_keys(layout, ROWS_DIFFER)[0]] for r in per_rank for layout in LAYOUTS)
        native_outputs = {k: v for k, v in native_outputs.items() if k[1] != ROWS_DIFFER}
    assert_rows_match(native_outputs, per_rank, config.describe(), TOL)


def test_odd_world_size_ring3_equals_comfyui_native(checkpoints, native_outputs):
    """3 ranks: 32 heads do not divide by 3, so both streams split by Ring; every token count is ragged on 3."""
    config = ParallelConfig(world_size=3, device="cpu", dtype="fp32", ring=3)
    assert_rows_match(native_outputs, run_on_ranks(_run_mesh, config, checkpoints), config.describe(), TOL)


def test_sharded_weights_equal_comfyui_native(checkpoints, native_outputs):
    """Sharded weights (each block's weights, both streams', split over the ranks, gathered as it runs) on ulysses2,
    both layouts."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", ulysses=2, shard_weights=True)
    assert_rows_match(native_outputs, run_on_ranks(_run_mesh, config, checkpoints), config.describe(), TOL)


def test_pipeline_stages_equal_comfyui_native(checkpoints, native_outputs):
    """Two pipeline stages (one block each, both layouts): the (video, audio) pair passes stage to stage, stream by
    stream; the connectors, embeddings and both heads run on each stage."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", pp=2)
    assert_rows_match(native_outputs, run_on_ranks(_run_mesh, config, checkpoints), config.describe(), TOL)


# ---- a LoRA (ComfyUI's key layout) and an fp8_scaled file on tp2: each layer's rows split after the merge / scale ----
LORA_STRENGTH = 0.8
# column- and row-split layers of both streams and of the audio <-> video cross-attentions
LORA_MODULES = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.audio_attn1.to_k",
                "transformer_blocks.1.audio_to_video_attn.to_v", "transformer_blocks.1.video_to_audio_attn.to_out.0",
                "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.audio_ff.net.2")
VARIANT_CASES = ("t2v_45v_7a_masked_text", "a2v_45v_7a")


def _write_lora(path, model_path):
    """A rank-4 LoRA in ComfyUI's names (`diffusion_model.<module>.lora_up / lora_down / alpha`)."""
    from safetensors.torch import save_file

    from parallel_backend.weights.reads import read_header

    header, g, out = read_header(model_path), torch.Generator().manual_seed(9), {}
    for m in LORA_MODULES:
        rows, cols = header["model.diffusion_model." + m + ".weight"][0]
        out[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.05
        out[f"diffusion_model.{m}.lora_down.weight"] = torch.randn(4, cols, generator=g) / cols ** 0.5
        out[f"diffusion_model.{m}.alpha"] = torch.tensor(2.0)
    save_file(out, path)
    return path


@pytest.fixture(scope="module")
def variants(checkpoint, tmp_path_factory):
    from parallel_backend.testing.synthetic import write_fp8_variant

    d = tmp_path_factory.mktemp("ltxav_variants")
    return {"lora": _write_lora(str(d / "ltx2_lora.safetensors"), checkpoint),
            "fp8_scaled": write_fp8_variant(checkpoint, str(d / "ltx2_fp8_scaled.safetensors"), keep_metadata=True)}


def _native_variant(path, lora=None):
    """ComfyUI's loader of the file (LoraLoader's merge for the LoRA) on the variant cases."""
    comfy_host.import_comfy()
    import comfy.sd
    import comfy.utils

    patcher = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32})
    if lora:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(lora), LORA_STRENGTH, 0)
    out = {}
    with torch.no_grad():
        patcher.patch_model()
        try:
            for case in VARIANT_CASES:
                video, audio = _native(patcher.model.diffusion_model, "2.0", case)
                video_key, audio_key = _keys("2.0", case)
                out[video_key], out[audio_key] = video.float(), audio.float()
        finally:
            patcher.unpatch_model()
    return out


def _run_variants(mesh, checkpoint, variants):
    from parallel_backend.weights.lora import lora_key

    lora = ShardedModel(mesh, checkpoint, "fp32")
    lora.set_loras(lora_key([(variants["lora"], LORA_STRENGTH)]))
    fp8 = ShardedModel(mesh, variants["fp8_scaled"], "fp32")
    return {"lora": _variant_rows(lora), "fp8_scaled": _variant_rows(fp8)}


def _variant_rows(model):
    return {k: v for k, v in _run(model).items() if k[1] in VARIANT_CASES}


def test_lora_and_fp8_scaled_on_tp2_equal_comfyui_native(native_outputs, checkpoint, variants):
    """A LoRA merged on the ranks (ComfyUI's own key map and patch code per layer, then the TP split) and an
    fp8_scaled file (ComfyUI's scaled-fp8 layers) on tp2 equal ComfyUI's LoraLoader / its loader of the same files,
    video and audio."""
    config = ParallelConfig(world_size=2, device="cpu", dtype="fp32", tp=2)
    per_rank = run_on_ranks(_run_variants, config, checkpoint, variants, timeout=600)
    for kind in ("lora", "fp8_scaled"):
        ref = _native_variant(checkpoint, variants["lora"]) if kind == "lora" else _native_variant(
            variants["fp8_scaled"])
        for key in _keys("2.0", "t2v_45v_7a_masked_text"):  # the variant changes both streams' outputs
            assert (ref[key] - native_outputs[key]).abs().max() > 1e-3, (kind, key)
        assert_rows_match(ref, [r[kind] for r in per_rank], f"tp2 {kind}", TOL)
