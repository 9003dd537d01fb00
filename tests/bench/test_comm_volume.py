"""bench/comm_volume.py: the communication formula against bytes counted on real ranks.

The formula (per rank, per forward) is what the README / design.md table is built on; these tests
hold it to parallel_backend.parallel.collectives.count_bytes() on a real ShardedModel forward.
"""
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
