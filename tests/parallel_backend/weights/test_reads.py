"""Loading (parallel_backend/weights/reads.py, runtime/sharded_model.py, runtime/rank.py "load"): fp8 kept as fp8, sharded reads,
reloads on a warm group, per-rank memory while loading, and files that are not what they claim.

One warm tp=2 group (CPU/gloo) serves the multi-rank tests of this module, in order; each test loads
the model it needs. Single-process references use ShardedModel on a world of one.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parallel_backend.config import ParallelConfig
from parallel_backend.models import UnsupportedModelError
from parallel_backend.runtime import group as group_mod
from parallel_backend.runtime.group import get_group, stop_all
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.spmd import run_on_ranks
from parallel_backend.testing.synthetic import write_dequantized, write_fp8_variant, write_tiny_wan
from parallel_backend.weights.reads import CheckpointError, held_dtype, held_parts, model_keys, read_header

CONFIG = ParallelConfig(world_size=2, tp=2, device="cpu", dtype="fp32")
TOL = 1e-5
MiB = 1 << 20
# fp8 vs the same weights in bf16 (bf16 compute, tiny Wan seed 3, 32 tokens x batch 2): relative RMS error
# of the output ||fp8 - bf16|| / ||bf16||, measured 0.045 (fp8_scaled) and 0.051 (plain fp8, no scales);
# max abs 0.19 / 0.23 on outputs of RMS 1.1. Bounds ~2.5x the measured errors.
FP8_SCALED_REL_BOUND = 0.11
FP8_PLAIN_REL_BOUND = 0.13
# per-rank load memory: peak RSS during the load - RSS before it <= shard * 1.10 + this (measured +57 MiB
# on the 14B-shapes file: the largest tensor's file pages while it is copied, allocator slack)
LOAD_OVERHEAD = 150 * MiB
PARENT_RSS_BOUND = 64 * MiB  # the owner (ComfyUI) process while ranks load 1.9 GB: it never holds weights


import comfy_host  # noqa: E402
from tiny_inputs import wan_inputs as inputs  # noqa: E402


def single(path: str, precision: str) -> ShardedModel:
    cfg = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    return ShardedModel(single_rank_mesh(cfg, torch.device("cpu")), path, precision)


def rel(a, b) -> float:
    return ((a - b).float().norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loading")
    f = {"bf16": write_tiny_wan(str(d / "tiny_bf16.safetensors"), seed=3, dtype=torch.bfloat16)}
    f["fp8_scaled"] = write_fp8_variant(f["bf16"], str(d / "tiny_fp8_scaled.safetensors"), scaled=True)
    f["fp8"] = write_fp8_variant(f["bf16"], str(d / "tiny_fp8_e4m3fn.safetensors"), scaled=False)
    f["fp8_scaled_dequant"] = write_dequantized(f["fp8_scaled"], str(d / "tiny_fp8_scaled_dequant.safetensors"))
    f["fp8_dequant"] = write_dequantized(f["fp8"], str(d / "tiny_fp8_dequant.safetensors"))
    f["dir"] = d
    return f


@pytest.fixture(scope="module")
def group():
    g = get_group(CONFIG)
    yield g
    stop_all()


# ------------------------------------------------------------------------------------ fp8, one process


def _linears(model) -> list:
    """The model's Linear layers: torch's, or ComfyUI's mixed-precision ones (plain Modules with in / out features)."""
    return [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


def mixed_precision_host() -> bool:
    """Whether this ComfyUI converts scaled-fp8 files to its mixed-precision layers (0.33: convert_old_quants)."""
    comfy_host.import_comfy()
    import comfy.utils
    return hasattr(comfy.utils, "convert_old_quants")


def test_fp8_kept_as_fp8_upcast_per_layer_with_scales(files):
    """The ranks build ComfyUI's own model for an fp8 file, with ComfyUI's own fp8 layers: a scaled-fp8 file gets
    0.3.75's scaled layers (linears fp8 with their per-tensor scale, biases rounded to fp8) or, on a host with the
    mixed-precision system, its mixed-precision layers (a QuantizedTensor of fp8 data and the scale, biases in the
    compute precision); a plain fp8 file keeps its weights fp8 and casts per layer (as ComfyUI's UNETLoader with
    weight dtype fp8_e4m3fn). Each equals ComfyUI's own model of the same file loaded that way, stored tensor for
    stored tensor."""
    mixed = mixed_precision_host()
    import comfy.sd

    x, t, ctx = inputs()
    outs = {}
    for name in ("fp8_scaled", "fp8"):
        m = single(files[name], "fp32")
        linears = _linears(m.model)
        assert len(linears) == 26 and m.load_stats["fp8_layers"] == 26  # every linear ComfyUI builds
        for mod in linears:
            assert held_dtype(mod.weight) == torch.float8_e4m3fn
            if name == "fp8_scaled" and mixed:
                assert type(mod.weight).__name__ == "QuantizedTensor" and mod.bias.dtype == torch.float32
            else:  # scaled: ComfyUI's override; plain: the fp8 unet dtype
                assert mod.bias.dtype == torch.float8_e4m3fn
                assert (getattr(mod, "scale_weight", None) is not None) == (name == "fp8_scaled")
        assert m.load_stats["checkpoint_precision"] == name
        out = m.forward_rows(x, t, ctx)
        options = {} if name == "fp8_scaled" else {"dtype": torch.float8_e4m3fn}
        native = comfy.sd.load_diffusion_model(files[name], model_options=options).model.diffusion_model
        for mine, theirs in zip(linears, _linears(native)):  # what each layer holds: bit for bit
            assert all(torch.equal(a, b) for a, b in zip(held_parts(mine.weight), held_parts(theirs.weight)))
        with torch.no_grad():
            ref = native(x, t, ctx)
        diff = (out - ref).abs().max().item()
        print(f"{name} (fp32 compute) vs ComfyUI's own model of the file: max abs {diff:.2e}")
        assert diff <= 1e-6
        outs[name] = single(files[name], "bf16").forward_rows(x, t, ctx)
    # the stated tolerance: fp8 against the same weights in bf16, bf16 compute
    ref = single(files["bf16"], "bf16").forward_rows(x, t, ctx)
    for name, bound in (("fp8_scaled", FP8_SCALED_REL_BOUND), ("fp8", FP8_PLAIN_REL_BOUND)):
        e, mx = rel(outs[name], ref), (outs[name] - ref).abs().max().item()
        print(f"{name} vs bf16 weights (bf16 compute): relative RMS {e:.4f}, max abs {mx:.3f} "
              f"(output RMS {ref.float().pow(2).mean().sqrt():.2f}); bound {bound}")
        assert e <= bound


def test_quantized_layouts_equal_the_hosts_own_model_of_the_file(files):
    """ComfyUI's mixed-precision layout, quantized by its own code: named by `_quantization_metadata` (every host
    here reads it), by per-layer `comfy_quant` keys (only the blocks quantized: the other linears are the host's
    unquantized mixed-precision layers), and in block-scaled formats (mxfp8, nvfp4: per-block scales). Each the
    host reads loads on one rank as ComfyUI's own model of the file, stored tensor for stored tensor and output for
    output; a layout the host cannot read (comfy_quant keys before convert_old_quants, where ComfyUI's own output is
    NaN) is refused, naming the file and the fix."""
    mixed = mixed_precision_host()
    import comfy.quant_ops
    import comfy.sd

    from parallel_backend.testing.synthetic import write_quantized_variant

    x, t, ctx = inputs()
    d = files["dir"]
    layouts = {"metadata": write_quantized_variant(files["bf16"], str(d / "q_metadata.safetensors"), "metadata")}
    keys = write_quantized_variant(files["bf16"], str(d / "q_keys.safetensors"), "comfy_quant", only=("blocks.",))
    if not mixed:
        with pytest.raises(ValueError, match=r"q_keys\.safetensors: .*comfy_quant.*update ComfyUI"):
            single(keys, "fp32")
    else:
        layouts["comfy_quant"] = keys
        for fmt in ("mxfp8", "nvfp4"):
            if fmt in comfy.quant_ops.QUANT_ALGOS:
                layouts[fmt] = write_quantized_variant(files["bf16"], str(d / f"q_{fmt}.safetensors"), "comfy_quant",
                                                       fmt, only=("blocks.",))
    for name, path in layouts.items():
        m = single(path, "fp32")
        native = comfy.sd.load_diffusion_model(path).model.diffusion_model
        quantized = [mod for mod in _linears(native) if type(mod.weight).__name__ == "QuantizedTensor"]
        assert len(quantized) == (26 if name == "metadata" else 20)
        for mine, theirs in zip(_linears(m.model), _linears(native)):
            assert type(mine.weight) is type(theirs.weight) and mine.bias.dtype == theirs.bias.dtype
            assert all(torch.equal(a, b) for a, b in zip(held_parts(mine.weight), held_parts(theirs.weight)))
        with torch.no_grad():
            diff = (m.forward_rows(x, t, ctx) - native(x, t, ctx)).abs().max().item()
        print(f"{name}: one rank vs ComfyUI's own model of the file: max abs {diff:.2e} ({len(quantized)} quantized "
              f"linears, {m.load_stats['param_bytes'] / MiB:.2f} MiB)")
        assert diff <= 1e-6


# ------------------------------------------------------------------------------------ fp8 on tp=2 ranks


@pytest.mark.multirank
def test_fp8_tp2_matches_single_process_and_holds_half_the_bytes(files, group):
    g = group
    x, t, ctx = inputs()
    for name in ("fp8_scaled", "fp8"):
        g.load(files[name], "fp32")
        diff = (g.forward(x, t, ctx) - single(files[name], "fp32").forward_rows(x, t, ctx)).abs().max().item()
        print(f"{name}: tp=2 vs single process (fp32 compute) {diff:.2e}")
        assert diff <= TOL
    # each rank reads only its slice of the fp8 linears (scales are per tensor: shared by both shards); 0.3.75's
    # scaled-fp8 layer holds its bias in fp8 too (column-parallel: its slice; row-parallel: whole, zeros beside TP
    # rank 0), a mixed-precision layer in the compute precision
    mixed = mixed_precision_host()
    header = read_header(files["fp8_scaled"])
    numel = lambda k: torch.Size(header[k][0]).numel()
    expected = 0
    for k in model_keys(header):
        if not (k.endswith(".weight") and header[k][1] == "F8_E4M3"):
            continue
        stem = k[:-len(".weight")]
        row = stem.endswith((".o", ".ffn.2"))
        parts = 2 if stem.startswith("blocks.") else 1
        expected += numel(k) // parts
        if not mixed:
            expected += numel(stem + ".bias") if row or parts == 1 else numel(stem + ".bias") // 2
    g.load(files["fp8_scaled"], "bf16")
    fp8_stats = g.rank_load_stats
    g.load(files["bf16"], "bf16")
    bf16_stats = g.rank_load_stats
    for f8, b16 in zip(fp8_stats, bf16_stats):
        print(f"rank param bytes: bf16 {b16['param_bytes'] / MiB:.2f} MiB, fp8_scaled {f8['param_bytes'] / MiB:.2f} MiB "
              f"(fp8 tensors {f8['fp8_weight_bytes'] / MiB:.2f} MiB)")
        assert f8["fp8_weight_bytes"] == expected
        # the same tensors take twice the bytes in bf16: the saving is the fp8 bytes, less the fp32 scales
        # (0.3.75's scaled layers hold a scale_weight and a scale_input, fp32 scalars: 26 linears x 2 x 4 bytes; a
        # mixed-precision layer its weight_scale: ComfyUI drops a scale_input of 1)
        assert f8["fp8_weight_bytes"] - (b16["param_bytes"] - f8["param_bytes"]) == 26 * (1 if mixed else 2) * 4


# ------------------------------------------------------------------------------------ reloads on a warm group


@pytest.mark.multirank
def test_changing_file_or_precision_reloads_in_the_same_ranks_and_frees_the_old_weights(files, group):
    g = group
    d = files["dir"]
    medium = write_tiny_wan(str(d / "medium.safetensors"), dim=1536, ffn_dim=6144, fill=0.01)  # 404 MB fp32
    x, t, ctx = inputs()
    starts, pids = group_mod.starts, list(g.pids)
    steps = [("tiny bf16 file, fp32", files["bf16"], "fp32"), ("medium file, fp32", medium, "fp32"),
             ("medium file, bf16", medium, "bf16"), ("tiny file again, fp32", files["bf16"], "fp32")]
    seen = []
    for name, path, precision in steps:
        loads = g.load_count
        info = g.load(path, precision)
        assert info["reloaded"] and g.load_count == loads + 1
        st = g.stats()
        assert [s["pid"] for s in st] == pids and group_mod.starts == starts
        seen.append(st)
        print(f"{name}: rank RSS " + ", ".join(f"{s['rss'] / MiB:.0f} MiB (params {s['param_bytes'] / MiB:.0f})"
                                              for s in st))
    for r in range(CONFIG.world_size):
        (tiny, med32, med16, again) = (s[r] for s in seen)
        held = med32["param_bytes"] - tiny["param_bytes"]
        slack = 0.10 * held + 32 * MiB
        assert held > 200 * MiB
        assert med32["rss"] - tiny["rss"] >= 0.9 * held  # the medium weights are resident
        # precision change: the fp32 copy is gone, only the bf16 one is held
        assert abs((med16["rss"] - tiny["rss"]) - (med16["param_bytes"] - tiny["param_bytes"])) <= slack
        # back to the first file: memory returns to the first level
        assert abs(again["rss"] - tiny["rss"]) <= slack
    # and the reloaded weights are the tiny file's again
    assert (g.forward(x, t, ctx) - single(files["bf16"], "fp32").forward_rows(x, t, ctx)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------ memory during a load


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.multirank
def test_per_rank_peak_rss_on_real_wan14b_block_shapes(files, group):
    g = group
    # dim 5120, ffn 13824, 2 blocks, bf16: 1.9 GB, every tensor of a real Wan 2.1 14B block and stem
    path = write_tiny_wan(str(files["dir"] / "wan14b_2blocks.safetensors"), preset="wan2.1-14b", num_layers=2,
                          dtype=torch.bfloat16, fill=0.01)
    size = os.path.getsize(path)
    g.load(files["bf16"], "fp32")  # the ranks have imported everything loading needs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this (owner) process's peak RSS
    parent_before = _status("VmRSS")
    g.load(path, "bf16")
    parent_peak = _status("VmHWM") - parent_before
    print(f"file {size / MiB:.0f} MiB; owner process peak RSS during the load +{parent_peak / MiB:.1f} MiB")
    assert parent_peak <= PARENT_RSS_BOUND
    for s in g.rank_load_stats:
        shard = s["param_bytes"] + s["buffer_bytes"]
        grew = s["load_peak_rss"] - s["load_rss_before"]
        print(f"rank: shard {shard / MiB:.0f} MiB, read {s['bytes_read'] / MiB:.0f} MiB, peak RSS - before "
              f"{grew / MiB:.0f} MiB (over the shard: {(grew - shard) / MiB:+.0f} MiB)")
        assert s["bytes_read"] < 0.7 * size  # its slices, not the file
        assert grew <= 1.10 * shard + LOAD_OVERHEAD
    g.load(files["bf16"], "fp32")  # give the memory back for the rest of the session


# ------------------------------------------------------------------------------------ wrong files


def test_wrong_files_fail_naming_the_file_and_the_reason(files, tmp_path):
    with safe_open(files["bf16"], framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}

    def write(name, tensors):
        p = str(tmp_path / name)
        save_file(tensors, p)
        return p

    cases = [
        # another DiT family (Flux-style keys)
        (write("flux_dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 4),
                                        "single_blocks.0.linear1.weight": torch.zeros(8, 4)}),
         UnsupportedModelError, r"flux_dev\.safetensors is not a diffusion transformer.*supported: wan"),
        # a LoRA put where a model belongs
        (write("a_lora.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 8)}),
         UnsupportedModelError, r"a_lora\.safetensors.*LoRAs go in their own loaders"),
        # a Wan file whose second block was cut short
        (write("missing_key.safetensors", {k: v for k, v in sd.items() if k != "blocks.1.cross_attn.k.weight"}),
         CheckpointError, r"missing_key\.safetensors: no weights for 1 parameters.*blocks\.1\.cross_attn\.k\.weight"),
        # a Wan file with a block of another width
        (write("mixed.safetensors", {**sd, "blocks.1.ffn.0.weight": torch.zeros(2048, 512, dtype=torch.bfloat16),
                                     "blocks.1.ffn.0.bias": torch.zeros(2048, dtype=torch.bfloat16)}),
         CheckpointError, r"mixed\.safetensors: blocks\.1\.ffn\.0\.(weight|bias) has shape"),
        # fp8 with per-channel scales (not the per-tensor layout this loader shards)
        (write("per_channel_fp8.safetensors", {**sd, "blocks.0.ffn.0.weight": sd["blocks.0.ffn.0.weight"].to(
            torch.float8_e4m3fn), "blocks.0.ffn.0.scale_weight": torch.ones(1024, 1)}),
         CheckpointError, r"per_channel_fp8\.safetensors: blocks\.0\.ffn\.0\.scale_weight has shape.*per-tensor"),
    ]
    # a pickle wearing a .safetensors name is refused by its header, never unpickled
    disguised = str(tmp_path / "disguised.safetensors")
    with open(disguised, "wb") as f:
        pickle.dump({"blocks.0.self_attn.q.weight": list(range(1000))}, f)
    cases.append((disguised, CheckpointError, r"disguised\.safetensors: not a safetensors file"))
    for path, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            single(path, "fp32")


def test_chunked_shards_take_each_ranks_part_of_every_block():
    """A fused k / v projection split over TP (`shard_chunks` 2): each rank holds its heads' rows of the k block and
    of the v block, joined; the loader's slices and the whole-tensor helper agree."""
    from parallel_backend.weights.reads import _slices_for, shard_of

    t = torch.arange(16).reshape(8, 2)  # rows: k0 k1 k2 k3 | v0 v1 v2 v3
    assert shard_of(t, 0, 0, 2, chunks=2)[:, 0].tolist() == [0, 2, 8, 10]
    assert shard_of(t, 0, 1, 2, chunks=2)[:, 0].tolist() == [4, 6, 12, 14]
    assert [torch.cat([t[i] for i in _slices_for((8, 2), 0, r, 2, 2)]).tolist() for r in (0, 1)] == \
        [shard_of(t, 0, r, 2, 2).tolist() for r in (0, 1)]
    assert torch.equal(shard_of(t, 0, 1, 2), t[4:])  # one chunk: the plain slice
    assert shard_of(t, None, 1, 2) is t


def _forward_rows(mesh, path):
    m = ShardedModel(mesh, path, "fp32")
    x, t, ctx = inputs()
    return m.rows(x.shape[0]), m.forward_rows(x, t, ctx)


@pytest.mark.multirank
@pytest.mark.parametrize("convrot", [False, True], ids=["int8", "int8_convrot"])
def test_int8_files_on_a_split_sequence_round_like_comfyuis_own_kernels(files, convrot):
    """An int8_tensorwise file (ComfyUI 0.33+; the int8 / int8_convrot releases) quantizes every linear's input per
    token as it computes, so a 1e-7 difference in an activation (another attention kernel's summation order) can flip a
    rounding step (1/127 of a row's scale). One rank equals ComfyUI's own model exactly; ulysses2 / ring2 stay within
    3x of what ComfyUI itself moves when only its attention function changes (sdpa -> basic) on the same file; TP is
    refused (a slice of the input channels changes each token's rounding)."""
    if not mixed_precision_host():
        pytest.skip("this ComfyUI has no mixed-precision int8 layers (0.3.75)")
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.wan.model as wan_model
    import comfy.sd
    from comfy_templates import write_int8_variant

    path = write_int8_variant(files["bf16"], str(files["dir"] / f"int8_{convrot}.safetensors"), convrot=convrot)
    x, t, ctx = inputs()
    native = comfy.sd.load_diffusion_model(path).model.diffusion_model
    with torch.no_grad():
        ref = native(x, t, ctx).float()
        original, wan_model.optimized_attention = wan_model.optimized_attention, attention.attention_basic
        try:
            kernel_swap = (native(x, t, ctx).float() - ref).abs().max().item()
        finally:
            wan_model.optimized_attention = original
    assert (single(path, "fp32").forward_rows(x, t, ctx) - ref).abs().max().item() == 0.0
    diffs = {}
    for name, degrees in {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2)}.items():
        got = torch.full_like(ref, float("nan"))
        for rows, y in run_on_ranks(_forward_rows, ParallelConfig(world_size=2, device="cpu", dtype="fp32",
                                                                  **degrees), path):
            got[rows] = y
        diffs[name] = (got - ref).abs().max().item()
    print(f"int8{' convrot' if convrot else ''}: split vs native {diffs}; native sdpa vs native basic attention "
          f"{kernel_swap:.2e}")
    assert kernel_swap > 1e-4 and max(diffs.values()) <= 3 * kernel_swap
    with pytest.raises(Exception, match=r"int8_tensorwise, whose layer quantizes each token's input"):
        run_on_ranks(_forward_rows, ParallelConfig(world_size=2, tp=2, device="cpu", dtype="fp32"), path)


def test_meta_tensors_keep_each_headers_shape_and_dtype_without_storage():
    from parallel_backend.weights.reads import meta_tensors
    sd = meta_tensors({"a.weight": ((4, 2), "F8_E4M3"), "b": ((3,), "Q4_K"), "c": ((), "BF16")})
    assert {k: (tuple(t.shape), t.dtype, t.device.type) for k, t in sd.items()} == {
        "a.weight": ((4, 2), torch.float8_e4m3fn, "meta"), "b": ((3,), torch.float32, "meta"),  # no torch dtype: fp32
        "c": ((), torch.bfloat16, "meta")}
