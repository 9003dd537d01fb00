"""Cancel, hung ranks, what is checked before it is spent, and the files a group leaves, through a real headless
ComfyUI (issue 26): the shipped workflow queued over HTTP on 2 CPU ranks (ulysses 2), a tiny Wan of 8 blocks.

Each case prints its timing. One server serves them in order (TMPDIR of its own, so the test can see every file the
pack leaves there; PDIT_STALL_FLOOR_S=5 so a hung rank is named in seconds here; a Cancel grace of 3 s, so a block
of the long-block case outlasts it on any machine)."""
import os
import re
import signal
import time

import numpy as np
import psutil
import pytest

import comfy_host
from parallel_backend.runtime.transport import leftover_segments
from parallel_backend.testing.synthetic import write_tiny_wan

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_wan8_cancel.safetensors"
STALL_FLOOR = 5
CANCEL_GRACE = 3


def _ranks(server) -> list:
    return sorted(c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)
                  if "multiprocessing" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())
                  and c.status() != psutil.STATUS_ZOMBIE)


_seeds = iter(range(1000, 2000))


def _graph(seed=None, steps=2, width=64, height=64, length=5, world_size=2, prefix="latents/cancel"):
    """The shipped graph on CPU ranks; a new seed unless given (ComfyUI would serve a repeated one from its cache)."""
    auto = {a: 0 for a in ("cfg", "ulysses", "ring", "tp", "dp")}
    return comfy_host.tiny_cpu_variant(comfy_host.load_workflow("wan21_t2v_parallel_api.json"), MODEL,
                                       seed=next(_seeds) if seed is None else seed, steps=steps, width=width,
                                       height=height, length=length, prefix=prefix, world_size=world_size,
                                       degrees={"ulysses": 2} if world_size == 2 else auto)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("cancel")
    write_tiny_wan(str(d / MODEL), seed=5, num_layers=8)
    base = comfy_host.make_base_dir(str(d / "comfy"), {"diffusion_models": [str(d / MODEL)]})
    tmp = d / "tmp"
    tmp.mkdir()
    s = comfy_host.ComfyServer(base, env={"TMPDIR": str(tmp), "PDIT_STALL_FLOOR_S": str(STALL_FLOOR),
                                                "PDIT_CANCEL_GRACE_S": str(CANCEL_GRACE),
                                                "PDIT_CANCEL_MAX_S": str(CANCEL_GRACE)}).start()
    s.tmp, s.base = str(tmp), base
    try:
        yield s
    finally:
        pid = s.proc.pid
        s.stop()
        assert leftover_segments(pid) == []
        assert comfy_host.pack_temp_files(s.tmp) == [], "the server left files in its temp folder"


def _run(server, graph, timeout=240):
    return server.wait(server.queue(graph), timeout=timeout)


