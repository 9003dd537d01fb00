"""One rank serving the owner's ops: a Rank answers each op (load, forward, stats) with a handler of its own over the
models it holds (ResidentModels, the same registry the owner's WorkerGroup keeps), until the owner shuts it down or
goes away. worker.py starts the process and builds the Rank; this module holds what it does between ops.
"""
from __future__ import annotations

import collections
import gc
import os
import time
import traceback

import torch

from .patch_transfer import PatchReceiver
from .progress import CallCancelled, RankProgress
from .transport import ShmReader

TOKEN_LOG = 4096  # per-forward token counts kept for the group's stats
NO_REPLY = object()  # what a handler returns when the op gets no answer (a remote rank's forward that went well)


class ResidentModels:
    """The models a worker group holds, by model key, and the one its calls use now. The owner keeps one (each
    entry: what the ranks reported, its LoRA list, whether it was loaded resident) and every rank one (each entry:
    its ShardedModel); the load and forward ops keep them in step. Loading a model drops the others unless they were
    loaded resident (Wan 2.2 A14B's two experts): 2 models = 2x weights per rank, no reads when switching."""

    def __init__(self):
        self.entries: dict = {}
        self.key = None  # the key calls use now (None: no model is current)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __iter__(self):
        return iter(self.entries)

    def get(self, key):
        return self.entries.get(key)

    def items(self):
        return self.entries.items()

    def values(self):
        return self.entries.values()

    @property
    def current(self):
        """The current model's entry, or None."""
        return self.entries.get(self.key) if self.key in self.entries else None

    def add(self, key, entry) -> None:
        """`entry` held under `key`, and current."""
        self.entries[key], self.key = entry, key

    def use(self, key):
        """Make the model under `key` current (None when it is not held: no model is current then)."""
        self.key = key if key in self.entries else None
        return self.current

    def keep_only(self, keys) -> int:
        """Drop every model whose key is not in `keys`; returns how many went."""
        dropped = [k for k in self.entries if k not in keys]
        for k in dropped:
            del self.entries[k]
        if self.key not in self.entries:
            self.key = None
        return len(dropped)

    def drop(self, key) -> None:
        self.entries.pop(key, None)
        if self.key == key:
            self.key = None


