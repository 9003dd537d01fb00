"""LoRA (parallel_backend/lora.py, runner.ShardedModel.set_loras, WorkerGroup.load(..., loras=...)).

Key formats are mapped from headers alone (no ranks). The merge is checked on a warm tp=2 group (every
attention / ffn linear is column- or row-sharded there, so each rank merges only its slice of `up` or
`down`) against single-process references whose checkpoints were merged by hand in the checkpoint's
own key space (W + strength * delta, deltas worked out by synthetic.write_wan_lora). Changing the
strength or the list re-merges in the same processes without re-reading the model.
LoHa / LoKr / DoRA files (merged whole-layer by ComfyUI's own code in the ranks) are checked the same way against
hand merges whose deltas synthetic.write_wan_adapter works out independently of ComfyUI.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parallel_backend.config import ParallelConfig
from parallel_backend.models import wan
from parallel_backend.runtime import group as group_mod
from parallel_backend.runtime.group import WorkerGroupError, get_group, stop_all
from parallel_backend.runtime.mesh import single_rank_mesh
from parallel_backend.runtime.sharded_model import ShardedModel
from parallel_backend.testing.synthetic import (
    ADAPTER_FORMATS,
    write_dequantized,
    write_fp8_variant,
    write_tiny_cosmos,
    write_tiny_wan,
    write_wan_adapter,
    write_wan_lora,
)
from parallel_backend.weights.lora import LoraError, alias_table, lora_key, plan_lora, read_lora_header
from parallel_backend.weights.reads import model_keys, read_header

CONFIG = ParallelConfig(world_size=2, tp=2, device="cpu", dtype="fp32")
TOL = 1e-5  # fp32 max abs, sharded merge vs merged-by-hand single process


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    f = {"base": write_tiny_wan(str(d / "tiny_wan.safetensors"), seed=5)}
    f["deltas"] = {}
    for fmt in ("comfy", "kohya", "peft"):
        path = str(d / f"lora_{fmt}.safetensors")
        f["deltas"][path] = write_wan_lora(path, f["base"], fmt=fmt, rank=4, alpha=2.0, seed=10 + len(fmt),
                                           extras=(fmt == "comfy"))
        f[fmt] = path
    # a LoRA of the same layout for a wider model: must be refused, not merged
    wide = write_tiny_wan(str(d / "wide.safetensors"), dim=1024, ffn_dim=2048)
    f["wrong_shape"] = str(d / "lora_wide.safetensors")
    write_wan_lora(f["wrong_shape"], wide, fmt="comfy")
    f["bf16"] = write_tiny_wan(str(d / "tiny_wan_bf16.safetensors"), seed=5, dtype=torch.bfloat16)
    f["fp8"] = write_fp8_variant(f["bf16"], str(d / "tiny_wan_fp8_scaled.safetensors"), scaled=True)
    f["fp8_dequant"] = write_dequantized(f["fp8"], str(d / "tiny_wan_fp8_dequant.safetensors"))
    for i, kind in enumerate(ADAPTER_FORMATS):  # LoHa / LoKr (factorised, unfactorised) / DoRA
        path = str(d / f"adapter_{kind}.safetensors")
        f["deltas"][path] = write_wan_adapter(path, f["base"], kind, seed=30 + i)
        f[kind] = path
    # DoRA's result depends on the base weight: one written for the fp8 file's (dequantized) weights
    f["dora_fp8"] = str(d / "adapter_dora_fp8.safetensors")
    f["deltas"][f["dora_fp8"]] = write_wan_adapter(f["dora_fp8"], f["fp8_dequant"], "dora", seed=41)
    # a LoHa for the wider model: ComfyUI's adapter cannot apply it here; refused, naming the file
    f["loha_wide"] = str(d / "adapter_loha_wide.safetensors")
    write_wan_adapter(f["loha_wide"], wide, "loha", seed=42, blocks=[0])
    f["dir"] = d
    return f


import comfy_host  # noqa: E402
from tiny_inputs import wan_inputs as inputs  # noqa: E402


def merged_by_hand(files, src: str, loras, dst: str) -> str:
    """`src` with W += strength * delta for each (lora, strength), in the checkpoint's key space."""
    with safe_open(src, framework="pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    for path, strength in loras:
        for key, delta in files["deltas"][path].items():
            sd[key] = sd[key] + strength * delta
    save_file(sd, dst)
    return dst


def native_with_loras(model_path: str, loras, x, t, ctx) -> torch.Tensor:
    """ComfyUI's own result: its loader, its LoRA loader and its ModelPatcher patching the weights (for an fp8 model:
    merged in fp32, then rounded back to fp8 with the key-seeded stochastic rounding)."""
    comfy_host.import_comfy()
    import comfy.sd
    import comfy.utils

    patcher = comfy.sd.load_diffusion_model(model_path)
    for path, strength in loras:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(path), strength, 0)
    with torch.no_grad():  # (ComfyUI patches and samples without autograd)
        patcher.patch_model()
        try:
            return patcher.model.diffusion_model(x, t, ctx).float()
        finally:
            patcher.unpatch_model()


