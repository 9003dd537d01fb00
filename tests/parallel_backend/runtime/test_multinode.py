"""Multi-node rendezvous (runtime/multinode.py, runtime/node.py) without a cluster.

In-process (loopback, threads): the store binds only the given address, the secret admission refuses a wrong
secret / a wrong world / a rank claimed twice, the model-file fingerprint and its check across ranks.

Two nodes (`multirank`): two network namespaces joined by a veth pair (parallel_backend/testing/netns.py; needs
root, fails loudly without it), node 0 in one, node 1 in the other, each running
`python -m parallel_backend.runtime.node` with CPU/gloo ranks:
- the group forms and a real forward of the tiny Wan on meshes that cross the nodes equals one rank within 1e-5
  (1 rank per node: ring2 and cfg2 across; 2 ranks per node: ulysses inside x ring across, cfg across x ulysses);
- every socket the ranks listen on binds the namespace's own address (the store: the given address only), and
  every connection runs between the two namespace addresses (gloo on the veth, never loopback);
- a node with a different secret is refused (both sides say why) and no rank runs its target;
- a different model file on node 1 is refused, naming node 1 and what differs.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel_backend.runtime.multinode import (
    Fingerprint,
    ModelFileMismatch,
    RendezvousError,
    RendezvousRefused,
    RendezvousServer,
    World,
    check_model_file,
    connect_store,
    file_fingerprint,
    parse_endpoint,
    request_admission,
    resolve_model,
)
from parallel_backend.testing.netns import NetnsError, preflight, two_node_netns
from parallel_backend.testing.synthetic import write_tiny_wan

REPO = Path(__file__).resolve().parents[3]
SECRET = b"0123456789abcdef0123456789abcdef"
TOL = 1e-5


def _listeners(port: int) -> list[str]:
    """Local addresses listening on TCP `port` in this namespace (ss)."""
    out = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [line.split()[-2] for line in out.splitlines() if line.strip()]


# ---- in-process: store binding, admission, fingerprints ----------------------------------------------------------

@pytest.mark.multirank
def test_store_binds_only_the_given_address():
    # torch's TCPStore creating its own socket listens on every interface (`*:port`), whatever host it is given;
    # the server hands it a socket bound to the given address (master_listen_fd)
    plain = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    print(f"\nTCPStore('127.0.0.1') on its own listens on {_listeners(plain.port)}")
    del plain
    server = RendezvousServer("127.0.0.1", 0, SECRET, World(1, 1), timeout=10)
    assert _listeners(server.port) == [f"127.0.0.1:{server.port}"]
    client = connect_store("127.0.0.1", server.port, timeout=10)
    assert client.get("pdit/rdzv//nonce").decode() == server.nonce
    with pytest.raises(RendezvousError, match="every interface"):
        RendezvousServer("0.0.0.0", 0, SECRET, World(1, 1))
    with pytest.raises(RendezvousError, match="not an address of this machine"):
        RendezvousServer("192.0.2.1", 0, SECRET, World(1, 1))  # TEST-NET-1: never local, nothing is sent


def test_parse_endpoint():
    assert parse_endpoint("10.0.0.1:29500") == ("10.0.0.1", 29500)
    assert parse_endpoint("[fd00::1]:29500") == ("fd00::1", 29500)
    for bad in ("10.0.0.1", "10.0.0.1:0", ":29500", "host:x"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def _admit_in_threads(world: World, secrets: dict, claims: dict | None = None, timeout=10):
    """Node 0's admission with one thread per rank (rank -> secret; claims: rank -> (claimed rank, world))."""
    server = RendezvousServer("127.0.0.1", 0, SECRET, world, timeout=timeout)
    outcome = {}

    def rank_thread(rank):
        claimed, w = (claims or {}).get(rank, (rank, world))
        try:
            store = connect_store("127.0.0.1", server.port, timeout=timeout)
            outcome[rank] = request_admission(store, secrets[rank], claimed, w, "127.0.0.1", "node 0", timeout)
        except RendezvousError as e:
            outcome[rank] = e
    threads = [threading.Thread(target=rank_thread, args=(r,)) for r in secrets]
    for t in threads:
        t.start()
    try:
        server_result = server.admit()
    except RendezvousError as e:
        server_result = e
    for t in threads:
        t.join(timeout + 5)
    return server, server_result, outcome