class Rank:
    """One rank's state between ops: the models it holds, the shared-memory reader, the model patches the group's
    calls carried, its block progress, and what its calls computed (for the owner's stats). `io` (NodeIO, several
    nodes) moves inputs and outputs between nodes; `files` (remote.FileCheck) resolves and checks a load's files on
    this node; `progress_ref` (a local rank) names the owner's control block (progress.py)."""

    def __init__(self, rank: int, config, mesh, device, io=None, files=None, progress_ref=None):
        self.rank, self.config, self.mesh, self.device, self.io, self.files = rank, config, mesh, device, io, files
        self.reader = ShmReader()
        self.patch_objects = PatchReceiver(device)  # the model patches this group's calls carried, kept by sender id
        self.progress = None if progress_ref is None else RankProgress(self.reader.view(progress_ref).numpy(), rank,
                                                                       config.local_ranks)
        self.models = ResidentModels()
        self.loads = self.forwards = 0
        self.token_log = collections.deque(maxlen=TOKEN_LOG)
        self.fold_log = collections.deque(maxlen=TOKEN_LOG)   # "none", or e.g. "2xulysses": how each call was spread
        self.graph_log = collections.deque(maxlen=TOKEN_LOG)  # graphs torch.compile has built here, after each call
        self.handlers = {"load": self.load, "forward": self.forward, "stats": self.stats}
        self.vaes: dict = {}  # VAE key -> the host's own VAE (models/vae.py), whole on every rank
        self.handlers.update(vae_load=self.vae_load, vae_tiles=self.vae_tiles)
        self.handlers["time_block"] = self.time_block

    @property
    def remote(self) -> bool:
        """A rank of another node than the owner's (it gets its ops through node 0's store)."""
        return self.io is not None and self.io.remote

    # ---- the control channel ------------------------------------------------------------------------------------
    def serve(self, conn) -> bool:
        """Ops from `conn` (a local rank's pipe, or a remote rank's StoreChannel) until shutdown. Returns True when
        the owner went away (its end of the channel closed)."""
        while True:
            try:
                op, payload = conn.recv()
            except (EOFError, OSError):
                owner_gone = True  # the owner died (or is tearing the group down): leave
                break
            if self.answer(conn, op, payload) == "shutdown":
                owner_gone = False
                break
        self.close()
        return owner_gone

    def answer(self, conn, op: str, payload):
        """Run op's handler and send its reply; a failure is the reply instead (the rank serves on)."""
        try:
            if op == "shutdown":
                conn.send(("ok", None))
                return op
            handler = self.handlers.get(op)
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            reply = handler(payload)
            if reply is not NO_REPLY:
                conn.send(("ok", reply))
        except CallCancelled as e:  # every local rank stopped this call at the same block: the group stays usable
            conn.send(("cancelled", self.rank, str(e)))
        except KeyboardInterrupt as e:
            if self.remote:
                # torch's spawn sends a remote rank SIGINT when its node process dies: the node is going, and its
                # heartbeat (not this rank's echo) tells node 0 so
                raise
            conn.send(("error", self.rank, failure_text(e, self.config)))
        except BaseException as e:
            conn.send(("error", self.rank, failure_text(e, self.config)))
        return None

    def close(self) -> None:
        import torch.distributed as dist
        self.reader.close()
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass

    # ---- load -------------------------------------------------------------------------------------------------
    def load(self, payload: dict) -> dict:
        """A new file or precision (payload "key") rebuilds the model in this process after the weights the owner
        does not keep (payload "keep": the other models loaded resident) are dropped; a model this rank holds
        becomes current without a read, and only its merged LoRA list changes."""
        key = payload.get("key")
        if self.models.keep_only(set(payload.get("keep", ())) | {key}):
            _release_memory(self.device)
        model = self.models.use(key) if key is not None else None
        reloaded = model is None
        if reloaded:
            model, loras = self._build(payload, key)
        else:
            _, loras = self._load_paths(payload)
        lora_info = model.set_loras(loras)
        if lora_info.get("lora_changed"):
            _release_memory(self.device)
        return {**model.info(), **model.load_mem, **lora_info, "reloaded": reloaded, "loads": self.loads,
                "rss": _rss_bytes(), "peak_rss": _peak_rss_bytes(), "memory": device_memory(self.device)}

    def _load_paths(self, payload: dict) -> tuple:
        """This node's model file and LoRA list for a load (checked against node 0's when the group spans nodes)."""
        return self.files(payload) if self.files else (payload["path"], payload.get("loras") or ())

    def _build(self, payload: dict, key) -> tuple:
        """The model of a load built from its file and made current (each block start reported as this rank's
        progress), and its LoRA list: (model, loras)."""
        from .sharded_model import ShardedModel
        self.models.drop(key)
        _release_memory(self.device)
        _reset_peak_rss()
        rss_before = _rss_bytes()
        path, loras = self._load_paths(payload)
        model = ShardedModel(self.mesh, path, payload["precision"])
        if self.progress is not None:  # each block start is this rank's progress, and where Cancel can stop
            self.progress.watch(getattr(model.model, model.family.BLOCKS))
        model.load_mem = {"load_rss_before": rss_before, "load_peak_rss": _peak_rss_bytes()}
        self.models.add(key, model)
        self.loads += 1
        return model, loras

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, payload: dict):
        """One model evaluation of this rank's share: inputs viewed in the owner's shared memory (or received from
        node 0), the replica leader's rows written back. A remote rank answers only when it fails: rank 0 completes
        after every remote rank took part in the output exchange."""
        model = self._model_for(payload.get("key"))
        fault = payload.get("fault")
        if fault and fault.get("rank") == self.rank:
            _inject_fault(fault)
        inputs = self.io.inputs(payload["inputs"], self.reader) if self.io else \
            {k: self.reader.view(r) for k, r in payload["inputs"].items()}
        x, t, ctx = inputs.pop("x"), inputs.pop("timestep"), inputs.pop("context")
        extras = inputs
        extras.update(payload.get("values") or {})  # keyword inputs that are not tensors
        batch = x.shape[0]
        model.call_fold = payload.get("fold")  # the owner's per-call choice (planner.choose_fold); None: fold_for's
        model.set_compile(payload.get("compile"))
        options = self.patch_objects.decode(payload.get("options"))  # transformer_options: model patches, ...
        if self.progress is not None:
            self.progress.begin_call(payload.get("call", 0))
        try:
            out = model.forward_rows(x, t, ctx, transformer_options=options, **extras)
        finally:
            del x, t, ctx, extras, options
            if self.progress is not None:
                self.progress.end_call()
        self._log_call(model)
        self._write_output(model, out, batch, payload["out"])
        del out
        return NO_REPLY if self.remote else None

    def _model_for(self, key):
        """The model a call names (switching between resident models: no copy, no load); the current one for None."""
        if key is not None and key in self.models:
            return self.models.use(key)
        model = self.models.current
        if model is None or key is not None:
            raise RuntimeError("no model loaded on this worker group" if model is None else
                               f"{key[0]} is not loaded on this worker group")
        return model

    def _log_call(self, model) -> None:
        from .sharded_model import compiled_graphs
        self.token_log.append(model.last_tokens)
        self.fold_log.append(model.last_fold)
        self.graph_log.append(compiled_graphs())
        self.forwards += 1

    def _write_output(self, model, out, batch: int, out_ref) -> None:
        """The replica leader's rows into the owner's output segment (through node 0 when the group spans nodes)."""
        writes = out is not None and model.is_leader(batch)
        if writes and not self.remote:
            self.reader.view(out_ref)[model.rows(batch)].copy_(out.to("cpu"))
        if self.io:
            self.io.outputs(out, model.rows(batch) if writes else None, out_ref, self.reader)

    def time_block(self, payload: dict) -> dict:
        """A synthetic block of the payload's width at its tokens, per sequence share (link_probe.time_block)."""
        from .link_probe import time_block
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(self.config.dtype, torch.bfloat16)
        return time_block(self.device, dtype, payload["dim"], payload["heads"], payload["ffn"], payload["tokens"],
                          payload["context"], payload["shares"])

    # ---- VAE -----------------------------------------------------------------------------------------------------
    def vae_load(self, payload: dict) -> dict:
        """ComfyUI's own VAE for a file, whole on this rank (kept beside the DiT; a VAE is small)."""
        from ..models.host import import_host
        import_host(self.device.type)
        from ..models.vae import build_host_vae, class_path
        key = payload["key"]
        if key not in self.vaes:
            self.vaes[key] = build_host_vae(payload["path"], payload["precision"], self.device)
        vae = self.vaes[key]
        return {"class": class_path(vae.first_stage_model), "dtype": str(vae.vae_dtype),
                "param_bytes": sum(p.numel() * p.element_size() for p in vae.first_stage_model.parameters())}

    def vae_tiles(self, payload: dict) -> None:
        """This rank's tiles of a tiled decode / encode (models/vae.py), the ranks' sums reduced onto rank 0, which
        writes the result into the owner's output segment. Each tile (computed here or not) is a progress step and a
        point where Cancel can stop the call."""
        import torch.distributed as dist

        from ..models.vae import decode_share, encode_share
        vae = self.vaes.get(payload["key"])
        if vae is None:
            raise RuntimeError(f"{payload['key'][0]} is not loaded on this worker group as a VAE")
        x = self.reader.view(payload["inputs"]["x"])
        share = encode_share if payload["encode"] else decode_share
        on_tile = None
        if self.progress is not None:
            self.progress.begin_call(payload["call"])
            on_tile = self.progress.block_started
        try:
            out = share(vae, x, payload["tiles"], self.rank, self.config.world_size, on_tile=on_tile)
        finally:
            del x
            if self.progress is not None:
                self.progress.end_call()
        out = out.to(torch.float32).contiguous()
        if self.config.world_size > 1:
            dist.reduce(out, dst=0)
        if self.rank == 0:
            self.reader.view(payload["out"]).copy_(out.to("cpu"))
        return None

    # ---- stats --------------------------------------------------------------------------------------------------
    def stats(self, payload=None) -> dict:
        """This rank's memory, loads and per-forward logs, and the models it holds."""
        cuda = {}
        if self.device.type == "cuda":  # the allocator's peak since the last stats (what a call's activations took)
            cuda = {"cuda_allocated": torch.cuda.memory_allocated(self.device),
                    "cuda_peak": torch.cuda.max_memory_allocated(self.device)}
            torch.cuda.reset_peak_memory_stats(self.device)
        model = self.models.current
        return {"rank": self.rank, "pid": os.getpid(), "rss": _rss_bytes(), "loads": self.loads, **cuda,
                "peak_rss": _peak_rss_bytes(), "forwards": self.forwards,
                # tokens this rank computed per forward (last TOKEN_LOG of them): 0 = it idled
                "tokens_per_forward": list(self.token_log), "fold_per_forward": list(self.fold_log),
                "compiled_graphs_per_forward": list(self.graph_log),
                "compile": None if model is None else model.compile_spec,
                "param_bytes": 0 if model is None else model.load_stats["param_bytes"],
                "models": len(self.models),
                "param_bytes_all": sum(m.load_stats["param_bytes"] for m in self.models.values()),
                **({} if model is None else model.info())}


