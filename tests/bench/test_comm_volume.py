"""bench/comm_volume.py: the communication formula against bytes counted on real ranks.

The formula (per rank, per forward) is what the README / design.md table is built on; these tests
hold it to parallel_backend.parallel.collectives.count_bytes() on a real ShardedModel forward.
"""
import math

import pytest

from bench import comm_volume as cv
from parallel_backend.testing.synthetic import write_tiny_wan

GRIDS = [(2, 4, 4), (4, 4, 4)]  # 8 and 16 tokens after 1x2x2 patches
CONTEXTS = [8, 16]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One 2-rank spawn: tiny Wan (4 heads of 128, 2 blocks) under ulysses2, tp2, ring2 and cfg2, bf16."""
    path = write_tiny_wan(str(tmp_path_factory.mktemp("comm") / "tiny_wan.safetensors"))
    jobs = [cv.job(f"tiny/{axis}2", path, axis, 2, "cpu", "bf16") for axis in ("ulysses", "tp", "ring", "cfg")]
    return cv.measure(jobs, 2, cv.measure_points(GRIDS, CONTEXTS), "bf16", "cpu")


def _analytic_for(name, grid, ctx, layers=2):
    preset, axis, n = cv.split_name(name)
    s = cv.model_shape(preset, cv.grid_tokens(grid), layers, elt=2, ctx_len=ctx, batch=2 if axis == "cfg" else 1)
    return axis, cv.analytic(axis, n, s), s


@pytest.mark.multirank
def test_measured_bytes_equal_formula_at_run_shape(measured):
    assert len(measured) == 4 * 3  # 4 axis configs x 3 (tokens, context) points
    for (name, grid, ctx), rec in measured.items():
        axis, an, s = _analytic_for(name, grid, ctx)
        a_total, m_total = cv.total(an, s.layers), sum(rec["total"].values())
        a_blocks, m_blocks = s.layers * sum(an["per_block"].values()), sum(rec["blocks"].values())
        assert rec["finite"] is not False, f"{name}: non-finite output"
        if axis == "cfg":
            assert m_total == a_total == 0, f"{name}: cfg must not communicate inside the model, sent {rec['total']}"
            continue
        assert a_total > 0 and m_total > 0
        assert abs(m_total - a_total) <= 0.05 * a_total, f"{name} {grid} ctx {ctx}: measured {m_total} analytic {a_total}"
        assert abs(m_blocks - a_blocks) <= 0.05 * a_blocks, f"{name} {grid} ctx {ctx}: in-block {m_blocks} vs {a_blocks}"
        # the collective kinds are the ones the formula names
        assert {k for k, v in rec["total"].items() if v} == set(an["per_block"]) | set(an["outside"]), name


@pytest.mark.multirank
def test_scaled_measurement_equals_formula_at_full_size(measured):
    """The fitted per-block bytes, scaled to 720p's 75600 tokens, 40 blocks and a 512-token context,
    agree with the formula evaluated there."""
    for name in ("tiny/ulysses2", "tiny/tp2", "tiny/ring2"):
        recs = [(cv.grid_tokens(g), c, measured[(name, g, c)]) for g, c in cv.measure_points(GRIDS, CONTEXTS)]
        scaled = cv.fit_and_scale(recs, 2, 75600, 40, ctx_real=512)["total"]
        axis, an, s = _analytic_for(name, (21, 90, 160), 512, layers=40)  # 720p latent: 21 x 45 x 80 patches
        assert s.tokens == 75600
        analytic = cv.total(an, 40)
        assert abs(scaled - analytic) <= 0.05 * analytic, f"{name}: scaled {scaled:.4g} vs analytic {analytic:.4g}"


def test_formula_reproduces_design_anchors():
    """design.md's Wan 14B 720p table is the per-rank, batch-1, bf16 count of the big collectives."""
    s = cv.model_shape("wan2.1-14b", cv.grid_tokens(cv.latent_grid(*cv.RESOLUTIONS["720p"])), elt=2)
    assert s.tokens == 75600 and s.layers == 40 and s.dim == 5120
    for axis, anchors in cv.DESIGN_ANCHORS.items():
        for n, ref_gb in anchors.items():
            got = cv.total(cv.analytic(axis, n, s), s.layers) / 1e9
            assert abs(got - ref_gb) <= 0.01 * ref_gb, f"{axis}{n}: {got:.2f} GB vs design {ref_gb} GB"