def test_admission_admits_ranks_with_the_secret():
    server, result, outcome = _admit_in_threads(World(2, 2), {r: SECRET for r in range(4)})
    assert sorted(result) == [0, 1, 2, 3] and [result[r]["node"] for r in range(4)] == [0, 0, 1, 1]
    assert all(outcome[r] == server.nonce for r in range(4)), outcome


def test_admission_refuses_a_wrong_secret_and_forms_no_group():
    _, result, outcome = _admit_in_threads(World(2, 1), {0: SECRET, 1: b"not-the-secret-at-all-0123456789"})
    assert isinstance(result, RendezvousRefused)
    assert "refused rank 1 (node 1" in str(result) and "secret" in str(result) and "not formed" in str(result)
    assert isinstance(outcome[1], RendezvousRefused) and "secret" in str(outcome[1]), outcome[1]
    # the rank that did hold the secret is not left in a group of one: the rendezvous was aborted for it too
    assert isinstance(outcome[0], RendezvousError) and "aborted" in str(outcome[0]), outcome[0]


def test_admission_refuses_a_wrong_world_and_a_rank_claimed_twice():
    _, result, outcome = _admit_in_threads(World(2, 1), {0: SECRET, 1: SECRET}, claims={1: (1, World(2, 2))})
    assert isinstance(result, RendezvousRefused) and "--nproc-per-node" in str(result), result
    assert isinstance(outcome[1], RendezvousRefused)
    # two processes claiming rank 0: exactly one gets it, the other is told who else holds it
    _, result, outcome = _admit_in_threads(World(1, 2), {0: SECRET, 1: SECRET, 2: SECRET},
                                           claims={2: (0, World(1, 2))}, timeout=5)
    dup = [e for e in outcome.values() if isinstance(e, RendezvousRefused) and "already joined as rank 0" in str(e)]
    assert len(dup) == 1, outcome


def test_admission_times_out_naming_the_missing_node():
    _, result, outcome = _admit_in_threads(World(2, 1), {0: SECRET}, timeout=1)
    assert isinstance(result, RendezvousError) and "rank(s) [1] (node(s) [1]) did not join" in str(result), result
    assert isinstance(outcome[0], RendezvousError)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Each node's model folder with the same tiny Wan, and a folder whose tiny.safetensors is another file (bf16)."""
    d = tmp_path_factory.mktemp("multinode_models")
    for sub in ("node0", "node1", "other"):
        (d / sub).mkdir()
    same = [write_tiny_wan(str(d / f"node{k}" / "tiny.safetensors"), seed=0) for k in (0, 1)]
    other = write_tiny_wan(str(d / "other" / "tiny.safetensors"), seed=0, dtype=torch.bfloat16)
    return {"dirs": [str(d / "node0"), str(d / "node1")], "same": same, "other": other, "other_dir": str(d / "other")}


def test_file_fingerprint(model_files, tmp_path):
    a, b = (file_fingerprint(p) for p in model_files["same"])
    assert a == b and a.size == os.path.getsize(model_files["same"][0])
    other = file_fingerprint(model_files["other"])
    diffs = other.differences(a)
    assert len(diffs) == 2 and diffs[0].startswith("size") and diffs[1].startswith("header sha256")
    # GGUF: the header is everything up to the tensor data (gguf's data_offset)
    from parallel_backend.testing.gguf_files import write_gguf_dit
    g = str(tmp_path / "tiny.gguf")
    write_gguf_dit(model_files["same"][0], g, "Q8_0")
    fg = file_fingerprint(g)
    assert fg.size == os.path.getsize(g) and fg != a
    with pytest.raises(FileNotFoundError):
        file_fingerprint(str(tmp_path / "missing.safetensors"))
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04" * 10)
    with pytest.raises(ModelFileMismatch, match="neither a safetensors nor a GGUF"):
        file_fingerprint(str(tmp_path / "x.ckpt"))
    with pytest.raises(ModelFileMismatch, match="relative"):
        resolve_model("/models", "../etc/passwd")


