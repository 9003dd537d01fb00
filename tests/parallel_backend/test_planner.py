"""Choices and limits of parallel_backend/planner.py: auto degrees, the weights mode, auto pipeline stages, where the
axes fall across nodes, and whether a plan's weights and a call's activations fit the devices.

Every one is a pure function of numbers (bytes, heads, devices' memory), so each is checked here without starting a
process; a refusal is a ConfigError whose message names the numbers and a plan that would fit.
"""
from __future__ import annotations

import math

import pytest

from parallel_backend.config import AXES, ConfigError, ModelShape, ParallelConfig, validate_config, validate_for_model
from parallel_backend.planner import (
    CPU_RANKS_PER_CORE,
    DEFAULT_TOKENS,
    FIT_RESERVE,
    CallTooLarge,
    FitCosts,
    ModelBytes,
    auto_degrees,
    block_weight_bytes,
    check_call,
    check_fit,
    check_start,
    choose_pipeline,
    choose_weights,
    fold_fits_a_node,
    fold_kind,
    latent_tokens,
    model_bytes,
    placement,
    rank_share,
    weights_per_rank,
)

GB = 2**30
WAN14B = dict(dim=5120, layers=40)
WAN14B_BLOCK_BYTES = 13_600_000_000 * 2  # ~13.6 B block parameters in bf16


def cpu(**kw) -> ParallelConfig:
    return ParallelConfig(**{"device": "cpu", "dtype": "fp32", **kw})


def nodes(**kw) -> ParallelConfig:
    return cpu(**{"world_size": 4, "nodes": 2, "ranks_per_node": 2, "rendezvous": "10.0.0.1:29500",
                  "secret_file": "/etc/pdit.secret", **kw})


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _check_auto(deg, world, heads):
    assert set(deg) == set(AXES)
    assert math.prod(deg.values()) == world
    validate_config(cpu(world_size=world, **deg))
    validate_for_model(cpu(world_size=world, **deg),
                       ModelShape("m", heads, 128, 128 * 8, 1, 16, 16, (1, 2, 2)))


def test_auto_cfg_outermost_then_ulysses():
    deg, why = auto_degrees(8, 4)
    assert deg == dict(pp=1, dp=1, cfg=2, ring=1, ulysses=4, tp=1)
    assert why.index("cfg=2") < why.index("ulysses=4")
    deg, _ = auto_degrees(2, 4)
    assert deg["cfg"] == 2 and deg["ulysses"] == 1  # cfg first: no traffic inside the model
    deg, _ = auto_degrees(4, 4, uses_cfg=False)
    assert deg == dict(pp=1, dp=1, cfg=1, ring=1, ulysses=4, tp=1)


def test_auto_ulysses_while_heads_divide_then_ring():
    deg, why = auto_degrees(8, 2)  # cfg 2, then 4 sequence ranks but only 2 heads
    assert deg == dict(pp=1, dp=1, cfg=2, ring=2, ulysses=2, tp=1)
    assert "ring=2 because 2 heads" in why
    deg, why = auto_degrees(8, 3, uses_cfg=False)  # 3 heads: no ulysses degree divides
    assert deg == dict(pp=1, dp=1, cfg=1, ring=8, ulysses=1, tp=1)
    deg, _ = auto_degrees(8, 40, uses_cfg=False)
    assert deg == dict(pp=1, dp=1, cfg=1, ring=1, ulysses=8, tp=1)


def test_auto_tp_only_when_not_fitting():
    for world in (1, 2, 4, 8):
        assert auto_degrees(world, 4)[0]["tp"] == 1
    deg, why = auto_degrees(8, 4, fits_one_device=False)
    assert deg == dict(pp=1, dp=1, cfg=2, ring=1, ulysses=2, tp=2)
    assert "tp=2 because the model does not fit" in why
    _check_auto(deg, 8, 4)
    deg, _ = auto_degrees(4, 3, fits_one_device=False)  # heads do not split: no tp possible
    assert deg["tp"] == 1


