"""One rank's sharded model: build the host's class from a checkpoint, parallelize it (runtime/parallelize.py: the
transforms in their order), load its slices, check; then run its replica's rows, LoRAs merged and unmerged."""
from __future__ import annotations

import torch

from ..config import validate_for_model
from ..models import detect_family
from ..weights.reads import (compute_dtype, host_key_map, load_host_sharded, model_keys, param_stats, read_header,
                             weight_storage)
from .mesh import RankMesh
from .parallelize import compile_blocks, finish_after_load, parallelize


class ShardedModel:
    def __init__(self, mesh: RankMesh, path: str, precision: str | None = None):
        self.mesh, self.path = mesh, path
        self.precision = precision or mesh.config.dtype
        model = self._build()
        parts = parallelize(model, self.family, self.plan, mesh, self.header, self.prefix, path)
        self.pipeline, self.sharded_weights, self.gguf_stats = parts.pipeline, parts.sharded_weights, parts.gguf_stats
        self.seq_state, self.plan_hooks = parts.seq_state, parts.plan_hooks
        self.load_stats = self._load(model)
        finish_after_load(model, parts, path)
        self.model = model.eval().requires_grad_(False)
        self.loras: tuple = ()          # the merged LoRA list, as lora.lora_key gives it
        self.lora_touched: set = set()  # parameters the merge changed (restored from the file on change)
        self.lora_stats: dict = {}
        self.last_tokens, self.last_fold = 0, "none"  # what the last forward computed on this rank
        self.compile_spec = None  # torch.compile kwargs the blocks run under (None: eager)

    def _build(self) -> torch.nn.Module:
        """The host's own class for the file, on meta (its family, shape and plan set on self); checked against the
        mesh first."""
        self.header = header = read_header(self.path)
        self.family = fam = detect_family(header, self.path)
        self.shape = fam.model_shape(header)
        validate_for_model(self.mesh.config, self.shape)
        self.dtype = compute_dtype(self.precision)
        # the host's own class (ComfyUI imported in this rank, after its device was set): parameter names are the
        # checkpoint's keys; ComfyUI's ops hold fp8 / scaled fp8 layers as natively
        from ..models.host import import_host
        import_host(self.mesh.device.type)
        model, _, self.prefix = fam.build(header, self.dtype, self.path, storage=weight_storage(self.precision))
        if hasattr(fam, "check_mesh"):  # what the file's shapes do not say (LTX-2's audio heads, from its metadata)
            fam.check_mesh(model, self.mesh.config, self.path)
        # a model of ComfyUI's mixed-precision layers: they load their own (quantized) weights (models/host.py)
        self.host_quant = getattr(model, "host_quant", None)
        # (a family whose file names differ from the class's: its own map, from the host's renaming)
        self.key_map = getattr(fam, "key_map", host_key_map)(model, self.prefix)
        self.param_dtypes = {n: p.dtype for n, p in model.named_parameters()}  # as the host built them
        # the family's plan for the class the host built (a variant adds its own modules' entries)
        self.plan = fam.plan_for(model) if hasattr(fam, "plan_for") else fam.PLAN
        return model

    def set_loras(self, loras) -> dict:
        """Make the merged LoRAs exactly `loras` ([(path, ..., strength)], as lora.lora_key gives them):
        a no-op when unchanged; otherwise the touched parameters are re-read from the checkpoint and the
        new list is merged. On failure the base weights are restored and the error raised."""
        from ..weights.lora import merge_loras

        loras = tuple(tuple(x) for x in loras or ())
        if loras == self.loras:
            return {**self.lora_stats, "lora_changed": False}
        restore = lambda names: self._load(self.model, names)
        if self.lora_touched:
            restore(sorted(self.lora_touched))
        if self.gguf_stats:
            from ..weights.gguf_linear import clear_lora_factors
            clear_lora_factors(self.model)
        self.loras, self.lora_touched, self.lora_stats = (), set(), {}
        touched = set()
        try:
            aliases = self.family.diffusers_names(model_keys(self.header))
            # LoHa / LoKr / DoRA / ...: whole layers patched by ComfyUI's own code (models/host.py); a family may
            # bring its own
            from ..models.host import host_patch_weight, host_store_weight
            patch_weight = getattr(self.family, "patch_weight", host_patch_weight)
            stats = merge_loras(self.model, [(x[0], x[-1]) for x in loras], self.key_map, self.header, touched,
                                aliases=aliases, compute_dtype=self.dtype, patch_weight=patch_weight,
                                checkpoint=self.path, store_weight=getattr(self.family, "store_weight",
                                                                           host_store_weight),
                                quantized=self.host_quant)
        except BaseException:
            if touched:
                restore(sorted(touched))
            if self.gguf_stats:
                from ..weights.gguf_linear import clear_lora_factors
                clear_lora_factors(self.model)
            raise
        self.loras, self.lora_touched = loras, touched
        self.lora_stats = {**stats, "loras": [(x[0], x[-1]) for x in loras]}
        return {**self.lora_stats, "lora_changed": True}

    def _load(self, model, names=None) -> dict:
        """Read this rank's slices of the parameters (all, or `names`: a restore after a LoRA) from the checkpoint,
        in the dtypes the host built them with; the host's quantized layers then load themselves from theirs."""
        stats = load_host_sharded(model, self.path, self.prefix, self.mesh.device, header=self.header, names=names,
                                  dtypes=self.param_dtypes if names is not None else None, key_map=self.key_map)
        if self.host_quant is not None:
            self.host_quant.install(model, self.mesh.device, names)
            stats.update(param_stats(model))  # (a quantized layer holds its data and its scales)
        return stats

    def info(self) -> dict:
        if self.gguf_stats:
            from ..weights.gguf_linear import quantized_bytes_held
            self.gguf_stats["gguf_weight_bytes"] = quantized_bytes_held(self.model)
        return {**self.shape.to_info(), "path": self.path, "precision": self.precision,
                **self.load_stats, **param_stats(self.model), **self.gguf_stats, **self.lora_stats}

    def set_compile(self, spec: dict | None) -> None:
        """Compile (or uncompile) the transformer blocks, each on its own (regional compilation: one graph serves
        every block of the same shape, and the collectives between them stay outside). A no-op when unchanged."""
        spec = dict(spec) if spec else None
        if spec == self.compile_spec:
            return
        compile_blocks(self.model, self.family.BLOCKS, spec)
        self.compile_spec = spec

    def layout(self, batch: int):
        """How a call of `batch` rows runs on this mesh (runtime/mesh.py: replicas without a row fold into the
        sequence split, so no rank idles)."""
        return self.mesh.layout_for(batch, self.shape.num_heads, getattr(self, "call_fold", None))

    def rows(self, batch: int) -> slice:
        """The rows of a `batch`-row call that this rank's (possibly folded) replica computes."""
        return self.layout(batch).rows(batch)

    def is_leader(self, batch: int) -> bool:
        """Whether this rank writes its replica's output for a `batch`-row call."""
        return self.layout(batch).is_leader

    @torch.no_grad()
    def forward_rows(self, x, timestep, context, transformer_options=None, **extras) -> torch.Tensor | None:
        """Run this replica's rows of the batch; None when it owns none (only when the batch is empty)."""
        layout = self.layout(x.shape[0])
        rows = layout.rows(x.shape[0])
        self.last_tokens = 0
        self.last_fold = "none" if layout.fold == 1 else f"{layout.fold}x{layout.kind}"
        if rows.start == rows.stop:
            return None
        if rows != slice(0, x.shape[0]) and hasattr(self.family, "check_rows"):  # a model whose rows interact
            self.family.check_rows(type(self.model).__name__, timestep, extras, rows)
        self.seq_state.use(layout.groups, layout.sequence_index)
        dev, dt = self.mesh.device, self.dtype
        take = lambda t: None if t is None else t[rows].to(dev, dt if t.is_floating_point() else t.dtype)
        kw = {k: take(v) if torch.is_tensor(v) else [take(t) for t in v] if _tensor_list(v) else v
              for k, v in gather_lists(extras).items()}  # tensors (and lists of them) are batched like x
        # timesteps beside x (LTX-2's audio one) stay float32, as the host hands them
        kw.update({k: extras[k][rows].to(dev) for k in getattr(self.family, "FLOAT32_CONDS", ())
                   if torch.is_tensor(extras.get(k))})
        self.seq_state.begin_forward()
        if transformer_options:
            kw["transformer_options"] = self.options_for_call(transformer_options, rows, x.shape[0])
        args = (self.model, take(x), timestep[rows].to(dev, torch.float32), take(context))
        if self.sharded_weights is not None:  # through FSDP's root: each block gathered as it runs
            out = self.sharded_weights.run(self.family.forward, *args, **kw)
        elif self.pipeline is not None:
            out = self._pipelined(args, kw)
        else:
            out = self.family.forward(*args, **kw)
        # tokens this rank pushed through the blocks in this call (its share of the sequence, times its rows)
        self.last_tokens = (rows.stop - rows.start) * (self.seq_state.local_len or _tokens(x, self.shape.patch_size))
        return out.float()


    def options_for_call(self, options: dict, rows: slice, batch: int) -> dict:
        """The call's transformer_options as this replica's rows see them, each model patch wrapped to see the whole
        sequence where the host hands it a share (parallel/patch_points.py)."""
        from ..parallel.patch_points import ShareContext, options_for_rows, wrap_patches

        ctx = ShareContext(self.seq_state, self.mesh.groups.get("tp"), self.mesh.config.tp, self.mesh.coord["tp"])
        return wrap_patches(options_for_rows(options, rows, batch), getattr(self.family, "PATCH_POINTS", {}),
                            getattr(self.family, "BLOCK_REPLACE", {}), ctx, type(self.model).__name__)

    def _pipelined(self, args, kw) -> torch.Tensor:
        """Each row a micro-batch: stage s computes row k while stage s + 1 computes row k - 1 (the sends are
        asynchronous); the stage waits for its sends once all rows were issued. Rows a model couples (LTX-2's gates
        read the batch's largest timestep: the family's check_rows refuses a row alone) go as one micro-batch."""
        from ..parallel.patch_points import options_for_rows, refuse_between_blocks
        from ..parallel.pipeline import refuse_block_patches

        options = kw.pop("transformer_options", None)
        refuse_block_patches(options)
        refuse_between_blocks(options, getattr(self.family, "PATCH_POINTS", {}))
        model, x, t, ctx = args
        n, outs = x.shape[0], []
        step = n if self._rows_coupled(t, kw) else 1
        try:
            for k in range(0, n, step):
                self.seq_state.begin_forward()  # each micro-batch is a forward of its own
                row = lambda v: v[k:k + step] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                if options is not None:
                    kw["transformer_options"] = options_for_rows(options, slice(k, k + step), n)
                outs.append(self.family.forward(model, x[k:k + step], t[k:k + step], row(ctx),
                                                **{name: row(v) for name, v in kw.items()}))
        finally:
            self.pipeline.finish()
        return torch.cat(outs, dim=0)

    def _rows_coupled(self, timestep, kw) -> bool:
        """Whether a row alone would compute differently than in its batch (the family's check_rows refuses it)."""
        check = getattr(self.family, "check_rows", None)
        if check is None or timestep.shape[0] == 1:
            return False
        try:
            check(type(self.model).__name__, timestep, kw, slice(0, 1))
        except ValueError:
            return True
        return False


LIST_SEP = "#"  # a list-of-tensors input crosses as one tensor per item, named `<input>#<index>`


def gather_lists(extras: dict) -> dict:
    """`extras` with the items of each list-of-tensors input (`name#0`, `name#1`, ...) back in one list, in order."""
    out, lists = {}, {}
    for k, v in extras.items():
        name, sep, index = k.partition(LIST_SEP)
        if sep:
            lists.setdefault(name, {})[int(index)] = v
        else:
            out[k] = v
    out.update({name: [items[i] for i in sorted(items)] for name, items in lists.items()})
    return out


def _tensor_list(v) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(torch.is_tensor(t) for t in v)


def compiled_graphs() -> int:
    """How many graphs torch.compile has built in this process so far (a recompile adds one)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _tokens(x: torch.Tensor, patch) -> int:
    n = 1
    for s, p in zip(x.shape[2:], patch):
        n *= -(-s // p)
    return n
