"""GGUF DiT files on the ranks (weights/gguf_linear.py + the GGUF path of weights/reads.py), fp32 compute.

Tiny Wan files (dim 768 = 6 heads: a tp2 row-parallel split of the 768-wide attention outputs is 384 columns, not
whole 256-element K-quant blocks, so those layers must be dequantized at load and reported; the FFN's 1536-wide
down projection splits on a block boundary and stays quantized) converted to city96's layout per quant type:
  - a kept-quantized layer's dequantized weight equals gguf's own dequantize exactly;
  - one rank on the GGUF = one rank on its dequantized safetensors within 1e-6 (the same weights);
  - tp2, sharded weights x ulysses2 and ulysses2 = one rank on the same GGUF within 1e-5, ranks hold the
    quantized bytes (tp2: half the quantized layers' bytes; sharded: half of every block);
  - output vs the original fp32 weights within a per-type relative RMS (measured, bound ~1.5x);
  - a plain LoRA on GGUF layers (factors at compute) = the LoRA merged into the dequantized weights within 1e-4,
    on one rank and tp2; an adapter (LoHa) on a GGUF layer is refused by name.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from parallel_backend.config import ParallelConfig

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "F16", "BF16")
# relative RMS of the output vs the fp32 original (measured: see the printout), bounded ~1.5x
REL_RMS_BOUND = {"Q8_0": 0.02, "Q6_K": 0.03, "Q5_K": 0.06, "Q4_K": 0.12, "F16": 0.002, "BF16": 0.01}
TOL = 1e-5
LORA_TOL = 1e-4
MESHES = {"tp2": dict(tp=2), "sharded_ulysses2": dict(ulysses=2, shard_weights=True), "ulysses2": dict(ulysses=2)}
WAN = dict(dim=768, ffn_dim=1536)


def _case():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 16, 3, 6, 10, generator=g), torch.tensor([500.0, 320.0]),
            torch.randn(2, 12, 4096, generator=g))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit
    from parallel_backend.testing.synthetic import write_tiny_wan, write_wan_lora

    d = tmp_path_factory.mktemp("gguf_model")
    src = write_tiny_wan(str(d / "wan.safetensors"), **WAN)
    out = {"src": src, "gguf": {}, "deq": {}}
    for q in TYPES:
        out["gguf"][q] = str(d / f"wan_{q}.gguf")
        write_gguf_dit(src, out["gguf"][q], q)
        out["deq"][q] = write_dequantized_safetensors(out["gguf"][q], str(d / f"wan_{q}_deq.safetensors"))
    out["lora"] = str(d / "lora.safetensors")
    write_wan_lora(out["lora"], src, fmt="comfy")
    out["loha"] = str(d / "loha.safetensors")
    from parallel_backend.testing.synthetic import write_wan_adapter
    write_wan_adapter(out["loha"], src, "loha")
    return out


def _one(path, lora=None):
    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    mesh = single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"), torch.device("cpu"))
    m = ShardedModel(mesh, path, "fp32")
    if lora:
        m.set_loras([(lora, 0.8)])
    x, t, ctx = _case()
    return m, m.forward_rows(x, t, ctx)


@pytest.fixture(scope="module")
def one_rank(files):
    out = {}
    for q in TYPES:
        m, y = _one(files["gguf"][q])
        out[q] = {"y": y, "info": m.info()}
        del m
    out["fp32"] = _one(files["src"])[1]
    out["lora_gguf"] = _one(files["gguf"]["Q4_K"], files["lora"])[1]
    out["lora_deq"] = _one(files["deq"]["Q4_K"], files["lora"])[1]
    gc.collect()
    return out


def _rank_fn(mesh0, files):
    from parallel_backend.runtime.mesh import build_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    x, t, ctx = _case()
    report = {}
    for name, spec in MESHES.items():
        mesh = build_mesh(ParallelConfig(world_size=2, device="cpu", dtype="fp32", **spec), mesh0.rank, mesh0.device)
        for q in TYPES:
            m = ShardedModel(mesh, files["gguf"][q], "fp32")
            r = m.rows(2)
            report[name, q] = ((r.start, r.stop), m.forward_rows(x, t, ctx), m.is_leader(2), m.info())
            del m
        if name == "tp2":
            m = ShardedModel(mesh, files["gguf"]["Q4_K"], "fp32")
            m.set_loras([(files["lora"], 0.8)])
            r = m.rows(2)
            report[name, "lora"] = ((r.start, r.stop), m.forward_rows(x, t, ctx), m.is_leader(2), m.info())
            del m
        gc.collect()
    return report


@pytest.fixture(scope="module")
def world2(files):
    from parallel_backend.testing.spmd import run_on_ranks

    return run_on_ranks(_rank_fn, ParallelConfig(world_size=2, device="cpu", dtype="fp32", tp=2), files, timeout=600)


def _assembled(per_rank, key):
    got = torch.full((2, 16, 3, 6, 10), float("nan"))
    for rep in per_rank:
        (start, stop), y, leader, _ = rep[key]
        if leader:
            got[start:stop] = y
    return got


def _rel_rms(a, b):
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def test_kept_layers_dequantize_exactly_as_gguf(files):
    from parallel_backend.weights.gguf import dequantize, read_rows
    from parallel_backend.weights.gguf_linear import GGUFLinear

    for q in ("Q8_0", "Q6_K", "Q5_K", "Q4_K"):
        m, _ = _one(files["gguf"][q])
        layers = {n: mod for n, mod in m.model.named_modules() if isinstance(mod, GGUFLinear)}
        assert layers, q
        for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.1.cross_attn.k"):
            raw, qtype, shape = read_rows(files["gguf"][q], name + ".weight")
            assert qtype == q and layers[name].weight.dtype == torch.uint8
            assert torch.equal(layers[name].dense_weight(torch.float32), dequantize(raw, qtype, shape)), (q, name)


def test_one_rank_gguf_equals_its_dequantized_weights_and_approximates_the_original(files, one_rank):
    rms = {}
    for q in TYPES:
        deq = _one(files["deq"][q])[1]
        diff = (one_rank[q]["y"] - deq).abs().max().item()
        assert diff <= 1e-6, (q, diff)
        rms[q] = _rel_rms(one_rank[q]["y"], one_rank["fp32"])
        assert rms[q] <= REL_RMS_BOUND[q], (q, rms[q])
    print("\nrelative RMS of the output vs the fp32 weights: " + ", ".join(f"{q} {v:.4f}" for q, v in rms.items()))
    print("parameter bytes on one rank: " + ", ".join(f"{q} {one_rank[q]['info']['param_bytes']}" for q in TYPES))
    assert one_rank["Q4_K"]["info"]["param_bytes"] < one_rank["Q8_0"]["info"]["param_bytes"] \
        < one_rank["F16"]["info"]["param_bytes"]


@pytest.mark.multirank
def test_meshes_match_one_rank_on_the_same_file(world2, one_rank):
    worst = {}
    for name in MESHES:
        for q in TYPES:
            diff = (_assembled(world2, (name, q)) - one_rank[q]["y"]).abs().max().item()
            worst[name, q] = diff
            assert diff <= TOL, (name, q, diff)
    print("\nmax abs diff vs one rank: " + ", ".join(f"{n}/{q} {d:.1e}" for (n, q), d in worst.items()))


@pytest.mark.multirank
def test_ranks_hold_quantized_bytes_and_report_dequantized_layers(world2, one_rank):
    for q in ("Q8_0", "Q4_K"):
        full = one_rank[q]["info"]["gguf_weight_bytes"]  # every kept-quantized layer lies in the blocks
        for name in MESHES:
            held = [rep[name, q][3]["gguf_weight_bytes"] for rep in world2]
            if name == "ulysses2":
                assert held == [full, full]
            elif name == "tp2" and q == "Q4_K":  # the attention outputs were dequantized: less than half stays
                assert all(h < 0.5 * full for h in held), held
            else:  # tp2 splits every quantized layer, sharded weights every block: half each
                assert all(abs(h - full / 2) <= 0.05 * full / 2 for h in held), (name, q, held, full)
            assert all(rep[name, q][3]["gguf_quantized_layers"] > 0 for rep in world2)
        tp_info = world2[0]["tp2", q][3]
        dense = tp_info["gguf_dequantized_at_load"]
        if q == "Q4_K":  # 768 inputs / 2 = 384: not whole 256-blocks
            assert dense and all("self_attn.o" in d or "cross_attn.o" in d for d in dense), dense
            assert all("384" not in d or "256-blocks" in d for d in dense)
        else:  # 384 = 12 Q8_0 blocks of 32
            assert dense == []
    print(f"\nQ4_K tp2: dequantized at load {world2[0]['tp2', 'Q4_K'][3]['gguf_dequantized_at_load']}")
    print("quantized bytes per rank (Q8_0): one rank " + str(one_rank["Q8_0"]["info"]["gguf_weight_bytes"]) + ", "
          + ", ".join(f"{n} {world2[0][n, 'Q8_0'][3]['gguf_weight_bytes']}" for n in MESHES))


@pytest.mark.multirank
def test_lora_on_gguf_equals_lora_on_the_dequantized_weights(world2, one_rank):
    one = (one_rank["lora_gguf"] - one_rank["lora_deq"]).abs().max().item()
    tp2 = (_assembled(world2, ("tp2", "lora")) - one_rank["lora_deq"]).abs().max().item()
    moved = (one_rank["lora_gguf"] - one_rank["Q4_K"]["y"]).abs().max().item()
    print(f"\nLoRA on Q4_K layers vs merged into the dequantized weights: 1 rank {one:.1e}, tp2 {tp2:.1e} "
          f"(the LoRA moves the output by {moved:.2e})")
    assert moved > 100 * LORA_TOL  # the LoRA did something
    assert one <= LORA_TOL and tp2 <= LORA_TOL


def test_adapter_on_a_gguf_layer_is_refused_by_name(files):
    from parallel_backend.weights.lora import LoraError

    with pytest.raises(LoraError, match=r"loha\.safetensors.*GGUF layer kept quantized.*plain LoRA"):
        _one(files["gguf"]["Q8_0"], files["loha"])
    assert os.path.exists(files["loha"])


# ---------------------------------------------------------------- load memory
RSS_SLACK = 0.10
# one tensor's read / dequantize / cast temporaries and the allocator's slack (the reader drops each tensor's file
# pages as soon as they are copied out; measured: +184 MiB (tp2) / +195 MiB (sharded) for a 175 MiB shard)
RSS_FIXED = 32 << 20


def _load_rss(mesh, path):
    from parallel_backend.runtime.sharded_model import ShardedModel
    from parallel_backend.runtime.rank import _peak_rss_bytes, _reset_peak_rss, _rss_bytes

    import_ok = ShardedModel  # ComfyUI and the model code are imported before the measurement
    from parallel_backend.models.host import import_host
    import_host("cpu")
    gc.collect()
    _reset_peak_rss()
    base = _rss_bytes()
    m = import_ok(mesh, path, "fp32")
    peak = _peak_rss_bytes()
    info = m.info()
    return {"base": base, "peak": peak, "param_bytes": info["param_bytes"], "gguf": info["gguf_weight_bytes"]}


@pytest.mark.parametrize("shard", [False, True], ids=["tp2", "sharded_weights"])
@pytest.mark.multirank
def test_peak_rss_per_rank_during_load_is_its_quantized_shard(tmp_path_factory, shard):
    """A medium Q8_0 file (160 MB of quantized blocks): a rank's peak RSS during load stays within its shard
    (+10%) plus a fixed allowance; the ComfyUI-side and other ranks' bytes never enter it."""
    from parallel_backend.testing.gguf_files import write_gguf_dit
    from parallel_backend.testing.spmd import run_on_ranks
    from parallel_backend.testing.synthetic import write_tiny_wan

    d = tmp_path_factory.getbasetemp() / "gguf_rss"
    path = str(d / "medium_Q8_0.gguf")
    if not os.path.exists(path):
        d.mkdir(exist_ok=True)
        src = write_tiny_wan(str(d / "medium.safetensors"), dtype=torch.bfloat16, dim=1536, ffn_dim=6144,
                             num_layers=4)
        write_gguf_dit(src, path, "Q8_0")
        os.remove(src)
    spec = dict(ulysses=2, shard_weights=True) if shard else dict(tp=2)
    per_rank = run_on_ranks(_load_rss, ParallelConfig(world_size=2, device="cpu", dtype="fp32", **spec), path)
    for r in per_rank:
        grew = r["peak"] - r["base"]
        bound = (1 + RSS_SLACK) * r["param_bytes"] + RSS_FIXED
        print(f"\n{'sharded weights' if shard else 'tp2'}: peak RSS during load +{grew / 2**20:.0f} MiB for a shard of "
              f"{r['param_bytes'] / 2**20:.0f} MiB ({r['gguf'] / 2**20:.0f} MiB of it quantized); bound "
              f"{bound / 2**20:.0f} MiB; file {os.path.getsize(path) / 2**20:.0f} MiB")
        assert grew <= bound, (grew, bound)
        assert r["param_bytes"] < 0.75 * os.path.getsize(path) * 4  # not the whole model dequantized