def test_auto_fixed_degrees_respected():
    deg, _ = auto_degrees(8, 4, fixed={"ring": 2})
    assert deg["ring"] == 2 and deg == dict(pp=1, dp=1, cfg=2, ring=2, ulysses=2, tp=1)
    deg, _ = auto_degrees(4, 4, fixed={"cfg": 1})  # 1 is a fixed choice, not "auto"
    assert deg["cfg"] == 1 and deg["ulysses"] == 4
    deg, _ = auto_degrees(4, 4, uses_cfg=False, fixed={"ulysses": 1})
    assert deg == dict(pp=1, dp=1, cfg=1, ring=4, ulysses=1, tp=1)
    deg, _ = auto_degrees(8, 4, fixed={"tp": 2, "cfg": 0})  # 0 = auto
    assert deg["tp"] == 2 and deg["cfg"] == 2 and deg["ulysses"] == 2
    deg, _ = auto_degrees(8, 4, fixed={"cfg": 2, "ring": 2, "ulysses": 1})  # nothing left for ring: dp
    assert deg == dict(pp=1, dp=2, cfg=2, ring=2, ulysses=1, tp=1)
    msg = refused(auto_degrees, 8, 4, fixed={"ring": 3})
    assert "multiply to 3" in msg and "world_size 8" in msg


def test_auto_always_valid():
    for world in range(1, 17):
        for heads in (1, 2, 3, 4, 5, 12, 24, 40):
            for uses_cfg in (True, False):
                for fits in (True, False):
                    deg, why = auto_degrees(world, heads, uses_cfg=uses_cfg, fits_one_device=fits)
                    _check_auto(deg, world, heads)
                    assert why


def test_weights_auto_keeps_replicated_when_the_model_fits():
    costs = FitCosts(WAN14B_BLOCK_BYTES, **WAN14B, tokens=32760)
    assert choose_weights("auto", 4, 40, True, 0, costs) == (False, "")
    assert choose_weights("auto", 4, 40, False, 2, costs) == (False, "")  # tp set by the user: no change
    assert choose_weights("sharded", 4, 40, True, 0, costs)[0] is True  # as set, even when it fits
    assert choose_weights("replicated", 4, 40, False, 0, costs)[0] is False


def test_weights_auto_compares_gathers_with_tp_all_reduces():
    from parallel_backend.parallel.traffic import tensor_parallel_bytes, weight_gather_bytes


    # Wan 14B on 2 ranks at 480p: gathers 13.6 GB per forward vs tp2's 3 x 2 x S x D x 2 x 40 / 2 = 40.3 GB
    shard, why = choose_weights("auto", 2, 40, False, 0, FitCosts(WAN14B_BLOCK_BYTES, **WAN14B, tokens=32760))
    assert shard and "sharded weights" in why and "13.6 GB" in why and "40.3 GB" in why
    assert weight_gather_bytes(WAN14B_BLOCK_BYTES, 2) < tensor_parallel_bytes(32760, 5120, 40, 2)
    # a single 480p image (1 x 30 x 52 tokens): TP's activations are small, the weights are not
    shard, why = choose_weights("auto", 2, 40, False, 0, FitCosts(WAN14B_BLOCK_BYTES, **WAN14B, tokens=1560))
    assert not shard and why.startswith("tp rather than sharded weights")
    # no latent given: sized for a 480p 81-frame video, and the plan says so
    shard, why = choose_weights("auto", 2, 40, False, 0, FitCosts(WAN14B_BLOCK_BYTES, **WAN14B))
    assert shard and f"{DEFAULT_TOKENS} tokens" in why and "none was given" in why
    # heads that no tp degree divides: sharded weights are the only way to fit
    shard, why = choose_weights("auto", 2, 3, False, 0, FitCosts(10**9, 384, 2, tokens=100))
    assert shard and "no tp degree divides" in why
    with pytest.raises(ConfigError, match="weights 'half'"):
        choose_weights("half", 2, 40, False, 0, None)


def _wan14b_bytes(elt=2):
    return ModelBytes(tuple([351_000_000 * elt] * 40), 232_000_000 * 2)