def _wait_running(server, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not server.get("/queue", timeout=30)["queue_running"]:
        time.sleep(0.1)


def _wait_busy(pids, share=0.5, timeout=120):
    """Until the ranks compute (a model call is under way)."""
    procs = [psutil.Process(p) for p in pids]
    for p in procs:
        p.cpu_percent(None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if min(p.cpu_percent(None) for p in procs) > share * 100:
            return
    raise TimeoutError("the ranks never computed")


def _blocks_started(server) -> list:
    """(call, block) each rank last started, read from the group's progress words (runtime/progress.py's layout;
    the test reads them to know the ranks are inside a block, not before the first one)."""
    from parallel_backend.runtime.progress import CALL_SHIFT
    names = [n for n in leftover_segments(server.proc.pid) if n.endswith("_ctl")]
    if not names:
        return []
    with open(f"/dev/shm/{names[-1]}", "rb") as f:
        words = np.frombuffer(f.read(8 * 6), dtype=np.int64)
    return [(int(w) >> CALL_SHIFT, int(w) & ((1 << CALL_SHIFT) - 1)) for w in words[2:6:2]]


def _wait_inside_first_block(server, timeout=120):
    """Until both ranks started block 1 of a call later than the ones already seen (the ranks are then inside it)."""
    before = max((c for c, _ in _blocks_started(server)), default=0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = _blocks_started(server)
        if seen and all(c > before and b >= 1 for c, b in seen):
            return
        time.sleep(0.05)
    raise TimeoutError(f"the ranks never started a block of a new call: {_blocks_started(server)}")


def _messages(h) -> dict:
    return {m[0]: m[1] for m in h["status"].get("messages", [])}


def _all_gone(server, pids, timeout=15):
    """The group's ranks, shared memory and folder are gone (the history can show a prompt's end a moment before
    the server, e.g. an Unload after it, stopped the group)."""
    def alive():
        return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (alive() or leftover_segments(server.proc.pid)
                                           or comfy_host.pack_temp_files(server.tmp)):
        time.sleep(0.1)
    assert not alive()
    assert leftover_segments(server.proc.pid) == []
    assert comfy_host.pack_temp_files(server.tmp) == []


def _warm(server):
    h = _run(server, _graph(prefix="latents/warm"))
    assert h["status"]["status_str"] == "success", h["status"]
    return _ranks(server)


def test_cancel_mid_call_stops_between_blocks_and_keeps_the_group(server):
    """One model call of 4,096 tokens x 2 rows (8 blocks, ~1.5 s each here): Cancel while it runs ends the prompt
    at the next block every rank reaches; the same ranks then serve the next prompt, bit for bit as before."""
    assert _run(server, _graph(seed=3, prefix="latents/reference"))["status"]["status_str"] == "success"
    reference, _ = comfy_host.saved_latent(server.base, "latents/reference")
    pids = _warm(server)  # (another seed: ComfyUI will not serve seed 3 from its cache below)
    pid = server.queue(_graph(seed=9, steps=1, width=1024, height=1024, length=1, prefix="latents/big"))
    _wait_running(server)
    _wait_busy(pids)
    time.sleep(1.0)
    t0 = time.monotonic()
    server.post("/interrupt", {})
    h = server.wait(pid, timeout=120)
    took = time.monotonic() - t0
    log = open(server.log_path).read()
    stopped = re.findall(r"Cancel: the ranks of .* stopped model call \d+ at block (\d+), ([\d.]+) s after", log)
    print(f"Cancel mid-call: prompt ended {took:.2f} s after /interrupt; ranks stopped at block {stopped[-1][0]} "
          f"({stopped[-1][1]} s after the request)")
    assert "execution_interrupted" in _messages(h), h["status"]
    assert stopped and took < 5, (took, log[-2000:])
    assert _ranks(server) == pids  # the warm group stayed
    h = _run(server, _graph(seed=3, prefix="latents/warm_again"))
    assert h["status"]["status_str"] == "success", h["status"]
    again, _ = comfy_host.saved_latent(server.base, "latents/warm_again")
    assert _ranks(server) == pids and (again - reference).abs().max().item() == 0.0


def test_a_stopped_rank_is_named_in_seconds(server):
    """SIGSTOP one rank mid-run, no Cancel: the prompt fails naming the rank, its pid and that it is stopped, within
    the stall floor (+ a poll); the group is gone (ranks, shared memory, folder) and the next prompt starts fresh."""
    pids = _warm(server)
    pid = server.queue(_graph(steps=2000, prefix="latents/stall"))
    _wait_running(server)
    _wait_busy(pids, share=0.2)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        h = server.wait(pid, timeout=120)
    finally:
        if psutil.pid_exists(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    took = time.monotonic() - t0
    err = _messages(h).get("execution_error", {})
    text = err.get("exception_message", "")
    print(f"SIGSTOP of rank 1 (pid {pids[1]}): named after {took:.1f} s: {text}")
    assert h["status"]["status_str"] == "error", h["status"]
    assert re.search(rf"rank 1 \(pid {pids[1]}, stopped \(SIGSTOP.*made no progress for \d+ s", text), text
    assert took < STALL_FLOOR + 10
    _all_gone(server, pids)
    h = _run(server, _graph(prefix="latents/after_stall"))
    assert h["status"]["status_str"] == "success", h["status"]
    assert set(_ranks(server)).isdisjoint(pids)


def test_cancel_with_a_stopped_rank_stops_the_group(server):
    """SIGSTOP one rank, then Cancel: the ranks cannot stop the call, so after the Cancel grace (3 s) the group is
    stopped, ComfyUI reports Interrupted, the log names the group and the stopped rank."""
    pids = _warm(server)
    pid = server.queue(_graph(steps=2000, prefix="latents/stopped_cancel"))
    _wait_running(server)
    _wait_busy(pids, share=0.2)
    os.kill(pids[0], signal.SIGSTOP)
    time.sleep(0.5)
    t0 = time.monotonic()
    server.post("/interrupt", {})
    h = server.wait(pid, timeout=60)
    took = time.monotonic() - t0
    log = open(server.log_path).read()
    line = [ln for ln in log.splitlines() if "Cancel during a model call" in ln][-1]
    print(f"SIGSTOP of rank 0 + Cancel: prompt ended {took:.1f} s after /interrupt; {line}")
    assert "execution_interrupted" in _messages(h), h["status"]
    assert took < 10 and f"rank 0 (pid {pids[0]}, stopped" in line and "2 x cpu (ulysses=2)" in line
    _all_gone(server, pids)
    assert _run(server, _graph(prefix="latents/after_cancel"))["status"]["status_str"] == "success"


def test_cancel_inside_one_long_block_stops_the_group(server):
    """A call whose blocks take ~20 s each here (16,384 tokens x 2 rows): the ranks are inside a kernel and cannot
    reach a block boundary within the grace (3 s here), so Cancel stops the group (a fresh one serves the next
    prompt)."""
    pids = _warm(server)
    gave_up_before = open(server.log_path).read().count("Cancel during a model call")
    pid = server.queue(_graph(steps=1, width=2048, height=2048, length=1, prefix="latents/huge"))
    _wait_inside_first_block(server)  # (a Cancel before block 1 stops the call there: the warm-group case above)
    t0 = time.monotonic()
    server.post("/interrupt", {})
    h = server.wait(pid, timeout=60)
    took = time.monotonic() - t0
    print(f"Cancel inside a ~20 s block: prompt ended {took:.1f} s after /interrupt")
    assert "execution_interrupted" in _messages(h), h["status"]
    log = open(server.log_path).read()
    assert log.count("Cancel during a model call") == gave_up_before + 1, "the ranks reached a block boundary within the grace: " + log[-1500:]
    # the grace: two of the longest blocks seen, scaled to this call's tokens, here capped at 3 s; then the stop
    assert took < CANCEL_GRACE + 6
    _all_gone(server, pids)


def test_a_latent_too_large_is_refused_before_the_call(server):
    """EmptyHunyuanLatentVideo 16384 x 16384: ComfyUI's own activation estimate for the model, split over the ranks,
    exceeds the host's memory: refused with the numbers before anything is sent; the group stays and still works."""
    pids = _warm(server)
    t0 = time.monotonic()
    h = _run(server, _graph(steps=1, width=16384, height=16384, length=1, prefix="latents/too_large"))
    took = time.monotonic() - t0
    text = _messages(h).get("execution_error", {}).get("exception_message", "")
    print(f"16384 x 16384 latent: refused after {took:.1f} s: {text}")
    assert h["status"]["status_str"] == "error"
    assert "this model call is too large for the ranks: 2 rows of a 1x2048x2048 latent needs about" in text, text
    assert "of activations on the largest rank" in text and "Nothing was sent to the ranks" in text
    assert _ranks(server) == pids
    assert _run(server, _graph(prefix="latents/after_too_large"))["status"]["status_str"] == "success"


def test_world_size_beyond_the_host_is_refused_before_any_rank_starts(server):
    pids = _ranks(server)
    before = {c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)}
    h = _run(server, _graph(world_size=64, prefix="latents/wide"))
    text = _messages(h).get("execution_error", {}).get("exception_message", "")
    print(f"world_size 64 on {psutil.cpu_count()} cores: {text}")
    assert h["status"]["status_str"] == "error"
    assert "starts 64 rank processes on this machine's" in text and "set world_size to at most" in text, text
    started = {c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)} - before
    assert not started, started  # no rank was started for it
    _all_gone(server, pids)  # (the old config's group made way for the new one, as any config change does)


def test_unload_while_a_prompt_runs_stops_the_group_when_it_ends(server):
    """POST /free {"unload_models": true} during a prompt: as natively, it acts when the prompt ends; the group is
    then stopped and its folder removed."""
    pids = _warm(server)
    pid = server.queue(_graph(steps=40, prefix="latents/unload"))
    _wait_running(server)
    server.post("/free", {"unload_models": True})
    h = server.wait(pid, timeout=240)
    assert h["status"]["status_str"] == "success", h["status"]
    _all_gone(server, pids)