def test_cosmos_gguf_equals_its_dequantized_weights(tmp_path):
    """A Cosmos Predict2 GGUF (city96 layout: `net.` stripped, architecture "cosmos") on ComfyUI's MiniTrainDIT:
    its quantized linears kept quantized, one rank = the dequantized safetensors."""
    from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit
    from parallel_backend.testing.synthetic import write_tiny_cosmos

    src = write_tiny_cosmos(str(tmp_path / "cosmos.safetensors"))
    path = str(tmp_path / "cosmos_Q8_0.gguf")
    write_gguf_dit(src, path, "Q8_0", architecture="cosmos")
    deq = write_dequantized_safetensors(path, str(tmp_path / "cosmos_deq.safetensors"))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([0.8, 0.3]), torch.randn(2, 12, 1024, generator=g)
    outs = {}
    for name, p in (("gguf", path), ("deq", deq)):
        from parallel_backend.runtime.mesh import single_rank_mesh
        from parallel_backend.runtime.sharded_model import ShardedModel
        m = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"),
                                          torch.device("cpu")), p, "fp32")
        outs[name] = (m.forward_rows(x, t, ctx), m.info())
    assert outs["gguf"][1]["gguf_quantized_layers"] > 0 and outs["gguf"][1]["family"] == "cosmos_predict2"
    diff = (outs["gguf"][0] - outs["deq"][0]).abs().max().item()
    print(f"\nCosmos Predict2 Q8_0 GGUF vs its dequantized weights, one rank: {diff:.1e}")
    assert diff <= 1e-6
