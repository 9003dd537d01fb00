"""nodes/placement.py through the loader: parallel_plan says what the group measured of its links and what it
predicts; auto mode moves to the placement predicted fastest (never slower than one rank), a user-set mesh is kept
with a warning when predicted slower than one rank. Links are slowed on purpose with PDIT_EMULATE_LINK, which the
ranks inherit as they start."""
import os

import pytest
import torch

from parallel_backend.runtime import group as group_mod

pytestmark = pytest.mark.multirank  # every test starts a group

SLOW_LINK = "gbit=0.2,delay_ms=20"
LATENT = {"samples": torch.zeros(1, 16, 2, 16, 16)}  # 128 tokens of the tiny Wan


def _load(pack, emulate: str, world_size: int = 2, **degrees):
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(
        world_size, degrees.get("cfg", 0), degrees.get("ulysses", 0), degrees.get("ring", 0), degrees.get("tp", 0),
        degrees.get("dp", 0), "fp32", "cpu", "sdpa", latent=LATENT)[0]
    group_mod.stop_all()
    os.environ["PDIT_EMULATE_LINK"] = emulate
    try:
        _, plan = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load("tiny_wan.safetensors", "fp32", spec)
    finally:
        os.environ.pop("PDIT_EMULATE_LINK")
    return plan, group_mod.active_groups()[0].config


@pytest.fixture(scope="module", autouse=True)
def _stop_groups():
    yield
    group_mod.stop_all()


def test_auto_mode_says_what_it_measured_and_why_it_chose(comfy, pack):
    plan, config = _load(pack, "")
    assert config.cfg == 2  # cond and uncond on their own ranks: no traffic, half the rows each
    assert "measured all-to-all" in plan and "at 128 tokens" in plan and "on one rank" in plan, plan
    assert "WARNING" not in plan


def test_a_user_set_mesh_is_kept_and_warned_about_on_a_slow_link(comfy, pack):
    plan, config = _load(pack, SLOW_LINK, ulysses=2, cfg=1, ring=1, tp=1, dp=1)
    assert config.ulysses == 2  # kept
    assert "ulysses=2 predicted" in plan and "WARNING slower than one rank" in plan, plan


def test_auto_mode_leaves_the_sequence_split_on_a_slow_link(comfy, pack):
    """4 ranks: the analytic pick is cfg=2 x ulysses=2; over a slow link auto mode moves to replicas only (each row
    on one rank, the other replica idle), predicted no slower than one rank."""
    plan, config = _load(pack, SLOW_LINK, world_size=4)
    assert config.cfg * config.dp == 4 and config.sequence_degree == 1, plan
    assert "predicted" in plan and "WARNING" not in plan