def test_resolution_token_counts():
    assert cv.latent_grid(*cv.RESOLUTIONS["480p"]) == (21, 60, 104)
    assert cv.grid_tokens((21, 60, 104)) == 32760
    assert cv.latent_grid(*cv.RESOLUTIONS["720p"]) == (21, 90, 160)
    assert cv.grid_tokens((21, 90, 160)) == 75600


# ---- sharded weights ------------------------------------------------------------------------------------------------
def _block_numel(preset: str) -> int:
    from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes

    return sum(math.prod(s) for k, s in wan_shapes(**WAN_PRESETS[preset]).items() if k.startswith("blocks."))


def test_sharded_weights_formula_rows():
    """Wan 14B bf16: the gathers move the blocks' bytes x (n-1)/n per forward (14 GB at n = 2), whatever the latent,
    fewer than tp=n's all-reduces at 480p and 720p: auto mode picks sharded weights there."""
    blocks = 2 * _block_numel("wan2.1-14b")
    assert abs(blocks / 1e9 - 28.1) < 0.05
    for res, tokens in (("480p", 32760), ("720p", 75600)):
        for n in (2, 4, 8):
            c = cv.sharded_vs_tp("wan2.1-14b", "bf16", n, tokens)
            assert c["blocks"] == blocks and c["gather"] == blocks * (n - 1) / n, (res, n)
            assert c["tp"] == 3 * 2 * tokens * 5120 * 2 * 40 * (n - 1) / n
            assert c["gather"] < c["tp"] and c["auto_shard"], (res, n)
    c2 = cv.sharded_vs_tp("wan2.1-14b", "bf16", 2, 32760)
    assert abs(c2["gather"] / 1e9 - 14.06) < 0.01 and abs(c2["tp"] / 1e9 - 40.26) < 0.01
    # the formats: fp8 half of bf16, GGUF its quantized bytes; the same order in the gathers
    g = {f: cv.sharded_vs_tp("wan2.1-14b", f, 2, 32760)["gather"] for f in ("bf16", "fp8", "Q8_0", "Q4_K")}
    assert g["bf16"] > g["Q8_0"] > g["fp8"] > g["Q4_K"]
    assert abs(g["fp8"] / g["bf16"] - 0.5) < 0.001
    # 1.3B at n = 8: no tp (12 heads), sharded weights still apply
    c = cv.sharded_vs_tp("wan2.1-1.3b", "bf16", 8, 32760)
    assert c["tp"] is None and c["gather"] == 2 * _block_numel("wan2.1-1.3b") * 7 / 8 and c["auto_shard"]


def test_break_even_is_where_auto_mode_switches():
    """Below the break-even token count tp moves fewer bytes and auto mode keeps tp (n = 2: it weighs tp=2)."""
    even = cv.sharded_vs_tp("wan2.1-14b", "bf16", 2, 32760)["break_even"]
    assert 11000 < even < 12000
    below, at = cv.sharded_vs_tp("wan2.1-14b", "bf16", 2, even - 1), cv.sharded_vs_tp("wan2.1-14b", "bf16", 2, even)
    assert below["tp"] < below["gather"] and not below["auto_shard"] and below["auto_tp"] == 2
    assert at["gather"] <= at["tp"] and at["auto_shard"]