def failure_text(e: BaseException, config) -> str:
    """What the owner reports of a rank's failure: a refusal's own words, else the traceback (with a hint when the
    rank ran out of memory)."""
    from ..parallel.patch_points import PatchRefused
    if isinstance(e, PatchRefused):  # a refusal says what to change; its traceback says nothing more
        return f"{type(e).__name__}: {e}"
    text = "".join(traceback.format_exception(e))
    msg = str(e).lower()
    if "out of memory" in msg:
        text += (f"\nHint: rank ran out of memory with {config.describe()}; raise tp (splits the weights) or "
                 f"ulysses/ring (splits the activations), or lower the resolution / frame count.")
    return text


def _inject_fault(fault: dict) -> None:
    """Test hook: simulate a failing rank (only reachable through the group's test API)."""
    kind = fault.get("kind")
    if kind == "raise":
        raise RuntimeError(fault.get("message", "injected fault"))
    if kind == "exit":
        os._exit(fault.get("code", 17))
    if kind == "sleep":
        time.sleep(fault.get("seconds", 1.0))


# ---- this process's memory ---------------------------------------------------------------------------------------

def device_memory(device) -> dict:
    """What this rank's device has, when the group starts: a GPU's free and total bytes (cudaMemGetInfo: what every
    process on it, ComfyUI's included, leaves), or the host's available memory for a CPU rank (shared by all)."""
    if device.type == "cuda":  # (what torch's allocator holds unused is free to this rank too)
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return {"device": f"cuda:{device.index}", "free": int(free), "total": int(total), "shared": False}
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return {"device": "cpu", "free": info.get("MemAvailable", 0), "total": info.get("MemTotal", 0), "shared": True}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    """VmHWM of this process (ru_maxrss would start at the spawning parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _release_memory(device) -> None:
    """Give the memory of dropped weights back: collect, empty the CUDA cache, trim the C heap (freed
    small blocks would otherwise stay in this process's resident set)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
