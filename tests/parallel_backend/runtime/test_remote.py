"""parallel_backend/runtime/remote.py without processes: signed control messages through a store, replies, the
liveness checks that name a lost node, and where a node finds its model files. The group across two network
namespaces is tested end to end in test_multinode.py."""
from __future__ import annotations

import pickle

import pytest
import torch.distributed as dist

import parallel_backend.runtime.remote as remote
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.multinode import ModelFileMismatch
from parallel_backend.runtime.remote import RemoteNodeLost, RemoteRanks, StoreChannel, load_paths, sign, verify

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only

SECRET = b"0123456789abcdef0123456789abcdef"
CONFIG = ParallelConfig(world_size=6, nodes=3, ranks_per_node=2, ulysses=2, ring=3, device="cpu", dtype="fp32",
                        rendezvous="10.0.0.1:29500", secret_file="/x")


def test_messages_are_signed_and_nothing_unsigned_is_unpickled():
    blob = sign(SECRET, "n1", "ctl", 3, -1, ("forward", {"a": 1}))
    assert verify(SECRET, "n1", "ctl", 3, -1, blob) == ("forward", {"a": 1})

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))
    forged = blob[:32] + pickle.dumps(Boom())  # a party on the network rewrites the message
    for bad, why in ((forged, "forged payload"), (sign(b"x" * 32, "n1", "ctl", 3, -1, "op"), "another secret"),
                     (blob, "replayed as #4"), (sign(SECRET, "n0", "ctl", 3, -1, "op"), "an old session")):
        seq = 4 if why.startswith("replayed") else 3
        with pytest.raises(PermissionError, match="not signed with the shared secret"):
            verify(SECRET, "n1", "ctl", seq, -1, bad)


def _pair():
    store = dist.HashStore()
    node0 = RemoteRanks(dist.PrefixStore("s", store), SECRET, "nonce", CONFIG)
    ranks = {r: StoreChannel(dist.PrefixStore("s", store), SECRET, "nonce", r) for r in node0.ranks}
    return store, node0, ranks


def test_ops_reach_remote_ranks_and_their_replies_come_back():
    _, node0, ranks = _pair()
    assert node0.ranks == [2, 3, 4, 5]
    for r, ch in ranks.items():  # the start reply is #0
        ch.send(("ok", {"rank": r}))
    got = dict(node0.replies(0, set(node0.ranks)))
    assert got == {r: ("ok", {"rank": r}) for r in (2, 3, 4, 5)}
    for n in (1, 2, 3):
        seq = node0.publish("stats", {"n": n})
        for r, ch in ranks.items():
            assert ch.recv() == ("stats", {"n": n})
            ch.send(("ok", r * 10 + n) if r != 4 or n != 3 else ("error", r, "boom"))
        assert sorted(node0.replies(seq, {2, 3, 4, 5})) == sorted(
            [(r, ("ok", r * 10 + n)) for r in (2, 3, 5)] + ([(4, ("ok", 40 + n))] if n != 3 else [(4, ("error", 4, "boom"))]))
    # a forward's remote ranks answer only when they fail: errors() sees exactly those
    seq = node0.publish("forward", {})
    for ch in ranks.values():
        ch.recv()
    ranks[5].send(("error", 5, "RuntimeError: x"))
    assert node0.errors(seq) == [(5, ("error", 5, "RuntimeError: x"))]


def test_a_forged_op_in_the_store_is_refused_by_the_remote_rank():
    store, node0, ranks = _pair()
    dist.PrefixStore("s", store).set("ctl/1", b"\0" * 32 + pickle.dumps(("shutdown", None)))
    with pytest.raises(PermissionError):
        ranks[2].recv()


def test_liveness_names_the_node_and_rank(monkeypatch):
    store, node0, _ = _pair()
    s = dist.PrefixStore("s", store)
    for node in (1, 2):
        s.add(f"hb/{node}", 1)
    node0.check_alive(force=True)
    s.set("dead/5", "was killed by signal SIGKILL")
    with pytest.raises(RemoteNodeLost, match=r"^rank 5 on node 2 was killed by signal SIGKILL$"):
        node0.check_alive(force=True)
    s.delete_key("dead/5")
    # node 2 keeps beating, node 1 stops: node 1 and its ranks are named once its beat is older than the limit
    monkeypatch.setattr(remote, "HEARTBEAT_STALE_S", 0.3)
    import time
    deadline = time.monotonic() + 5
    with pytest.raises(RemoteNodeLost) as info:
        while time.monotonic() < deadline:
            s.add("hb/2", 1)
            node0.check_alive(force=True)
            time.sleep(0.05)
    assert str(info.value).startswith("node 1 (ranks 2, 3) stopped answering: no heartbeat for"), info.value


def test_each_node_finds_its_own_copy_of_the_files(tmp_path):
    payload = {"path": "/srv/comfy/models/diffusion_models/wan.safetensors",
               "loras": [("/srv/comfy/models/loras/l.safetensors", 1, 2, 0.8)],
               "names": {"/srv/comfy/models/diffusion_models/wan.safetensors": "diffusion_models/wan.safetensors",
                         "/srv/comfy/models/loras/l.safetensors": "loras/l.safetensors"}}
    assert load_paths(payload, None, 0) == (payload["path"], payload["loras"])  # node 0: its own paths
    path, loras = load_paths(payload, str(tmp_path), 1)
    assert path == str(tmp_path / "diffusion_models" / "wan.safetensors")
    assert loras == [(str(tmp_path / "loras" / "l.safetensors"), 1, 2, 0.8)]
    with pytest.raises(ModelFileMismatch, match="without --model-dir"):
        load_paths(payload, None, 1)
    with pytest.raises(ModelFileMismatch, match="no name relative to a ComfyUI models folder"):
        load_paths({**payload, "names": {}}, str(tmp_path), 2)