@pytest.fixture(scope="module")
def measured_shard(tmp_path_factory):
    """One 2-rank spawn: sharded weights x ulysses2 on the tiny Wan (2 blocks) in bf16 compute, from its fp32 file
    and from a Q8_0 GGUF of it, at the three (tokens, context) points."""
    from parallel_backend.testing.gguf_files import write_gguf_dit

    d = tmp_path_factory.mktemp("comm_shard")
    path = write_tiny_wan(str(d / "tiny_wan.safetensors"))
    gguf = str(d / "tiny_wan_Q8_0.gguf")
    write_gguf_dit(path, gguf, "Q8_0")
    jobs = [cv.shard_job("tiny", "bf16", path, 2, "cpu", "bf16"), cv.shard_job("tiny", "Q8_0", gguf, 2, "cpu", "bf16")]
    return {"paths": {"bf16": path, "Q8_0": gguf},
            "records": cv.measure(jobs, 2, cv.measure_points(GRIDS, CONTEXTS), "bf16", "cpu")}


@pytest.mark.multirank
def test_measured_weight_gather_equals_formula(measured_shard):
    from parallel_backend.models import wan
    from parallel_backend.planner import block_weight_bytes
    from parallel_backend.parallel.traffic import weight_gather_bytes
    from parallel_backend.weights.reads import read_header

    records = measured_shard["records"]
    assert len(records) == 2 * 3
    by_fmt = {}
    for (name, grid, ctx), rec in records.items():
        preset, n, fmt = cv.split_shard_name(name)
        got = rec["total"]["weight_gather"]
        assert got > 0 and got == rec["gathered_formula"], (name, grid, ctx, got, rec["gathered_formula"])
        # the blocks' bytes as the ranks hold them = the pack's rule (what auto mode computes from the header)
        assert rec["unit_bytes"] == block_weight_bytes(read_header(measured_shard["paths"][fmt]), wan, "bf16")
        ideal = weight_gather_bytes(rec["unit_bytes"], n)
        assert abs(got - ideal) <= 0.01 * ideal, (name, got, ideal)  # padded shards only
        # the ulysses axis over the same ranks sends what it sends without sharded weights
        s = cv.model_shape(preset, cv.grid_tokens(grid), 2, elt=2, ctx_len=ctx)
        ulysses = cv.total(cv.analytic("ulysses", 2, s), 2)
        assert sum(v for k, v in rec["total"].items() if k != "weight_gather") == ulysses
        assert rec["finite"] is not False
        by_fmt.setdefault(fmt, set()).add(got)
        # scaled as [4] scales it: per block x 40 blocks = the formula on 40 such blocks
        scaled = got / rec["layers"] * 40
        assert abs(scaled - weight_gather_bytes(rec["unit_bytes"] / rec["layers"] * 40, n)) <= 0.01 * scaled
    assert all(len(v) == 1 for v in by_fmt.values()), by_fmt  # the same at every latent / context
    assert min(by_fmt["Q8_0"]) < 0.6 * min(by_fmt["bf16"])  # Q8_0: ~1.06 B per weight against bf16's 2


def test_cross_node_bytes_per_placement():
    """[5]: Wan 14B 720p on 2 nodes x 8 GPUs - Ring across moves every block's K / V chunk of each rank once over the
    link (= L x S x D x 2 bytes for 2 nodes), CFG across only the latent, pp across one activation."""
    from bench.comm_volume import cross_node_bytes, grid_tokens, latent_grid

    S = grid_tokens(latent_grid(1280, 720, 81))
    rows = cross_node_bytes("wan2.1-14b", S, nodes=2, per_node=8)
    ring = rows["ulysses8 inside x ring2 across"]
    assert ring == 8 * 40 * 1 * 2 * (S // 16) * 5120 * 2
    assert abs(ring - 40 * S * 5120 * 2) / ring < 1e-3  # 31.0 GB, the design anchor of ring2
    assert rows["cfg2 across x ulysses8 inside"] < 1e-3 * ring
    assert rows["pp2 across x ulysses8 inside"] == S * 5120 * 2
    four = cross_node_bytes("wan2.1-14b", S, nodes=4, per_node=8)
    assert four["ulysses32 across (no overlap)"] < four["ulysses8 inside x ring4 across"]  # bytes alone do not decide
