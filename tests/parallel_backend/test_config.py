"""Validation rules of parallel_backend/config.py (what the pack chooses for the user: test_planner.py).

Every rule is a pure function, so each one is checked here without starting a process: the
config is refused with a ConfigError whose message names the value the user should change.
"""
from __future__ import annotations

import math
import random

import pytest

from parallel_backend.config import (
    ATTENTION_BACKENDS,
    AXES,
    DTYPES,
    ConfigError,
    ModelShape,
    ParallelConfig,
    validate_config,
    validate_for_model,
    validate_latent,
)
from parallel_backend.planner import auto_degrees  # the fuzz draws auto degrees in the same stream

# The tiny Wan of parallel_backend/testing/synthetic.py: 4 heads of 128, ffn 1024.
WAN_TINY = ModelShape("wan", num_heads=4, head_dim=128, ffn_dim=1024, num_layers=2, in_channels=16,
                      out_channels=16, patch_size=(1, 2, 2))
WAN_14B = ModelShape("wan", num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40, in_channels=16,
                     out_channels=16, patch_size=(1, 2, 2))


def cpu(**kw) -> ParallelConfig:
    return ParallelConfig(**{"device": "cpu", "dtype": "fp32", **kw})


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- validate_config


def test_valid_configs_pass():
    validate_config(ParallelConfig(world_size=1), available_devices=1)
    validate_config(ParallelConfig(world_size=8, cfg=2, ulysses=2, ring=2), available_devices=8)
    validate_config(ParallelConfig(world_size=4, cfg=2, tp=2, dtype="fp16", attention="math"), available_devices=4)
    validate_config(cpu(world_size=4, dp=2, ulysses=2, attention="math"))
    validate_config(cpu(world_size=2, ring=2, dtype="bf16"), available_devices=0)  # GPU count is irrelevant on cpu


def test_degrees_not_multiplying_to_world_size():
    msg = refused(validate_config, ParallelConfig(world_size=4, ulysses=2))
    # names both numbers and the fix
    assert "multiply to 2" in msg and "world_size is 4" in msg
    assert "set world_size to 2" in msg
    msg = refused(validate_config, ParallelConfig(world_size=2, cfg=2, ulysses=2))
    assert "cfg2" in msg and "ulysses2" in msg and "set world_size to 4" in msg


@pytest.mark.parametrize("axis", AXES)
def test_degree_below_one(axis):
    msg = refused(validate_config, ParallelConfig(world_size=1, **{axis: 0}))
    assert f"{axis} degree 0" in msg


def test_world_size_below_one():
    assert "world_size 0" in refused(validate_config, ParallelConfig(world_size=0))


def test_more_gpus_than_visible():
    msg = refused(validate_config, ParallelConfig(world_size=4, ulysses=4), available_devices=2)
    assert "needs 4 GPUs" in msg and "only 2 are visible" in msg
    assert "set world_size to at most 2" in msg
    # the ranks start at first_device: devices below it do not count
    msg = refused(validate_config, ParallelConfig(world_size=2, ulysses=2, first_device=3), available_devices=4)
    assert "needs 5 GPUs" in msg and "set world_size to at most 1" in msg
    validate_config(ParallelConfig(world_size=2, ulysses=2, first_device=2), available_devices=4)


def test_zero_gpus_with_cuda():
    msg = refused(validate_config, ParallelConfig(world_size=1), available_devices=0)
    assert "no CUDA GPU" in msg and "set device to 'cpu'" in msg
    validate_config(ParallelConfig(world_size=1))  # None: the count is not checked


def test_fp16_on_cpu():
    msg = refused(validate_config, cpu(world_size=1, dtype="fp16"))
    assert "fp16" in msg and "use fp32 or bf16" in msg
    validate_config(ParallelConfig(world_size=1, dtype="fp16"), available_devices=1)


@pytest.mark.parametrize("kernel", ["flash", "sage"])
def test_cuda_only_kernels_on_cpu(kernel):
    msg = refused(validate_config, cpu(world_size=1, attention=kernel))
    assert f"'{kernel}'" in msg and "'sdpa' or 'math'" in msg


@pytest.mark.parametrize("kernel, package, pip", [("flash", "flash_attn", "pip install flash-attn"),
                                                  ("sage", "sageattention", "pip install sageattention")])