def _check_in_threads(paths: list) -> dict:
    store, world, out = dist.HashStore(), World(len(paths), 1), {}

    def run(rank):
        try:
            out[rank] = check_model_file(store, rank, world, paths[rank], tag="t", timeout=10)
        except ModelFileMismatch as e:
            out[rank] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return out


def test_model_file_check_names_the_node_that_differs(model_files, tmp_path):
    out = _check_in_threads(model_files["same"])
    assert isinstance(out[0], Fingerprint) and out[0] == out[1]
    out = _check_in_threads([model_files["same"][0], model_files["other"], model_files["same"][1]])
    for rank in range(3):  # every rank raises the same verdict: node 1 differs, node 2 does not
        e = out[rank]
        assert isinstance(e, ModelFileMismatch) and "node 1: " in str(e) and "size" in str(e), e
        verdict = str(e).split("): ", 1)[1]  # after "failed on rank R (node K)"
        assert verdict.startswith("node 1: ") and "node 2: " not in verdict and "node 0: " not in verdict, e
    out = _check_in_threads([model_files["same"][0], str(tmp_path / "absent.safetensors")])
    assert all("node 1: model file not found" in str(out[r]) for r in (0, 1)), out


# ---- two nodes in two network namespaces -------------------------------------------------------------------------

def test_netns_helper_says_why_it_cannot_run(monkeypatch):
    import parallel_backend.testing.netns as netns
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="needs root"):
        netns.preflight()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    with pytest.raises(NetnsError, match="`ip` is not on PATH"):
        netns.preflight()


@pytest.fixture(scope="module")
def net():
    try:
        preflight()
    except NetnsError as e:
        pytest.fail(f"the two-node tests need two network namespaces on this machine: {e}")
    with two_node_netns() as n:
        yield n


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("secrets")
    for name, value in (("good", SECRET), ("bad", b"a-different-secret-0123456789abcdef")):
        (d / name).write_bytes(value + b"\n")
        os.chmod(d / name, 0o600)
    return d


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")] + ([env["PYTHONPATH"]]
                                                                            if env.get("PYTHONPATH") else []))
    # the ranks build ComfyUI's own WanModel: ComfyUI must be importable there (scripts/test.sh exports it)
    env.setdefault("COMFYUI_PATH", os.path.expanduser("~/.cache/pdit/comfyui"))
    return env


def _run_nodes(net, port, nproc, target, args, secret_files, model_dirs, timeout=240):
    """Both nodes' `python -m parallel_backend.runtime.node`, node k in namespace k; returns [(rc, stdout, stderr)]."""
    procs = []
    for k in (0, 1):
        argv = [sys.executable, "-m", "parallel_backend.runtime.node", "--rendezvous", f"{net.addresses[0]}:{port}",
                "--node-rank", k, "--nodes", 2, "--nproc-per-node", nproc, "--secret-file", secret_files[k],
                "--model-dir", model_dirs[k], "--device", "cpu", "--target", target, "--target-args",
                json.dumps(args), "--timeout", 60]
        procs.append(net.popen(k, argv, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True))
    results, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _addr(endpoint: str) -> str:
    """The address of an `ss` endpoint; an IPv4-mapped IPv6 one (torch's store clients use dual-stack sockets) as
    its IPv4 address."""
    import ipaddress
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # "*"
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


@pytest.fixture(scope="module")
def reference(model_files):
    from parallel_backend.config import ParallelConfig
    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel
    from tiny_inputs import wan_inputs

    x, t, c = wan_inputs(batch=2)
    model = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"),
                                          torch.device("cpu")), model_files["same"][0], "fp32")
    return model.forward_rows(x, t, c)


# nproc per node -> meshes that cross the two nodes (AXES order puts ulysses inside a node)
MESHES = {1: {"ring2": dict(ring=2), "cfg2": dict(cfg=2)},
          2: {"ring2xulysses2": dict(ring=2, ulysses=2), "cfg2xulysses2": dict(cfg=2, ulysses=2)}}