def _gpus(*free_gb):
    return [{"device": f"cuda:{i}", "free": int(f * GB), "total": int(f * GB), "shared": False}
            for i, f in enumerate(free_gb)]


def test_weights_per_rank_follow_the_plan():
    mb = _wan14b_bytes()
    blocks, rest = sum(mb.blocks), mb.rest
    assert weights_per_rank(ParallelConfig(world_size=2, ulysses=2, device="cuda"), mb) == [blocks + rest] * 2
    assert weights_per_rank(ParallelConfig(world_size=2, tp=2, device="cuda"), mb) == [blocks // 2 + rest] * 2
    sharded = weights_per_rank(ParallelConfig(world_size=4, ulysses=4, device="cuda", shard_weights=True), mb)
    assert sharded == [blocks // 4 + 3 * mb.blocks[0] + rest] * 4
    staged = weights_per_rank(ParallelConfig(world_size=2, pp=2, stage_split=(24, 16), device="cuda"), mb)
    assert staged == [24 * mb.blocks[0] + rest, 16 * mb.blocks[0] + rest]


def test_check_fit_names_device_bytes_and_a_plan_that_fits():
    mb = _wan14b_bytes()  # 28.1 GB of bf16 blocks
    check_fit(ParallelConfig(world_size=2, ulysses=2, device="cuda"), mb, _gpus(80, 80))  # fits: no error
    with pytest.raises(ConfigError, match=r"cuda:0 would need 2[89]\.\d GiB .* but has 24\.0 GiB free; .*weights "
                                          r"'sharded' .* would fit"):
        check_fit(ParallelConfig(world_size=2, ulysses=2, device="cuda"), mb, _gpus(24, 24))
    # 24 + 12 GB: neither replicated nor sharded (15.9 GB) fits 12 GB; stages by memory do
    with pytest.raises(ConfigError, match=r"cuda:1 would need .* has 12\.0 GiB free; pp=2 with stage_split 24,12"):
        check_fit(ParallelConfig(world_size=2, ulysses=2, device="cuda"), mb, _gpus(24, 12))
    with pytest.raises(ConfigError, match="no split of these devices fits it: use a smaller file"):
        check_fit(ParallelConfig(world_size=2, ulysses=2, device="cuda"), mb, _gpus(6, 6))
    # CPU ranks share the host's memory: the sum is what must fit
    host = [{"device": "cpu", "free": 40 * GB, "total": 64 * GB, "shared": True}] * 2
    with pytest.raises(ConfigError, match=r"cpu \(all 2 ranks\) would need"):
        check_fit(ParallelConfig(world_size=2, ulysses=2, device="cpu"), mb, host)
    check_fit(ParallelConfig(world_size=2, tp=2, device="cpu"), mb, host)
    # a resident model already on the ranks (A14B's other expert) takes its bytes from the start-time free memory
    check_fit(ParallelConfig(world_size=2, tp=2, device="cuda"), mb, _gpus(24, 24))
    with pytest.raises(ConfigError, match=r"\+ 14\.0 GiB of resident models .* residency 'swap'"):
        check_fit(ParallelConfig(world_size=2, tp=2, device="cuda"), mb, _gpus(24, 24), held=[14 * GB, 14 * GB])


def _host(free_gb, ranks):
    return [{"device": "cpu", "free": int(free_gb * GB), "total": int(64 * GB), "shared": True}] * ranks


def test_check_start_refuses_cpu_ranks_beyond_the_cores_and_the_host_memory_before_any_process():
    """Issue 26: world_size 64 on CPU once started every rank before the fit check, which then measured the memory
    those ranks had taken. The start check runs on the memory free now and names the real need."""
    tiny = ModelBytes((20_000_000, 20_000_000), 3_000_000)  # a 43 MB model
    many = cpu(world_size=64, ulysses=4, ring=16)
    msg = refused(check_start, many, tiny, _host(21.6, 64), cores=16)
    print(msg)
    assert f"starts 64 rank processes on this machine's 16 CPU cores" in msg
    assert f"set world_size to at most {CPU_RANKS_PER_CORE * 16}" in msg
    # enough cores: the memory decides, and the message names weights, activations and the runtime reserve
    msg = refused(check_start, many, tiny, _host(21.6, 64), cores=64)
    print(msg)
    assert "cpu (all 64 ranks) would need 34.6 GiB" in msg and "has 21.6 GiB free" in msg, msg
    assert "weights 41 MiB" in msg and "activations 0 MiB (no latent declared" in msg
    assert "runtime reserve 512 MiB per rank" in msg
    assert "world_size 39 would fit" in msg, msg  # 39 x (41 MiB + 512 MiB) <= 21.6 GiB: a fix that works
    check_start(cpu(world_size=39, ring=39), tiny, _host(21.6, 39), cores=64)
    # a declared latent's activations count per rank
    msg = refused(check_start, cpu(world_size=2, ulysses=2), tiny, _host(4.0, 2), activations=2 * GB, cores=2)
    assert "activations 2.0 GiB" in msg, msg
    assert FIT_RESERVE["cpu"] == 512 << 20
    check_start(ParallelConfig(world_size=2, ulysses=2, device="cuda"), tiny, None)  # a GPU's free: not asked here


def test_rank_share_follows_the_replicas_folds_and_the_sequence_split():
    assert rank_share(cpu(world_size=2, ulysses=2), 2) == 0.5  # both rows, half the tokens
    assert rank_share(cpu(world_size=2, cfg=2), 2) == 0.5  # one row each, all tokens
    assert rank_share(cpu(world_size=2, cfg=2), 1) == 0.5  # one row folded into the sequence split
    assert rank_share(cpu(world_size=4, cfg=2, ulysses=2), 2) == 0.25
    assert rank_share(cpu(world_size=3, dp=3), 2) == pytest.approx(1 / 3)  # 2 rows on 3 replicas: all fold into one
    assert rank_share(cpu(world_size=2, tp=2), 2) == 1.0  # tp splits heads and ffn, not the residual stream


def test_check_call_refuses_what_the_ranks_cannot_hold_with_the_numbers():
    c = cpu(world_size=2, ulysses=2)
    assert check_call(c, 8 * GB, 2, _host(20, 2)) == 4 * GB  # each rank half the tokens: 8 GiB in all fits
    with pytest.raises(CallTooLarge) as info:
        check_call(c, 64 * GB, 2, _host(20, 2), what="2 rows of a 1x1024x1024 latent")
    msg = str(info.value)
    print(msg)
    assert "2 rows of a 1x1024x1024 latent needs about 32.0 GiB of activations on the largest rank" in msg
    assert "the host (2 CPU ranks) needs 64.0 GiB more and has 20.0 GiB" in msg and "about 31% of these tokens" in msg
    assert "more CPU ranks would not help" in msg and "Nothing was sent" in msg
    # what the ranks already held for a call as large is not asked for again
    assert check_call(c, 64 * GB, 2, _host(20, 2), done=31 * GB) == 32 * GB
    gpu = ParallelConfig(world_size=2, ulysses=2, device="cuda")
    with pytest.raises(CallTooLarge, match=r"cuda:1 needs 6\.0 GiB more and has 4\.0 GiB.*add ranks to the sequence"):
        check_call(gpu, 12 * GB, 2, _gpus(40, 4))


def test_auto_pipeline_only_for_unequal_gpus_no_symmetric_plan_fits():
    mb = _wan14b_bytes()
    split, why = choose_pipeline(2, [24 * GB, 12 * GB], mb)
    assert split == (24, 12) and "pp=2 with stage_split 24,12 because the GPUs differ (24, 12 GiB)" in why
    assert choose_pipeline(2, [24 * GB, 24 * GB], mb) == ((), "")  # equal cards: a symmetric split
    assert choose_pipeline(2, [32 * GB, 24 * GB], mb) == ((), "")  # sharded weights fit the smaller one
    assert choose_pipeline(2, [8 * GB, 6 * GB], mb) == ((), "")    # nothing fits: the fit check says so


def test_placement_names_what_crosses_nodes():
    assert placement(nodes(ulysses=2, ring=2)) == ("2 nodes x 2 ranks: inside a node ulysses=2; across nodes ring=2")
    assert placement(nodes(ulysses=2, cfg=2)) == ("2 nodes x 2 ranks: inside a node ulysses=2; across nodes cfg=2")
    big = nodes(world_size=16, ranks_per_node=8, cfg=2, ulysses=8)
    assert placement(big) == "2 nodes x 8 ranks: inside a node ulysses=8; across nodes cfg=2"
    assert placement(cpu(world_size=2, ulysses=2)) == "one node"


def test_auto_degrees_keep_ulysses_and_tp_inside_a_node():
    # 2 nodes x 8 GPUs, Wan 14B (40 heads): cfg across, ulysses 8 inside (40 % 8 == 0)
    deg, why = auto_degrees(16, 40, uses_cfg=True, ranks_per_node=8)
    assert (deg["cfg"], deg["ulysses"], deg["ring"]) == (2, 8, 1), (deg, why)
    # cfg 1.0 (no cfg axis): ulysses inside, ring across
    deg, why = auto_degrees(16, 40, uses_cfg=False, ranks_per_node=8)
    assert (deg["ulysses"], deg["ring"]) == (8, 2) and "ring=2 across nodes" in why, (deg, why)
    # one node: ulysses would take all 16 ranks if the heads divided (here 40 % 16 != 0: 8 and ring 2)
    assert auto_degrees(16, 32, uses_cfg=False)[0]["ulysses"] == 16
    assert auto_degrees(16, 32, uses_cfg=False, ranks_per_node=8)[0]["ulysses"] == 8
    # tp to fit stays inside a node, too
    deg, _ = auto_degrees(4, 40, uses_cfg=False, fits_one_device=False, ranks_per_node=2)
    assert deg["tp"] * deg["ulysses"] == 2 and deg["ring"] == 2, deg
    for world, per in ((4, 2), (8, 4), (16, 8), (12, 4)):
        for heads in (4, 12, 40):
            deg, _ = auto_degrees(world, heads, uses_cfg=True, ranks_per_node=per)
            validate_config(nodes(world_size=world, nodes=world // per, ranks_per_node=per, **deg))


def test_the_cfg_fold_joins_ulysses_only_inside_a_node():
    assert fold_fits_a_node(cpu(world_size=4, cfg=2, ulysses=2), 2)           # one node of 4
    assert not fold_fits_a_node(nodes(cfg=2, ulysses=2), 2)                    # the two replicas are two nodes
    assert fold_fits_a_node(nodes(world_size=8, ranks_per_node=4, dp=2, cfg=2, ulysses=2), 2)  # cfg pairs in a node
    assert not fold_fits_a_node(nodes(world_size=8, ranks_per_node=4, dp=2, cfg=2, ulysses=2), 4)
    # which axis the fold joins: Ulysses while the heads divide and the replicas share a node, else Ring
    assert fold_kind(cpu(world_size=4, cfg=2, ulysses=2), 2, heads=4) == "ulysses"
    assert fold_kind(cpu(world_size=4, cfg=2, ulysses=2), 2, heads=2) == "ring"  # 2 heads over 4 ranks: no
    assert fold_kind(nodes(cfg=2, ulysses=2), 2, heads=4) == "ring"  # the two replicas are two nodes


def test_block_bytes_cover_numbered_and_named_blocks(tmp_path):
    """The fit check and auto mode count each transformer block's bytes: Wan's `blocks.N.` and Cosmos 1's
    `blocks.blockN.` (a ModuleDict), the rest outside."""
    from parallel_backend.models import detect_family
    from parallel_backend.testing.synthetic import write_tiny_cosmos1, write_tiny_wan
    from parallel_backend.weights.reads import read_header

    for write in (write_tiny_wan, write_tiny_cosmos1):
        path = write(str(tmp_path / f"{write.__name__}.safetensors"))
        header = read_header(path)
        family = detect_family(header, path)
        mb = model_bytes(header, family, "fp32")
        total = sum(n * 4 for n in (math.prod(s) for s, _ in header.values()))
        assert len(mb.blocks) == family.model_shape(header).num_layers and mb.rest > 0
        assert sum(mb.blocks) + mb.rest == total
        assert block_weight_bytes(header, family, "fp32") == sum(mb.blocks)


def test_latent_tokens_patch_video_and_image_latents():
    assert latent_tokens((1, 16, 21, 60, 104), (1, 2, 2)) == 21 * 30 * 52 == DEFAULT_TOKENS  # 480p, 81 frames
    assert latent_tokens((1, 16, 60, 104), (1, 2, 2)) == 30 * 52  # an image latent: one frame
    assert latent_tokens((1, 16, 3, 7, 9), (1, 2, 2)) == 3 * 4 * 5  # a partial patch is a token
    assert latent_tokens(None, (1, 2, 2)) is None


# ---- placement from measured links: the cost model and its choices (no process: measurements as numbers) --------

from parallel_backend.parallel.traffic import ulysses_bytes  # noqa: E402
from parallel_backend.planner import (  # noqa: E402
    CallShape,
    Measured,
    Placement,
    check_placement,
    choose_fold,
    choose_placement,
    fold_choices,
    one_rank_seconds,
    predict_call_seconds,
)

GBIT = 1e9 / 8
# Wan 1.3B at 480p 81 frames (dim 1536, 12 heads, 30 blocks, 32760 tokens): a block 40 ms on one GPU, halved by a
# 2-way sequence share
WAN13B = dict(dim=1536, heads=12, layers=30, tokens=32760)


def measured(gbit: float, latency: float = 50e-6, world: int = 8) -> Measured:
    link = {"bandwidth": gbit * GBIT, "latency": latency}
    blocks = {s: (0.03 / s, 0.01 / s) for s in (1, 2, 4, 8) if world % s == 0}
    return Measured({"all_to_all": link, "p2p": link}, blocks, WAN13B["tokens"])


@pytest.mark.engine
def test_predicted_traffic_is_bytes_over_bandwidth_plus_latency_per_message():
    call = CallShape(**WAN13B, rows=1)
    ulysses = Placement({**{a: 1 for a in AXES}, "ulysses": 2})
    slow, fast = (predict_call_seconds(ulysses, call, measured(g, 1e-3)) for g in (10, 20))
    compute = WAN13B["layers"] * 0.04 / 2
    traffic = ulysses_bytes(WAN13B["tokens"], WAN13B["dim"], WAN13B["layers"], 2) / (10 * GBIT)
    # 4 all-to-alls a block, and the output's gather once (out_per_token 0 here: its latency only)
    assert slow == pytest.approx(compute + traffic + 4 * WAN13B["layers"] * 1e-3 + 1e-3)
    assert slow - fast == pytest.approx(traffic / 2)


@pytest.mark.engine
def test_a_call_at_cfg_1_folds_on_a_fast_link_and_runs_on_one_rank_on_a_slow_one():
    """The distill-LoRA case: one row on a cfg=2 mesh folds the idle replica into Ulysses only while the all-to-all
    costs less than the compute it saves."""
    config, call = cpu(world_size=2, cfg=2), CallShape(**WAN13B, rows=1)
    folds = {g: choose_fold(config, call, measured(g)) for g in (400, 100, 25, 10, 1)}
    assert folds[400][0] == folds[100][0] == 2
    # 25 Gbit/s: the all-to-alls move 3 GB per call (1 s), more than the 0.6 s of compute they save: one rank
    # computes the call, the other idles
    assert folds[25][0] == folds[10][0] == folds[1][0] == 1
    for g, (fold, seconds) in folds.items():
        assert seconds <= one_rank_seconds(call, measured(g))
    assert choose_fold(config, call, None) == (2, None)  # nothing measured: fold_for's, as before


@pytest.mark.engine
def test_sharded_weights_never_leave_a_rank_idle():
    config = cpu(world_size=2, cfg=2, shard_weights=True)
    assert [p.fold for p in fold_choices(config, 1, 12)] == [2]
    assert choose_fold(config, CallShape(**WAN13B, rows=1), measured(0.01))[0] == 2


@pytest.mark.engine
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("rows", [1, 2])
def test_auto_placement_is_never_predicted_slower_than_one_rank(world, rows):
    call, picks = CallShape(**WAN13B, rows=rows), {}
    from parallel_backend.planner import best_call
    for gbit in (400, 100, 25, 10, 1, 0.1):
        m = measured(gbit, world=world)
        degrees, why = choose_placement(cpu(world_size=world), call, m, WAN13B["layers"])
        assert math.prod(degrees.values()) == world
        validate_config(cpu(world_size=world, **degrees))
        fold, seconds = choose_fold(cpu(world_size=world, **degrees), call, m)
        assert seconds is None or seconds <= one_rank_seconds(call, m)
        assert "measured all-to-all" in why and "on one rank" in why
        picks[gbit] = best_call(cpu(world_size=world, **degrees), call, m)[0]
    fast, slow = picks[400], picks[0.1]
    assert slow.ranks(rows) == rows  # on a 0.1 Gbit/s link a row's rank computes it alone
    if world > 2 or rows == 1:
        assert fast.ranks(rows) > rows  # a fast link splits the sequence


@pytest.mark.engine
def test_a_user_set_mesh_is_kept_with_a_warning_when_predicted_slower_than_one_rank():
    call = CallShape(**WAN13B, rows=1)
    assert "WARNING" not in check_placement(cpu(world_size=2, ulysses=2), call, measured(100))
    line = check_placement(cpu(world_size=2, ulysses=2), call, measured(0.5))
    assert "ulysses=2 predicted" in line and "WARNING slower than one rank" in line and "0.5 GB/s" not in line


@pytest.mark.engine
def test_only_the_axes_that_span_nodes_are_priced_at_the_link_between_nodes():
    """2 nodes x 2 ranks, a fast link inside a node and a slow one between them: cfg across with Ulysses inside pays
    the fast link (as on one node); Ulysses over all 4 ranks crosses and pays the slow one; a user mesh so placed is
    warned about, one that keeps its all-to-alls inside a node is not."""
    from parallel_backend.planner import crossing_axes
    m = measured(100, world=4)
    m.links["p2p_across"] = {"bandwidth": 0.5 * GBIT, "latency": 1e-3}
    call = CallShape(**WAN13B, rows=2)
    inside = Placement({**{a: 1 for a in AXES}, "cfg": 2, "ulysses": 2})
    spanning = Placement({**{a: 1 for a in AXES}, "ulysses": 4})
    assert crossing_axes(inside, 2) == {"cfg"} and crossing_axes(spanning, 2) == {"ulysses"}
    assert crossing_axes(inside, None) == set()
    assert predict_call_seconds(inside, call, m, 2) == pytest.approx(predict_call_seconds(inside, call, m))
    assert predict_call_seconds(spanning, call, m, 2) > 10 * predict_call_seconds(spanning, call, m)
    assert "WARNING" not in check_placement(nodes(cfg=2, ulysses=2), call, m)
    assert "WARNING slower than one rank" in check_placement(nodes(ulysses=4), call, m)


@pytest.mark.engine
@pytest.mark.parametrize("rows", [1, 2])
def test_auto_placement_on_two_nodes_keeps_ulysses_inside_a_node(rows):
    """On 2 nodes x 2 ranks a fast inside link and a fast across one make Ulysses 4 the cheapest split, which would span
    the nodes: never picked (config.validate_nodes refuses it); every pick validates as a multi-node config."""
    call = CallShape(**WAN13B, rows=rows)
    for gbit in (400, 25, 1):
        link = {"bandwidth": gbit * GBIT, "latency": 50e-6}
        m = Measured({"all_to_all": link, "p2p": link, "p2p_across": link}, measured(gbit, world=4).blocks,
                     WAN13B["tokens"])
        degrees, _ = choose_placement(nodes(), call, m, WAN13B["layers"])
        assert degrees["ulysses"] * degrees["tp"] <= 2, (gbit, degrees)
        validate_config(nodes(**degrees))
