"""A call's transformer_options (model patches, their per-call values) from the ComfyUI process to the ranks.

ComfyUI's model patches are objects a node made (often local functions, hence cloudpickle), and some hold a model
of their own (InfiniteTalk's audio projection, a Uni3C ControlNet: hundreds of MB). The same objects come with
every call of a sampling run. So each patch object crosses once: the sender pickles the options with every patch
object replaced by a reference (its id in the ComfyUI process, kept while the object lives there), sends the
objects the ranks do not hold yet with the call, and tells them which ones died. A rank keeps the objects it was
sent, with any model they hold on its own device, so state a patch keeps across calls stays as natively.

Tensors cross on the CPU (the ComfyUI process's device means nothing in a rank; a patch moves what it reads to
the activations' device, as natively).
"""
from __future__ import annotations

import contextlib
import io
import pickle
import sys
import weakref

import torch

from ..parallel.patch_points import describe

PATCH_LISTS = ("patches",)           # transformer_options keys holding {point: [patch, ...]}
REPLACE_MAPS = ("patches_replace",)  # ... and {group: {key: replacement}}


def patch_objects(options: dict) -> list:
    """The patch objects of a call's options (each entry of a patch list, each block replacement)."""
    found = []
    for key in PATCH_LISTS:
        for plist in (options.get(key) or {}).values():
            found += list(plist or ())
    for key in REPLACE_MAPS:
        for entries in (options.get(key) or {}).values():
            found += list((entries or {}).values())
    return found


class _CPUTensors:
    """Pickler mix-in: tensors are pickled as CPU copies."""

    def reducer_override(self, obj):
        if torch.is_tensor(obj) and obj.device.type != "cpu":
            return _cpu_tensor, (obj.detach().cpu(),)
        return super().reducer_override(obj)


def _cpu_tensor(t):
    return t


def _pickler(buffer, refs: dict | None = None):
    """A cloudpickle Pickler that sends tensors as CPU copies and (with `refs`: id -> ref) replaces those objects by
    references."""
    import cloudpickle

    class Pickler(_CPUTensors, cloudpickle.CloudPickler):
        def persistent_id(self, obj):
            return ("pdit_patch", id(obj)) if refs and id(obj) in refs and refs[id(obj)] is obj else None

    return Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)


def dumps(obj, refs: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    with _path_modules_by_value():
        _pickler(buffer, refs).dump(obj)
    return buffer.getvalue()


@contextlib.contextmanager
def _path_modules_by_value():
    """ComfyUI imports its comfy_extras and every custom node pack under a file path as module name: a class or
    function from such a module cannot be imported by that name in a rank, so cloudpickle sends it by value while
    this pickle is made (and only then)."""
    import cloudpickle

    names = [n for n, m in list(sys.modules.items()) if m is not None and ("/" in n or "\\" in n)]
    added = [n for n in names if not _by_value(cloudpickle, n)]
    for n in added:
        cloudpickle.register_pickle_by_value(sys.modules[n])
    try:
        yield
    finally:
        for n in added:
            if n in sys.modules:
                cloudpickle.unregister_pickle_by_value(sys.modules[n])


def _by_value(cloudpickle, name: str) -> bool:
    return name in getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())


class PatchTransferError(ValueError):
    """A call's options cannot reach the ranks; the message names what and what to change."""


class PatchSender:
    """The ComfyUI process's side: which patch objects the ranks of one group hold."""

    def __init__(self):
        self.sent: dict = {}  # id -> weakref of each object the ranks hold

    def encode(self, options: dict) -> dict:
        """{"options": bytes, "define": {id: bytes}, "drop": [id]} for one call. Raises what pickling raises, for
        the caller to name."""
        drop = [pid for pid, ref in self.sent.items() if ref() is None]
        for pid in drop:
            del self.sent[pid]
        refs, define = {}, {}
        for obj in patch_objects(options):
            pid = id(obj)
            if pid in refs:
                continue
            held = self.sent.get(pid)
            if held is not None and held() is obj:
                refs[pid] = obj
                continue
            try:
                ref = weakref.ref(obj)
            except TypeError:  # cannot be tracked: it crosses inline, with every call
                continue
            define[pid] = _dumps_named(obj, f"the model patch {describe(obj)}")
            self.sent[pid], refs[pid] = ref, obj
        message = {"options": _dumps_named(options, "this call's transformer_options", refs), "define": define,
                   "drop": drop}
        return message

    def forget(self) -> None:
        """The ranks were replaced (a new group): they hold nothing."""
        self.sent.clear()


def _dumps_named(obj, what: str, refs: dict | None = None) -> bytes:
    try:
        return dumps(obj, refs)
    except Exception as e:  # noqa: BLE001 (any pickling failure means the same thing here)
        raise PatchTransferError(f"{what} cannot be sent to the worker ranks ({type(e).__name__}: {e}); remove the "
                                 f"node that adds it, or sample with the native model") from None


class PatchReceiver:
    """A rank's side: the patch objects it was sent, with their models on this rank's device."""

    def __init__(self, device):
        self.device, self.objects = device, {}

    def decode(self, message: dict | None) -> dict | None:
        if message is None:
            return None
        import cloudpickle  # noqa: F401  (what pickled the payloads; plain pickle loads them)

        for pid in message.get("drop", ()):
            self.objects.pop(pid, None)
        for pid, blob in (message.get("define") or {}).items():
            self.objects[pid] = self._placed(pickle.loads(blob))
        objects = self.objects

        class Unpickler(pickle.Unpickler):
            def persistent_load(self, ref):
                return objects[ref[1]]

        return Unpickler(io.BytesIO(message["options"])).load()

    def _placed(self, obj):
        """A patch that holds models (ComfyUI's `models()`: ModelPatchers it needs loaded, as natively before
        sampling) gets them on this rank's device."""
        models = getattr(obj, "models", None)
        if callable(models):
            for patcher in models() or ():
                module = getattr(patcher, "model", None)
                if isinstance(module, torch.nn.Module):
                    module.to(self.device)
        return obj