def reference(path: str, x, t, ctx) -> torch.Tensor:
    cfg = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    return ShardedModel(single_rank_mesh(cfg, torch.device("cpu")), path, "fp32").forward_rows(x, t, ctx)


# ------------------------------------------------------------------------------------ key formats (headers only)


def test_formats_map_to_the_same_parameters_from_headers(files):
    header = read_header(files["base"])
    # the model is ComfyUI's own class: its parameter names are the checkpoint's keys; diffusers' names (PEFT LoRAs)
    # are aliases through diffusers' own key converter
    key_map = {k: k for k in model_keys(header)}
    aliases = wan.diffusers_names(model_keys(header))
    table = alias_table(key_map, aliases)
    # the three spellings of one module reach the same parameter
    assert table["diffusion_model.blocks.0.self_attn.q"] == "blocks.0.self_attn.q"
    assert table["lora_unet_blocks_0_self_attn_q"] == "blocks.0.self_attn.q"
    assert table["transformer.blocks.0.attn1.to_q"] == "blocks.0.self_attn.q"
    assert table["lora_unet_blocks_1_ffn_2"] == "blocks.1.ffn.2"
    targets = {}
    for fmt in ("comfy", "kohya", "peft"):
        lh = read_lora_header(files[fmt])
        ts, unmatched = plan_lora(files[fmt], lh, key_map, header, {k: 2.0 for k in lh if k.endswith(".alpha")},
                                  aliases)
        assert unmatched == []
        targets[fmt] = {(t.param, t.kind) for t in ts}
    linears = {(t, "lora") for t in (f"blocks.{b}.{m}.weight" for b in (0, 1) for m in
               ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"))}
    assert targets["kohya"] == targets["peft"] == linears
    assert targets["comfy"] == linears | {("blocks.0.self_attn.norm_q.weight", "diff"), ("blocks.0.self_attn.q.bias", "diff"),
                                          ("blocks.0.ffn.2.bias", "diff")}


def test_bad_lora_files_are_refused_naming_the_file(files, tmp_path):
    header = read_header(files["base"])
    key_map = {k: k for k in model_keys(header)}
    lh = read_lora_header(files["wrong_shape"])
    with pytest.raises(LoraError, match=r"lora_wide\.safetensors.*do not fit.*another model"):
        plan_lora(files["wrong_shape"], lh, key_map, header)
    # a text-encoder LoRA: nothing belongs to the DiT
    te = str(tmp_path / "te_lora.safetensors")
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, te)
    with pytest.raises(LoraError, match=r"te_lora\.safetensors: none of this LoRA's 2 tensors belong"):
        plan_lora(te, read_lora_header(te), key_map, header)
    # DoRA / LoHa on a family without ComfyUI's class in its ranks (adapters=False): refused, never half-applied
    dora = str(tmp_path / "dora.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 512),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(512, 4),
               "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(512, 1)}, dora)
    with pytest.raises(LoraError, match=r"dora\.safetensors.*DoRA adapter.*ComfyUI's own model class.*plain LoRA"):
        plan_lora(dora, read_lora_header(dora), key_map, header)
    for kind in ADAPTER_FORMATS:
        name = {"loha": "LoHa", "lokr": "LoKr", "lokr_full": "LoKr", "dora": "DoRA"}[kind]
        with pytest.raises(LoraError, match=rf"adapter_{kind}\.safetensors.*{name} adapter"):
            plan_lora(files[kind], read_lora_header(files[kind]), key_map, header)
    # ... and whole-layer targets where the family can merge them
    for kind in ADAPTER_FORMATS:
        ts, unmatched = plan_lora(files[kind], read_lora_header(files[kind]), key_map, header, adapters=True)
        assert unmatched == [] and len(ts) == 20 and {t.kind for t in ts} == {"adapter"}
    # a reshaped LoRA (it would change the layer's shape) is refused even there
    reshaped = str(tmp_path / "reshaped.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 512),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(512, 4),
               "diffusion_model.blocks.0.self_attn.q.reshape_weight": torch.tensor([600, 512])}, reshaped)
    with pytest.raises(LoraError, match=r"reshaped\.safetensors.*reshaped LoRA.*native model"):
        plan_lora(reshaped, read_lora_header(reshaped), key_map, header, adapters=True)
    # not a LoRA at all (a model file picked from the loras folder)
    with pytest.raises(LoraError, match=r"tiny_wan\.safetensors: not a LoRA file"):
        read_lora_header(files["base"])
    # a pickle LoRA is refused unopened
    pt = str(tmp_path / "old_lora.pt")
    with open(pt, "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(LoraError, match=r"old_lora\.pt.*pickle.*refused"):
        read_lora_header(pt)
    with pytest.raises(LoraError, match="LoRA file not found"):
        lora_key([(str(tmp_path / "missing.safetensors"), 1.0)])
    assert lora_key([(files["comfy"], 0.0)]) == ()  # strength 0 is no LoRA


# ------------------------------------------------------------------------------------ tp=2 merge on a warm group


@pytest.fixture(scope="module")
def group():
    g = get_group(CONFIG)
    yield g
    stop_all()


@pytest.mark.multirank
def test_tp2_merge_matches_hand_merged_reference_and_switches_without_restart(files, group):
    g, d = group, files["dir"]
    x, t, ctx = inputs()
    starts, pids = group_mod.starts, list(g.pids)
    g.load(files["base"], "fp32")
    loads = g.load_count
    base_out = g.forward(x, t, ctx)
    diff = (base_out - reference(files["base"], x, t, ctx)).abs().max().item()
    assert diff <= TOL

    cases = [
        ("comfy x1.0", [(files["comfy"], 1.0)]),
        ("comfy x0.5 (strength change)", [(files["comfy"], 0.5)]),
        ("kohya x0.8 + peft x-0.6 (list change)", [(files["kohya"], 0.8), (files["peft"], -0.6)]),
        ("all three", [(files["comfy"], 0.3), (files["kohya"], 1.0), (files["peft"], 0.7)]),
    ]
    lora_count = g.lora_count
    for i, (name, loras) in enumerate(cases):
        info = g.load(files["base"], "fp32", loras=loras)
        assert info["reloaded"] is False and info["lora_changed"] is True
        out = g.forward(x, t, ctx)
        ref = reference(merged_by_hand(files, files["base"], loras, str(d / f"merged_{i}.safetensors")), x, t, ctx)
        diff = (out - ref).abs().max().item()
        moved = (ref - base_out).abs().max().item()
        print(f"LoRA {name}: tp=2 vs merged by hand {diff:.2e} (the LoRA moves the output by {moved:.3f})")
        assert diff <= TOL and moved > 100 * TOL
        assert g.lora_count == lora_count + i + 1
    # same list again: no message to the ranks at all
    lc = g.lora_count
    g.load(files["base"], "fp32", loras=cases[-1][1])
    assert g.lora_count == lc
    # LoRAs off: the base weights come back from the file exactly
    info = g.load(files["base"], "fp32", loras=[])
    assert info["lora_changed"] is True
    assert torch.equal(g.forward(x, t, ctx), base_out)
    stats = g.stats()
    assert [s["pid"] for s in stats] == pids and group_mod.starts == starts
    assert g.load_count == loads and all(s["loads"] == 1 for s in stats)  # the model was read once

    # a LoRA that does not fit fails with the file's name; the group stays up with the base weights
    with pytest.raises(WorkerGroupError, match=r"lora_wide\.safetensors.*another model"):
        g.load(files["base"], "fp32", loras=[(files["wrong_shape"], 1.0)])
    g.load(files["base"], "fp32", loras=[])
    assert g.alive() and g.pids == pids and torch.equal(g.forward(x, t, ctx), base_out)


@pytest.mark.multirank
def test_tp2_lora_on_fp8_weights_stays_fp8_as_native_and_unmerges(files, group):
    """A LoRA on an fp8_scaled model: each layer merged whole, rounded back to fp8 as ComfyUI's ModelPatcher rounds
    it (seeded by the key), then sliced: = ComfyUI's native LoRA-patched model; the layers stay fp8; unmerge gives
    the file's fp8 shards back."""
    g = group
    x, t, ctx = inputs()
    plain = g.load(files["fp8"], "fp32")
    fp8_bytes = [s["fp8_weight_bytes"] for s in g.rank_load_stats]
    assert all(b > 0 for b in fp8_bytes)
    plain_out = g.forward(x, t, ctx)
    loras = [(files["comfy"], 0.9)]
    g.load(files["fp8"], "fp32", loras=loras)
    out = g.forward(x, t, ctx)
    ref = native_with_loras(files["fp8"], loras, x, t, ctx)
    diff = (out - ref).abs().max().item()
    # the re-rounding matters: merging into an fp32 copy (the dequantized weights merged by hand) differs
    upcast = reference(merged_by_hand(files, files["fp8_dequant"], loras, str(Path(files["dir"]) / "merged_fp8.safetensors")),
                       x, t, ctx)
    print(f"LoRA on fp8_scaled weights (tp=2) vs ComfyUI's native LoRA-patched fp8 model: {diff:.2e} "
          f"(an fp32 merge would differ by {(upcast - ref).abs().max().item():.2e})")
    assert diff <= TOL and (upcast - ref).abs().max() > 10 * TOL
    assert [s["fp8_weight_bytes"] for s in g.rank_load_stats] == fp8_bytes  # merged layers stay fp8
    # LoHa and LoKr on the same fp8 layers: ComfyUI's adapters on the whole dequantized layer, stored back as it does
    loras = [(files["loha"], 0.7), (files["lokr"], 0.5)]
    g.load(files["fp8"], "fp32", loras=loras)
    diff = (g.forward(x, t, ctx) - native_with_loras(files["fp8"], loras, x, t, ctx)).abs().max().item()
    print(f"LoHa x0.7 + LoKr x0.5 on fp8_scaled weights (tp=2) vs ComfyUI's native patched fp8 model: {diff:.2e}")
    assert diff <= TOL
    g.load(files["fp8"], "fp32", loras=[])
    assert [s["fp8_weight_bytes"] for s in g.rank_load_stats] == fp8_bytes  # fp8 shards and scales back
    assert torch.equal(g.forward(x, t, ctx), plain_out)
    assert plain["fp8_layers"] == 26


def test_lora_on_each_quantized_layout_equals_comfyuis_patched_model(files, tmp_path):
    """One rank, ComfyUI's mixed-precision layouts the host reads (quantized by its own code: the metadata layout with
    every linear fp8; comfy_quant keys, blocks only, fp8 and mxfp8's block scales): a LoRA and a LoHa merged into
    the quantized layers equal ComfyUI's own LoRA-patched model of the file (its patch_weight_to_device: dequantize,
    patch, requantize with a recalculated scale and key-seeded stochastic rounding); clearing them gives the file's
    layers back."""
    comfy_host.import_comfy()
    import comfy.quant_ops
    import comfy.utils

    from parallel_backend.testing.synthetic import write_quantized_variant

    layouts = {"metadata": dict(layout="metadata")}
    if hasattr(comfy.utils, "convert_old_quants"):
        layouts["comfy_quant"] = dict(layout="comfy_quant", only=("blocks.",))
        if "mxfp8" in comfy.quant_ops.QUANT_ALGOS:
            layouts["mxfp8"] = dict(layout="comfy_quant", fmt="mxfp8", only=("blocks.",))
    x, t, ctx = inputs()
    loras = [(files["comfy"], 0.9), (files["loha"], 0.6)]
    cfg = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    for name, kw in layouts.items():
        path = write_quantized_variant(files["bf16"], str(tmp_path / f"{name}.safetensors"), **kw)
        m = ShardedModel(single_rank_mesh(cfg, torch.device("cpu")), path, "fp32")
        plain = m.forward_rows(x, t, ctx)
        info = m.set_loras(loras)
        diff = (m.forward_rows(x, t, ctx) - native_with_loras(path, loras, x, t, ctx)).abs().max().item()
        moved = (native_with_loras(path, loras, x, t, ctx) - plain).abs().max().item()
        print(f"{name}: LoRA x0.9 + LoHa x0.6 on its quantized layers ({info['lora_full_layers']} merged whole) vs "
              f"ComfyUI's native patched model: {diff:.2e} (the patch moves the output by {moved:.3f})")
        assert diff <= 1e-6 and moved > 100 * TOL
        m.set_loras([])
        assert torch.equal(m.forward_rows(x, t, ctx), plain)


def test_loha_merges_on_cosmos_like_a_hand_merge(files, tmp_path):
    """Cosmos runs ComfyUI's MiniTrainDIT in its ranks too, so a LoHa file merges there: the patched layer equals
    base + strength * (w1a @ w1b) * (w2a @ w2b) (alpha absent: scale 1), the others stay the file's."""
    path = write_tiny_cosmos(str(tmp_path / "cosmos.safetensors"), seed=2)
    cfg = ParallelConfig(world_size=1, device="cpu", dtype="fp32")
    sm = ShardedModel(single_rank_mesh(cfg, torch.device("cpu")), path, "fp32")
    before = {n: p.clone() for n, p in sm.model.named_parameters()}
    w = before["blocks.0.self_attn.q_proj.weight"]
    g = torch.Generator().manual_seed(3)
    parts = {k: 0.1 * torch.randn(*shape, generator=g) for k, shape in (
        ("hada_w1_a", (w.shape[0], 2)), ("hada_w1_b", (2, w.shape[1])),
        ("hada_w2_a", (w.shape[0], 2)), ("hada_w2_b", (2, w.shape[1])))}
    loha = str(tmp_path / "cosmos_loha.safetensors")
    save_file({f"diffusion_model.blocks.0.self_attn.q_proj.{k}": v for k, v in parts.items()}, loha)
    sm.set_loras([(loha, 0.7)])
    expected = w + 0.7 * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    after = dict(sm.model.named_parameters())
    d = (after["blocks.0.self_attn.q_proj.weight"] - expected).abs().max().item()
    assert d <= 1e-6 and (expected - w).abs().max() > 1e-3, d
    assert all(torch.equal(p, before[n]) for n, p in after.items() if n != "blocks.0.self_attn.q_proj.weight")
    sm.set_loras([])
    assert all(torch.equal(p, before[n]) for n, p in sm.model.named_parameters())


@pytest.mark.multirank
def test_tp2_loha_lokr_dora_match_hand_merges_and_restrength(files, group):
    """LoHa, LoKr (factorised and not) and DoRA on tp=2: each rank's slice of the whole layer patched by ComfyUI's
    code; a new strength re-merges (DoRA is not linear in its delta: the restore must be exact for it to match)."""
    g, d = group, files["dir"]
    x, t, ctx = inputs()
    g.load(files["base"], "fp32", loras=[])
    base_out = g.forward(x, t, ctx)
    pids, loads = list(g.pids), g.load_count
    cases = [
        ("LoHa x0.8", [(files["loha"], 0.8)]),
        ("LoKr (factorised) x1.0", [(files["lokr"], 1.0)]),
        ("LoKr (unfactorised) x-0.7", [(files["lokr_full"], -0.7)]),
        ("DoRA x1.0", [(files["dora"], 1.0)]),
        ("DoRA x0.4 (strength change)", [(files["dora"], 0.4)]),
        ("LoHa x0.5 + plain LoRA x0.6 + LoKr x0.3 (same layers)",
         [(files["loha"], 0.5), (files["comfy"], 0.6), (files["lokr"], 0.3)]),
    ]
    worst = 0.0
    for i, (name, loras) in enumerate(cases):
        info = g.load(files["base"], "fp32", loras=loras)
        assert info["lora_changed"] is True and info["reloaded"] is False
        assert info["lora_full_layers"] == 20  # every attention / ffn linear went the whole-layer way
        out = g.forward(x, t, ctx)
        ref = reference(merged_by_hand(files, files["base"], loras, str(d / f"merged_adapter_{i}.safetensors")),
                        x, t, ctx)
        diff = (out - ref).abs().max().item()
        moved = (ref - base_out).abs().max().item()
        print(f"{name}: tp=2 vs merged by hand {diff:.2e} (moves the output by {moved:.3f})")
        worst = max(worst, diff)
        assert diff <= TOL and moved > 100 * TOL
    print(f"worst LoHa / LoKr / DoRA tp=2 difference: {worst:.2e}")
    # a LoHa that ComfyUI cannot apply to these layers: an error naming the file; the base weights stay
    with pytest.raises(WorkerGroupError, match=r"adapter_loha_wide\.safetensors.*LoHa.*could not be applied"):
        g.load(files["base"], "fp32", loras=[(files["loha_wide"], 1.0)])
    g.load(files["base"], "fp32", loras=[])
    assert g.load_count == loads and torch.equal(g.forward(x, t, ctx), base_out)
    # fp8 scaled weights: DoRA normalises the dequantized base layer and the result is rounded back to fp8, as
    # ComfyUI's ModelPatcher does
    plain = g.load(files["fp8"], "fp32", loras=[])
    assert plain["fp8_layers"] == 26
    fp8_out = g.forward(x, t, ctx)
    loras = [(files["dora_fp8"], 0.9)]
    g.load(files["fp8"], "fp32", loras=loras)
    ref = native_with_loras(files["fp8"], loras, x, t, ctx)
    diff = (g.forward(x, t, ctx) - ref).abs().max().item()
    print(f"DoRA x0.9 on fp8_scaled weights (tp=2) vs ComfyUI's native LoRA-patched fp8 model: {diff:.2e}")
    assert diff <= TOL
    g.load(files["fp8"], "fp32", loras=[])
    assert torch.equal(g.forward(x, t, ctx), fp8_out)  # fp8 shards and scales back from the file
    assert g.pids == pids