def test_kernel_package_missing_is_refused_with_the_pip_line(kernel, package, pip, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    msg = refused(validate_config, ParallelConfig(world_size=1, attention=kernel), available_devices=1)
    assert pip in msg and "'sdpa'" in msg
    # installed: accepted (the kernel itself runs on CUDA ranks only)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == package else real(name, *a))
    validate_config(ParallelConfig(world_size=1, attention=kernel), available_devices=1)


def test_bad_dtype_name():
    msg = refused(validate_config, cpu(world_size=1, dtype="float32"))
    assert "dtype 'float32'" in msg
    assert all(d in msg for d in DTYPES)


def test_bad_attention_backend_name():
    msg = refused(validate_config, cpu(world_size=1, attention="xformers"))
    assert "attention backend 'xformers'" in msg
    assert all(b in msg for b in ATTENTION_BACKENDS)


def test_bad_device_name():
    msg = refused(validate_config, ParallelConfig(world_size=1, device="mps"))
    assert "device 'mps'" in msg and "cuda" in msg and "cpu" in msg


# ---------------------------------------------------------------- validate_for_model


def test_model_rules_pass_for_fitting_meshes():
    for kw in (dict(ulysses=4), dict(ulysses=2, tp=2), dict(tp=4), dict(ring=8), dict(cfg=2, ulysses=2, ring=2)):
        validate_for_model(cpu(world_size=math.prod(kw.values()), **kw), WAN_TINY)
    validate_for_model(cpu(world_size=8, ulysses=8), WAN_14B)  # 40 heads / 8


def test_heads_not_divisible_by_ulysses_times_tp():
    msg = refused(validate_for_model, cpu(world_size=8, ulysses=8), WAN_TINY)
    assert "4 attention heads" in msg and "ulysses x tp = 8 x 1 = 8" in msg
    assert "[1, 2, 4]" in msg and "ring" in msg  # the choices and where the rest goes
    msg = refused(validate_for_model, cpu(world_size=8, ulysses=4, tp=2), WAN_TINY)
    assert "4 x 2 = 8" in msg
    msg = refused(validate_for_model, cpu(world_size=3, ulysses=3), WAN_14B)
    assert "40 attention heads" in msg and "= 3" in msg


def test_ffn_not_divisible_by_tp():
    shape = ModelShape("wan", 4, 128, ffn_dim=1030, num_layers=1, in_channels=16, out_channels=16,
                       patch_size=(1, 2, 2))
    msg = refused(validate_for_model, cpu(world_size=4, tp=4), shape)
    assert "ffn width 1030" in msg and "tp=4" in msg and "lower tp" in msg


def test_width_not_divisible_by_tp():
    # dim = heads x head_dim, so a width that does not split over tp always has heads that do not
    # either: the heads rule refuses it first, and its message names tp.
    shape = ModelShape("odd", num_heads=3, head_dim=5, ffn_dim=8, num_layers=1, in_channels=4, out_channels=4,
                       patch_size=(1, 1, 1))
    assert shape.dim % 2 != 0
    msg = refused(validate_for_model, cpu(world_size=2, tp=2), shape)
    assert "3 attention heads" in msg and "1 x 2 = 2" in msg


# ---------------------------------------------------------------- validate_latent


def test_latent_rules():
    validate_latent(WAN_TINY, (2, 16, 3, 6, 10))
    validate_latent(WAN_TINY, (1, 16, 1, 1, 1))
    msg = refused(validate_latent, WAN_TINY, (1, 4, 64, 64))
    assert "5-D video latent" in msg and "(1, 4, 64, 64)" in msg
    msg = refused(validate_latent, WAN_TINY, (1, 36, 2, 8, 8))
    assert "36 channels" in msg and "takes 16" in msg
    assert "empty" in refused(validate_latent, WAN_TINY, (1, 16, 0, 8, 8))
    assert "empty" in refused(validate_latent, WAN_TINY, (0, 16, 2, 8, 8))
    assert "empty" in refused(validate_latent, WAN_TINY, (1, 0, 2, 8, 8))


# ---------------------------------------------------------------- fuzz


def _rand_config(rng: random.Random) -> tuple[ParallelConfig, int | None]:
    deg = {a: rng.choice((1, 1, 1, 1, 2, 2, 4, 3, 0, -1)) for a in AXES}
    world = math.prod(deg.values()) if rng.random() < 0.8 else rng.randint(-1, 17)
    odd = rng.random() < 0.3  # names drawn from outside the allowed sets
    cfg = ParallelConfig(
        world_size=world, **deg,
        dtype=rng.choice(("fp8", "", None) if odd else DTYPES),
        device=rng.choice(("mps", "cuda:0", None) if odd else ("cuda", "cpu")),
        attention=rng.choice(("xformers", None) if odd else ATTENTION_BACKENDS),
        first_device=rng.randint(0, 3),
    )
    return cfg, rng.choice((None, 0, 1, 2, 4, 8, 16))


def test_fuzz_validation_only_raises_config_error():
    rng = random.Random(1234)
    outcomes = {"config ok": 0, "model ok": 0, "latent ok": 0, "auto ok": 0, "refused": 0}
    for _ in range(500):
        cfg, devices = _rand_config(rng)
        shape = ModelShape("m", rng.choice((1, 2, 3, 4, 12, 40)), rng.choice((64, 128)),
                           rng.choice((1024, 1030, 13824)), 2, 16, 16, (1, 2, 2))
        latent = tuple(rng.choice((0, 1, 2, 3, 16, 20)) for _ in range(rng.choice((4, 5, 5, 5))))
        try:
            validate_config(cfg, devices)
            outcomes["config ok"] += 1
            # what passes is runnable
            assert math.prod(cfg.degrees().values()) == cfg.world_size >= 1
            validate_for_model(cfg, shape)
            outcomes["model ok"] += 1
            assert shape.num_heads % (cfg.ulysses * cfg.tp) == 0 and shape.ffn_dim % cfg.tp == 0
        except ConfigError as e:
            assert str(e)
            outcomes["refused"] += 1
        try:
            validate_latent(shape, latent)
            outcomes["latent ok"] += 1
            assert (len(latent) == 5 or (len(latent) == 4 and latent[1] == shape.out_channels)) \
                and min(latent) >= 1 and latent[1] <= shape.in_channels
        except ConfigError as e:
            assert str(e)
            outcomes["refused"] += 1
        fixed = {a: rng.choice((0, 0, 1, 2, 3, 4)) for a in AXES if rng.random() < 0.3}
        world = rng.randint(1, 16)
        try:
            deg, _ = auto_degrees(world, shape.num_heads, uses_cfg=rng.random() < 0.5,
                                  fits_one_device=rng.random() < 0.5, fixed=fixed)
        except ConfigError as e:
            assert str(e)
            outcomes["refused"] += 1
        else:
            outcomes["auto ok"] += 1
            assert math.prod(deg.values()) == world
            assert all(deg[a] == d for a, d in fixed.items() if d)  # fixed degrees are never changed
            validate_config(cpu(world_size=world, **deg))
    assert min(outcomes.values()) >= 10, outcomes  # every outcome really exercised


# ---------------------------------------------------------------- devices


def test_devices_list():
    c = cpu(world_size=3, ulysses=1, cfg=1, dp=3, devices=(1, 2, 3))
    assert c.device_indices() == [1, 2, 3]
    assert cpu(world_size=2, ulysses=2, first_device=2).device_indices() == [2, 3]  # the shorthand
    with pytest.raises(ConfigError, match="names 2 devices but world_size is 3"):
        validate_config(cpu(world_size=3, dp=3, devices=(1, 2)))
    with pytest.raises(ConfigError, match="names a GPU twice"):
        validate_config(ParallelConfig(world_size=2, ulysses=2, device="cuda", devices=(1, 1)), 4)
    with pytest.raises(ConfigError, match="include GPU 4 but only 4 are visible"):
        validate_config(ParallelConfig(world_size=2, ulysses=2, device="cuda", devices=(1, 4)), 4)
    validate_config(ParallelConfig(world_size=2, ulysses=2, device="cuda", devices=(3, 1)), 4)


# ---------------------------------------------------------------- several nodes


def nodes(**kw) -> ParallelConfig:
    return cpu(**{"world_size": 4, "nodes": 2, "ranks_per_node": 2, "rendezvous": "10.0.0.1:29500",
                  "secret_file": "/etc/pdit.secret", **kw})


def test_multinode_fields_are_checked_before_any_process_starts():
    validate_config(nodes(ulysses=2, ring=2))
    validate_config(nodes(ulysses=2, cfg=2, ranks_per_node=0))  # 0 = world / nodes
    assert nodes(ulysses=2, ring=2, ranks_per_node=0).local_ranks == 2
    assert "set world_size to 6" in refused(validate_config, nodes(world_size=4, ranks_per_node=3, ring=4))
    assert "rendezvous address HOST:PORT" in refused(validate_config, nodes(ulysses=2, ring=2, rendezvous=""))
    assert "give HOST:PORT" in refused(validate_config, nodes(ulysses=2, ring=2, rendezvous="10.0.0.1"))
    assert "secret_file" in refused(validate_config, nodes(ulysses=2, ring=2, secret_file=""))
    # Ulysses' all-to-all and TP's all-reduce run in every layer: never across nodes
    msg = refused(validate_config, nodes(ulysses=4))
    assert "ulysses x tp = 4 would span nodes" in msg and "ulysses=2, ring=2" in msg, msg
    assert "span nodes" in refused(validate_config, nodes(tp=4))
    assert "ranks_per_node 3 with one node" in refused(validate_config, cpu(world_size=2, ulysses=2, ranks_per_node=3))
    # CUDA: the local ranks need this machine's GPUs (the other nodes count theirs)
    validate_config(nodes(ulysses=2, ring=2, device="cuda", dtype="bf16"), available_devices=2)
    msg = refused(validate_config, nodes(ulysses=2, ring=2, device="cuda", dtype="bf16"), available_devices=1)
    assert "ranks_per_node 2" in msg and "lower ranks_per_node" in msg, msg
    # `devices` names node 0's GPUs, one per local rank
    assert nodes(ulysses=2, ring=2, devices=(3, 5)).device_index(1) == 5
    assert nodes(ulysses=2, ring=2, devices=(3, 5)).device_index(3) == 5  # the same local rank on node 1
    assert "one device per rank of a node" in refused(validate_config, nodes(ulysses=2, ring=2, devices=(0, 1, 2, 3)))
