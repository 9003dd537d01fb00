"""One rank between ops (parallel_backend/runtime/rank.py), in this process: the op handlers' replies, and the resident
models registry a load keeps (Wan 2.2 A14B's experts: resident = no read when switching back). The model is a stand-in
for ShardedModel (its build and forward are tested with real ranks in test_group.py and the parity tests); what is
checked here is which model each op builds, keeps, drops and uses."""
from __future__ import annotations

import torch

from parallel_backend.config import ParallelConfig
from parallel_backend.runtime import rank as rank_mod
from parallel_backend.runtime import sharded_model
from parallel_backend.runtime.rank import NO_REPLY, Rank, ResidentModels

CONFIG = ParallelConfig(world_size=1, device="cpu", dtype="fp32")


class Channel:
    """The owner's end of a rank's pipe: ops queued in, replies kept; EOF once the ops run out (the owner went)."""

    def __init__(self, *ops):
        self.ops, self.sent = list(ops), []

    def recv(self):
        if not self.ops:
            raise EOFError
        return self.ops.pop(0)

    def send(self, msg):
        self.sent.append(msg)


class FakeModel:
    """What a load asks of ShardedModel: its info, LoRA list and parameter bytes."""
    built: list = []

    def __init__(self, mesh, path, precision):
        self.path, self.loras, self.load_stats, self.compile_spec = path, (), {"param_bytes": 100}, None
        FakeModel.built.append(path)

    def set_loras(self, loras):
        changed, self.loras = tuple(loras) != self.loras, tuple(loras)
        return {"lora_changed": changed}

    def info(self):
        return {"path": self.path, "loras": self.loras}


def _rank(monkeypatch) -> Rank:
    monkeypatch.setattr(sharded_model, "ShardedModel", FakeModel)
    FakeModel.built = []
    return Rank(0, CONFIG, mesh=None, device=torch.device("cpu"))


def _load(rank: Rank, name: str, keep=(), loras=()) -> dict:
    return rank.load({"key": (name,), "path": name, "precision": "fp32", "keep": [(k,) for k in keep],
                      "loras": loras})


def test_resident_models_keep_only_and_use():
    models = ResidentModels()
    models.add("high", 1)
    models.add("low", 2)
    assert models.key == "low" and models.current == 2 and list(models) == ["high", "low"]
    assert models.use("high") == 1 and models.key == "high"
    assert models.keep_only({"low"}) == 1 and models.current is None and list(models) == ["low"]
    assert models.use("gone") is None and models.key is None and len(models) == 1
    models.drop("low")
    assert len(models) == 0 and models.current is None


def test_load_keeps_resident_models_and_switches_without_a_read(monkeypatch):
    rank = _rank(monkeypatch)
    assert _load(rank, "high")["reloaded"] is True
    assert _load(rank, "low", keep=["high"])["reloaded"] is True  # high stays resident
    back = _load(rank, "high", keep=["low"], loras=[("lora.safetensors", 1.0)])
    assert back["reloaded"] is False and back["lora_changed"] and back["loads"] == 2  # no read, LoRA merged
    assert FakeModel.built == ["high", "low"] and rank.stats()["models"] == 2
    assert rank.stats()["param_bytes_all"] == 200
    assert _load(rank, "other")["loads"] == 3  # not resident: the others go
    assert FakeModel.built[-1] == "other" and rank.stats()["models"] == 1 and list(rank.models) == [("other",)]


def test_serve_answers_each_op_and_reports_failures_as_replies(monkeypatch):
    rank = _rank(monkeypatch)
    channel = Channel(("bogus", None), ("forward", {"key": None, "inputs": {}, "out": None}), ("stats", None),
                      ("shutdown", None), ("stats", None))
    assert rank.serve(channel) is False  # shut down by the owner, not gone
    unknown, no_model, stats, bye = channel.sent
    assert unknown[:2] == ("error", 0) and "unknown op 'bogus'" in unknown[2]
    assert no_model[:2] == ("error", 0) and "no model loaded on this worker group" in no_model[2]
    assert stats[0] == "ok" and stats[1]["models"] == 0 and stats[1]["forwards"] == 0
    assert bye == ("ok", None) and channel.ops == [("stats", None)]  # nothing is served after a shutdown


def test_serve_leaves_when_the_owner_is_gone(monkeypatch):
    assert _rank(monkeypatch).serve(Channel(("stats", None))) is True


def test_a_remote_rank_answers_no_forward_that_went_well(monkeypatch):
    class RemoteIO:
        remote = True
    rank = _rank(monkeypatch)
    rank.io = RemoteIO()
    assert rank.remote and rank.answer(Channel(), "forward", {"key": None}) is None  # fails: no model
    monkeypatch.setattr(rank, "handlers", {"forward": lambda payload: NO_REPLY})
    channel = Channel()
    rank.answer(channel, "forward", {})
    assert channel.sent == []


def test_failure_text_keeps_a_refusal_short():
    from parallel_backend.parallel.patch_points import PatchRefused
    assert rank_mod.failure_text(PatchRefused("set ulysses to 1"), CONFIG) == "PatchRefused: set ulysses to 1"
