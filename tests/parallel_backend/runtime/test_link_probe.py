"""runtime/link_probe.py on 2 gloo ranks: the links' probe (within its budget, and seeing a link slowed on purpose
through the PDIT_EMULATE_LINK knob the collectives honour) and the synthetic block's timing per sequence share."""
from __future__ import annotations

import os
import time

import pytest
import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.parallel.collectives import emulate_link, parse_emulated_link

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only
PROBE_BUDGET_S = 0.5  # what a group start may spend measuring its links (CPU ranks; GPUs are faster)


def _probe(mesh, emulate: str):
    from parallel_backend.runtime.link_probe import probe_links
    os.environ["PDIT_EMULATE_LINK"] = emulate  # a forkserver child: the knob as a rank would inherit it
    return probe_links(mesh.config.world_size, mesh.config.local_ranks, mesh.device)


@pytest.fixture(scope="module")
def probes():
    from parallel_backend.testing.spmd import run_on_ranks
    config = ParallelConfig(world_size=2, ulysses=2, device="cpu", dtype="fp32")
    return {e: run_on_ranks(_probe, config, e) for e in ("", "gbit=0.5,delay_ms=5")}


@pytest.mark.multirank
def test_probe_measures_every_link_class_within_its_budget(probes):
    plain = probes[""]
    same = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert same(plain[0]) == same(plain[1])  # every rank keeps the slowest of each class: the same numbers
    for kind in ("all_to_all", "p2p"):
        assert plain[0][kind]["bandwidth"] > 0.5e9 / 8 and 0 < plain[0][kind]["latency"] < 5e-3
    assert "p2p_across" not in plain[0]  # one node
    assert plain[0]["seconds"] < PROBE_BUDGET_S


@pytest.mark.multirank
def test_probe_sees_a_link_slowed_on_purpose(probes):
    slow = probes["gbit=0.5,delay_ms=5"][0]
    for kind in ("all_to_all", "p2p"):
        assert slow[kind]["latency"] >= 5e-3
        assert 0.5e9 / 8 / 4 < slow[kind]["bandwidth"] < 0.5e9 / 8 * 1.5  # (a loaded machine only slows it)


def test_emulated_link_knob():
    assert parse_emulated_link("gbit=8, delay_ms=2") == (1e9, 2e-3)
    with pytest.raises(ValueError, match="unknown fields"):
        parse_emulated_link("mbit=8")
    os.environ.pop("PDIT_EMULATE_LINK", None)
    t0 = time.perf_counter()
    emulate_link(1 << 30)
    assert time.perf_counter() - t0 < 0.01  # unset: no wait


def test_synthetic_block_time_falls_with_the_share():
    from parallel_backend.runtime.link_probe import time_block
    timed = time_block(torch.device("cpu"), torch.float32, 256, 4, 512, 1024, 16, [1, 2, 4])
    total = {s: sum(v) for s, v in timed["blocks"].items()}
    assert total[4] < total[1] and total[2] < total[1]
    assert timed["blocks"][1][1] > 0  # the attention is timed apart
    assert 256 <= timed["tokens"] <= 1024


def test_a_large_latent_is_timed_within_the_budget():
    from parallel_backend.runtime.link_probe import BLOCK_BUDGET_S, time_block
    t0 = time.perf_counter()
    timed = time_block(torch.device("cpu"), torch.float32, 512, 4, 1024, 32760, 512, [1, 2])
    assert timed["tokens"] < 32760  # scaled up by planner.block_seconds
    assert time.perf_counter() - t0 < 20 * BLOCK_BUDGET_S


# ---- across two network namespaces, the veth slowed by tc netem ------------------------------------------------------

_ACROSS = """
import json, sys, torch, torch.distributed as dist
from parallel_backend.runtime.link_probe import probe_links
rank, master = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://{master}:29641", rank=rank, world_size=2)
for line in sys.stdin:  # one probe per line: the test reshapes the link in between
    print(json.dumps(probe_links(2, 1, torch.device("cpu"))), flush=True)
dist.destroy_process_group()
"""


def _probes_across(net, shapes) -> dict:
    """{shape: rank 0's probe_links} with the veth shaped by each of `shapes` in turn (one process per namespace,
    kept across the shapes)."""
    import json
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    procs = [net.popen(i, [sys.executable, "-c", _ACROSS, str(i), net.addresses[0]], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**env, "GLOO_SOCKET_IFNAME": net.interfaces[i]})
             for i in (0, 1)]
    out = {}
    try:
        for shape, apply in shapes.items():
            apply()
            for p in procs:
                p.stdin.write("probe\n")
                p.stdin.flush()
            lines = [p.stdout.readline() for p in procs]
            assert all(lines), [p.stderr.read()[-2000:] for p in procs]
            out[shape] = json.loads(lines[0])
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
    return out


@pytest.mark.multirank
def test_auto_placement_follows_a_link_slowed_by_tc():
    """Two ranks on two "machines" (network namespaces): the probe measures the veth as an across-nodes link, and the
    planner's choice for a cfg-1 call on those two ranks moves from the fold (Ulysses over both) to one rank when tc
    slows the veth from 4 Gbit/s to 0.5 Gbit/s (netem with a 1 ms delay; tbf's rate alone on a kernel without netem).
    The call: Wan 1.3B 480p on a device taking 1.6 s a block, whose fold breaks even near 1 Gbit/s."""
    import shutil
    from parallel_backend.planner import CallShape, Measured, choose_fold
    from parallel_backend.testing.netns import shape_link, two_node_netns
    if shutil.which("tc") is None:
        pytest.skip("iproute2's `tc` is missing: apt-get install iproute2 (the in-process emulation tests still run)")
    kinds = set()
    with two_node_netns("links") as net:
        measured = _probes_across(net, {mbit: lambda mbit=mbit: kinds.add(shape_link(net, mbit, 1))
                                        for mbit in (4000, 500)})
    fast, slow = measured[4000]["p2p_across"], measured[500]["p2p_across"]
    assert slow["bandwidth"] < 0.8e9 / 8 < 1.5e9 / 8 < fast["bandwidth"], measured
    if kinds == {"netem"}:
        assert slow["latency"] >= 1e-3  # one way, 1 ms each direction
    config = ParallelConfig(world_size=2, cfg=2, nodes=2, ranks_per_node=1, device="cpu", rendezvous="10.0.0.1:1",
                            secret_file="/dev/null")
    call = CallShape(dim=1536, heads=12, layers=30, tokens=32760, rows=1)
    blocks = {1: (1.2, 0.4), 2: (0.6, 0.2)}
    folds = {r: choose_fold(config, call, Measured(m, blocks, 32760))[0] for r, m in measured.items()}
    assert folds == {4000: 2, 500: 1}, (folds, measured)