@pytest.mark.multirank
@pytest.mark.parametrize("nproc", [1, 2], ids=["1x2", "2x2"])
def test_two_nodes_form_a_group_and_match_one_rank(net, secrets_dir, model_files, reference, tmp_path, nproc):
    port = 29500 + nproc
    t0 = time.monotonic()
    results = _run_nodes(net, port, nproc, "multinode_ranks:parity",
                         {"out": str(tmp_path), "model": "tiny.safetensors", "meshes": MESHES[nproc]},
                         [secrets_dir / "good"] * 2, model_files["dirs"])
    wall = time.monotonic() - t0
    for k, (rc, out, err) in enumerate(results):
        assert rc == 0, f"node {k} exited {rc}:\n{out}\n{err[-4000:]}"
    assert "admitted every rank" in results[0][1]
    world = 2 * nproc
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    report = []
    for name in MESHES[nproc]:
        got = torch.full_like(reference, float("nan"))
        for r in per_rank:
            m = r["meshes"][name]
            if m["y"] is not None:
                got[slice(*m["rows"])] = m["y"]
        diff = (got - reference).abs().max().item()
        assert diff <= TOL, f"{name} across two nodes: max abs diff {diff:.2e}"
        report.append(f"{name} {diff:.2e}")
        coords = [r["meshes"][name]["coord"] for r in per_rank]
        across = "ring" if name.startswith("ring") else "cfg"
        # the axis named first crosses the nodes; ulysses stays inside one
        assert [c[across] for c in coords] == [r // nproc for r in range(world)], coords
        assert [c["ulysses"] for c in coords] == [r % nproc for r in range(world)], coords
    # gloo used the veth of each namespace (the interface holding the address towards node 0)
    for r, res in enumerate(per_rank):
        k = r // nproc
        assert (res["node"], res["interface"], res["address"], res["gloo_ifname"]) == \
            (k, net.interfaces[k], net.addresses[k], net.interfaces[k]), res
    # sockets, as each namespace's `ss` saw them while the group was up
    node_sockets = {r // nproc: res["sockets"] for r, res in enumerate(per_rank)}
    for k, socks in node_sockets.items():
        listening = [line.split()[-2] for line in socks["listen"].splitlines() if line.strip()]
        assert listening and all(_addr(a) == net.addresses[k] for a in listening), (k, listening)
        established = [line.split()[-2:] for line in socks["established"].splitlines() if line.strip()]
        bad = [pair for pair in established if not all(_addr(a) in net.addresses for a in pair)]
        assert established and not bad, (k, bad)
    store_listeners = [a for a in node_sockets[0]["listen"].split() if a.endswith(f":{port}")]
    assert store_listeners == [f"{net.addresses[0]}:{port}"], node_sockets[0]["listen"]
    n_listen = {k: len(s["listen"].splitlines()) for k, s in node_sockets.items()}
    print(f"\n{nproc} rank(s) per node: {', '.join(report)}; {wall:.1f} s; listening sockets per node {n_listen}")


@pytest.mark.multirank
def test_a_node_with_a_wrong_secret_is_refused(net, secrets_dir, model_files, tmp_path):
    results = _run_nodes(net, 29511, 1, "multinode_ranks:model_check", {"out": str(tmp_path), "model": "x"},
                         [secrets_dir / "good", secrets_dir / "bad"], model_files["dirs"])
    (rc0, out0, err0), (rc1, _, err1) = results
    assert rc0 != 0 and rc1 != 0, results
    assert "node 0 refused rank 1 (node 1" in err0 and "secret" in err0 and "not formed" in err0, err0
    assert "rank 1 (node 1) was refused by node 0" in err1 and "secret" in err1, err1
    # node 0's own rank was told the rendezvous was aborted; no rank ever reached its target
    assert "rank 0 (node 0): the rendezvous" in err0 and "aborted" in err0, err0
    assert "admitted every rank" not in out0
    assert not list(tmp_path.glob("check*.json"))


@pytest.mark.multirank
def test_a_different_model_file_on_node_1_is_refused(net, secrets_dir, model_files, tmp_path):
    args = {"out": str(tmp_path), "model": "tiny.safetensors"}
    results = _run_nodes(net, 29512, 1, "multinode_ranks:model_check", args, [secrets_dir / "good"] * 2,
                         [model_files["dirs"][0], model_files["other_dir"]])
    assert all(rc != 0 for rc, _, _ in results), results
    for k in (0, 1):
        got = json.loads((tmp_path / f"check{k}.json").read_text())
        e = got.get("error", "")
        assert e.startswith("ModelFileMismatch") and "node 1: " in e and "node 0: " not in e, got
        assert "size" in e and "header sha256" in e, e
        assert "ModelFileMismatch" in results[k][2]


# ---- the worker group across the namespaces: node 0 = the ComfyUI process's WorkerGroup (tests/multinode_driver.py),
# node 1 = `python -m parallel_backend.runtime.node` serving node 0's groups -------------------------------------------

def _serve_node1(net, port, secret, model_dir, log):
    argv = [sys.executable, "-m", "parallel_backend.runtime.node", "--rendezvous", f"{net.addresses[0]}:{port}",
            "--node-rank", 1, "--nodes", 2, "--nproc-per-node", 2, "--secret-file", secret, "--model-dir", model_dir,
            "--device", "cpu", "--timeout", 60]
    return net.popen(1, argv, cwd=str(REPO), env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _drive(net, scenario, args, tmp_path, timeout=300, during=None):
    """Run tests/multinode_driver.py SCENARIO in namespace 0; `during(proc)` runs while it does. Returns its result."""
    args = {"out": str(tmp_path), **args}
    p = net.popen(0, [sys.executable, str(REPO / "tests" / "multinode_driver.py"), scenario, json.dumps(args)],
                  cwd=str(REPO), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if during is not None:
            during(p)
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    result = json.loads((tmp_path / "result.json").read_text())
    assert "crash" not in result, result["crash"] + "\n" + out[-4000:]
    return result, out


def _driver_args(net, port, secrets_dir, model_files, **kw):
    return {"rendezvous": f"{net.addresses[0]}:{port}", "secret": str(secrets_dir / "good"),
            "model": os.path.join(model_files["dirs"][0], "tiny.safetensors"), "name": "tiny.safetensors",
            "rejoin": 60, **kw}


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _node1_serving(net, port, secret, model_dir, tmp_path):
    """Node 1's node command serving in namespace 1 for the body (its output in tmp_path/node1.log); yields the list
    of its processes (a body may restart it and append), all stopped afterwards."""
    with open(tmp_path / "node1.log", "w") as log:
        procs = [_serve_node1(net, port, secret, model_dir, log)]
        try:
            yield procs, log
        finally:
            for p in procs:
                _stop(p)


@pytest.mark.multirank
def test_worker_group_spans_two_nodes_and_matches_one_rank(net, secrets_dir, model_files, tmp_path):
    port = 29521
    with _node1_serving(net, port, secrets_dir / "good", model_files["dirs"][1], tmp_path):
        meshes = {"ulysses2-inside x ring2-across": {"ulysses": 2, "ring": 2},
                  "ulysses2-inside x cfg2-across": {"ulysses": 2, "cfg": 2}}
        result, out = _drive(net, "parity", _driver_args(net, port, secrets_dir, model_files, meshes=meshes),
                             tmp_path)
    report = []
    for name, r in result["meshes"].items():
        # a 2-row call, and a 1-row call (cfg 1.0): the idle replica folds into the sequence split (across nodes)
        assert r["batch2"] <= TOL and r["batch1"] <= TOL, (name, r, (tmp_path / "node1.log").read_text()[-3000:])
        assert r["remote_memory"]["device"] == "cpu"  # node 1's ranks reported their memory to node 0
        # every rank (node 1's answer through the store) served both calls; the 1-row call of the cfg-across mesh
        # folds the idle replica into the Ring (across nodes), never into the Ulysses all-to-all
        assert len(r["folds"]) == 4 and all(len(f) == 2 for f in r["folds"]), r["folds"]
        want = "2xring" if "cfg" in name else "none"
        assert all(f[1] == want for f in r["folds"]), (name, r["folds"])
        report.append(f"{name}: {r['batch2']:.2e} / {r['batch1']:.2e}")
    # node 1 served both groups one after the other (it rejoins each new group of node 0)
    assert (tmp_path / "node1.log").read_text().count("joining node 0's group") >= 2
    socks = result["sockets"]  # node 0's namespace while the second group was up
    listening = [line.split()[-2] for line in socks["listen"].splitlines() if line.strip()]
    assert listening and all(_addr(a) == net.addresses[0] for a in listening), listening
    established = [line.split()[-2:] for line in socks["established"].splitlines() if line.strip()]
    crossing = [p for p in established if {_addr(a) for a in p} == set(net.addresses)]
    assert crossing and all(all(_addr(a) in net.addresses for a in p) for p in established), established
    print("\nworker group over 2 nodes x 2 ranks vs one rank (2 rows / 1 row): " + "; ".join(report))


@pytest.mark.multirank
def test_a_killed_node_is_named_and_the_next_start_waits_for_it(net, secrets_dir, model_files, tmp_path):
    port = 29522
    killed = {}

    def during(driver):
        deadline = time.monotonic() + 180
        while not (tmp_path / "forward_started").exists():
            assert driver.poll() is None and time.monotonic() < deadline, "the driver never reached the forward"
            time.sleep(0.05)
        killed["at"] = time.time()
        for pid in net.pids(1):  # the whole "machine": its node process and every rank
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        while not (tmp_path / "restart_node1").exists():
            assert driver.poll() is None and time.monotonic() < deadline, "the driver never asked for node 1 back"
            time.sleep(0.05)
        time.sleep(2.0)  # node 0's start is already waiting when node 1 comes back
        procs.append(_serve_node1(net, port, secrets_dir / "good", model_files["dirs"][1], log))
    with _node1_serving(net, port, secrets_dir / "good", model_files["dirs"][1], tmp_path) as (procs, log):
        r, out = _drive(net, "kill", _driver_args(net, port, secrets_dir, model_files, short_rejoin=4), tmp_path,
                        during=during)
    assert r["before"]["batch2"] <= TOL
    err = r["error"]
    # the whole node is gone (its heartbeat stops), or its node process lived long enough to post a rank's death
    assert err and ("node 1 (ranks 2, 3) stopped answering" in err or re.search(r"rank [23] on node 1 was killed", err)), err
    took = r["error_at"] - killed["at"]
    assert took < 10.0, f"the lost node was reported {took:.1f} s after the kill: {err}"
    # node 0 left nothing behind: its ranks are gone, its shared memory unlinked
    assert r["local_ranks_alive"] == [] and r["segments_left"] == [] and r["group_closed"], r
    # the next prompt, node 1 still gone: waits rejoin_timeout, then says which node is missing and how to bring it
    missing = r["missing_error"]
    assert missing and "node(s) [1]" in missing and "parallel_backend.runtime.node" in missing, missing
    assert 4.0 <= r["missing_wait_s"] < 30, r["missing_wait_s"]
    assert r["after_missing_alive"] == [], r
    # ... and when node 1 comes back while a start waits, the group forms again and matches one rank
    assert r["rejoin_wait_s"] >= 1.5 and r["after"]["batch2"] <= TOL and r["after"]["batch1"] <= TOL, r
    print(f"\nnode 1 killed mid-forward: named after {took:.2f} s ({err.split(' during')[0]}); missing node refused "
          f"after {r['missing_wait_s']:.1f} s; rejoined after {r['rejoin_wait_s']:.1f} s, parity "
          f"{r['after']['batch2']:.2e}")


@pytest.mark.multirank
def test_worker_group_refuses_a_node_without_the_secret(net, secrets_dir, model_files, tmp_path):
    port = 29523
    with _node1_serving(net, port, secrets_dir / "bad", model_files["dirs"][1], tmp_path):
        r, _ = _drive(net, "refused", _driver_args(net, port, secrets_dir, model_files), tmp_path)
    err = r["error"]
    assert err and re.search(r"refused rank [23] \(node 1", err) and "secret" in err and "could not form" in err, err
    assert r["wait_s"] < 30 and r["children_alive"] == [], r
    assert "was refused by node 0" in (tmp_path / "node1.log").read_text()


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    """Node 0's and node 1's ComfyUI models folders: the same tiny Wan and LoRA under diffusion_models/ and loras/."""
    from parallel_backend.testing.synthetic import write_wan_lora
    d = tmp_path_factory.mktemp("comfy_models")
    for k in (0, 1):
        (d / f"node{k}" / "diffusion_models").mkdir(parents=True)
        (d / f"node{k}" / "loras").mkdir()
    model = write_tiny_wan(str(d / "node0" / "diffusion_models" / "tiny.safetensors"), seed=1)
    write_wan_lora(str(d / "node0" / "loras" / "lora.safetensors"), model, fmt="comfy", rank=4, alpha=2.0, seed=21)
    for sub in ("diffusion_models/tiny.safetensors", "loras/lora.safetensors"):
        shutil.copy(d / "node0" / sub, d / "node1" / sub)
    return [str(d / "node0"), str(d / "node1")]


@pytest.mark.multirank
def test_the_pack_nodes_sample_across_two_nodes_like_native_comfyui(net, secrets_dir, comfy_models, tmp_path):
    """The user's graph: Parallel Config (nodes=2, auto degrees) -> Parallel Model Loader -> native KSampler, with
    Parallel LoRA and ComfyUI's own LoraLoaderModelOnly, in ComfyUI's process on node 0 = native ComfyUI."""
    port = 29524
    with _node1_serving(net, port, secrets_dir / "good", comfy_models[1], tmp_path):
        args = {"rendezvous": f"{net.addresses[0]}:{port}", "secret": str(secrets_dir / "good"),
                "models": comfy_models[0], "rejoin": 60}
        r, out = _drive(net, "nodes", args, tmp_path)
    plan = r["plan"]
    assert "cfg=2" in plan and "ulysses=2" in plan and "across nodes cfg=2" in plan, plan
    for what, diff in r["diffs"].items():
        assert diff <= 1e-4, (what, diff, r)
    assert r["lora_moves"] > 1e-2, r  # the LoRA changes the latent: the parity above is not trivial
    # cfg 1.0's one row: each call's fold is weighed on the measured links (auto degrees): the idle replica joins the
    # ring across the nodes, or stays idle where that is predicted faster; never the Ulysses all-to-all across nodes
    assert len(set(r["folds"])) == 1 and r["folds"][0] in ("2xring", "none"), r["folds"]
    # with a declared latent auto mode weighs the meshes on the measured links, the one between the nodes included
    auto = r["auto_plan"]
    assert "across nodes" in auto and "predicted" in auto and "on one rank" in auto, auto
    print("\npack nodes on 2 nodes x 2 ranks vs native ComfyUI: " +
          "; ".join(f"{k} {v:.2e}" for k, v in r["diffs"].items()) + f"\nparallel_plan: {plan}\nauto: {auto}")


@pytest.mark.multirank
def test_a_rank_of_node_1_dying_is_named_and_a_different_file_there_is_refused(net, secrets_dir, model_files,
                                                                               comfy_models, tmp_path):
    """Through the WorkerGroup: node 1's copy of the file differs (refused by name, the group stays up), the right
    one loads; then one rank of node 1 is killed mid-forward (its node process lives and says which)."""
    port = 29525
    # node 1's models folder: diffusion_models/tiny.safetensors = node 0's file, diffusion_models/other = another
    node1_dir = tmp_path / "node1_models"
    (node1_dir / "diffusion_models").mkdir(parents=True)
    shutil.copy(os.path.join(model_files["dirs"][0], "tiny.safetensors"), node1_dir / "diffusion_models")
    shutil.copy(model_files["other"], node1_dir / "diffusion_models" / "other.safetensors")
    with _node1_serving(net, port, secrets_dir / "good", str(node1_dir), tmp_path):
        r, _ = _drive(net, "rank_kill", _driver_args(net, port, secrets_dir, model_files), tmp_path)
    unnamed = r["unnamed_error"]
    assert unnamed and "no name relative to a ComfyUI models folder" in unnamed and r["unnamed_s"] < 30, r
    mismatch = r["mismatch_error"]
    assert mismatch and "ModelFileMismatch" in mismatch and "node 1: " in mismatch and "size" in mismatch, mismatch
    assert r["after_mismatch"]["batch2"] <= TOL, r
    err = r["error"]
    assert err and re.search(r"rank 3 on node 1 was killed by signal SIGKILL", err), err
    assert r["error_after_s"] < 10.0 and r["local_ranks_alive"] == [] and r["segments_left"] == [], r
    print(f"\nnode 1's different file: {mismatch.splitlines()[-1][:160]}\nrank 3 killed: named after "
          f"{r['error_after_s']:.2f} s: {err.split(' during')[0]}")


def test_node_command_finds_its_comfyui_and_models_folder(tmp_path, monkeypatch):
    """`python -m parallel_backend.runtime.node` run from ComfyUI/custom_nodes/<pack>: ComfyUI and its models folder
    are found without flags; elsewhere without COMFYUI_PATH it refuses, saying what to do. Node 0 is ComfyUI."""
    from parallel_backend.runtime import node
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    base = ["--rendezvous", "10.0.0.1:29500", "--node-rank", "1", "--nodes", "2", "--nproc-per-node", "1",
            "--secret-file", str(secret), "--device", "cpu"]
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    (tmp_path / "ComfyUI" / "comfy").mkdir(parents=True)
    spec = node.parse_args(base)
    assert spec.model_dir == str(tmp_path / "ComfyUI" / "models") and not spec.once
    assert node.parse_args(base + ["--model-dir", str(tmp_path / "m"), "--once"]).model_dir == str(tmp_path / "m")
    monkeypatch.delenv("COMFYUI_PATH")
    monkeypatch.setattr(node, "__file__", str(tmp_path / "elsewhere" / "parallel_backend" / "runtime" / "node.py"))
    with pytest.raises(SystemExit):
        node.parse_args(base)
    # installed as ComfyUI/custom_nodes/<pack>: found
    pack = tmp_path / "ComfyUI" / "custom_nodes" / "pack"
    monkeypatch.setattr(node, "__file__", str(pack / "parallel_backend" / "runtime" / "node.py"))
    assert node.parse_args(base).model_dir == str(tmp_path / "ComfyUI" / "models")
    with pytest.raises(SystemExit):  # node 0 is the ComfyUI process, not this command
        node.parse_args([*base[:2], "--node-rank", "0", *base[4:]])


@pytest.mark.multirank
@pytest.mark.e2e
def test_shipped_two_node_workflow_through_the_prompt_queue(net, secrets_dir, tmp_path):
    """workflows/wan21_t2v_two_nodes_parallel: a headless ComfyUI in namespace 0 (node 0) queues the shipped graph
    (pointed at this test's rendezvous and secret, a tiny Wan under the shipped file name), node 1 serves from its
    own models folder: the latent equals the same graph on ComfyUI's native loader."""
    name = "wan2.1_t2v_14B_bf16.safetensors"
    for k in (0, 1):
        (tmp_path / f"node{k}" / "diffusion_models").mkdir(parents=True)
    model = write_tiny_wan(str(tmp_path / "node0" / "diffusion_models" / name), seed=17)
    shutil.copy(model, tmp_path / "node1" / "diffusion_models" / name)
    port = 29526
    with _node1_serving(net, port, secrets_dir / "good", str(tmp_path / "node1"), tmp_path):
        args = {"rendezvous": f"{net.addresses[0]}:{port}", "secret": str(secrets_dir / "good"), "model": model}
        r, _ = _drive(net, "queue", args, tmp_path, timeout=400)
    assert r["ui_equals_api"] and r["shipped_config"] == {"nodes": 2, "ranks_per_node": 8, "world_size": 16}, r
    assert "across nodes cfg=2" in r["log"], r["log"]
    assert r["mean_abs"] > 0.05 and r["diff"] <= 1e-4, r
    assert r["server_segments_left"] == [], r["server_segments_left"]
    print(f"\nshipped two-node workflow through /prompt (2 x 2 CPU ranks in two namespaces) vs native: {r['diff']:.2e}")
