"""LoRA: read LoRA safetensors in the usual formats and merge them into each rank's weight shard.

Formats (module name + suffix), all mapped onto the model's parameter names (ComfyUI's module paths, which are
the checkpoint's keys without its prefix); diffusers / PEFT names match through the family's `diffusers_names`:
  - diffusers / PEFT:  `transformer.blocks.0.attn1.to_q.lora_A.weight` / `.lora_B.weight`
    (also `base_model.model.` or no prefix; `.lora.down/.up`, `.lora_A.default`)
  - kohya:             `lora_unet_blocks_0_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha`
    (original names or diffusers names with dots as underscores; `lora_transformer_`, `lycoris_`;
    Wan-Fun's `lora_unet__`)
  - ComfyUI's Wan keys: `diffusion_model.blocks.0.self_attn.q.lora_A.weight` (or `lora_down` / `lora_up`),
    `.alpha`, and full-weight `.diff` / bias `.diff_b` deltas (`.w_norm` / `.b_norm` likewise).
  - LyCORIS-style adapters (LoHa `hada_*`, LoKr `lokr_*`, DoRA `dora_scale`, OFT / BOFT, GLoRA, LoCon's
    `lora_mid`, `set_weight`): only on a family whose ranks run ComfyUI's own class (it passes `patch_weight`);
    refused elsewhere.

Plain LoRA merge: W += strength * (alpha / rank) * up @ down, computed in fp32 on this rank's SHARD only: a
column-parallel weight takes its rows of `up`, a row-parallel one its columns of `down`; each is read
with get_slice. ComfyUI's arithmetic is followed (alpha absent -> scale 1). A parameter held in fp8 is merged whole
and rounded back to fp8 as ComfyUI's ModelPatcher does (the family's `store_weight`), so it equals the native
patched model bit for bit; without `store_weight` it is dequantized, merged and held in the compute precision.
Full-layer merge (a parameter any adapter targets: LoHa / LoKr give a full-size delta, DoRA normalises over the
whole weight): that one layer's full base weight is read from the checkpoint (dequantized as ComfyUI does), the
family's `patch_weight` applies every LoRA's patch on it with ComfyUI's own code (comfy.lora.load_lora +
calculate_weight), and this rank's slice is kept. One layer at a time.
Unmerge = re-read the touched parameters' base slices from the checkpoint (reads.load_host_sharded with `names`).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..parallel.plan import shard_chunks_of, shard_dim_of
from ..parallel.sharded_weights import is_sharded, local_tensor
from .checkpoint import CheckpointError, strip_prefix
from .fp8 import FP8_DTYPES
from .reads import file_bytes, held_dtype, open_slices, read_header, shard_of, slice_for


class LoraError(ValueError):
    pass


# (up suffix, down suffix); "up" is (out, rank), "down" is (rank, in)
PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
# (ComfyUI's load_lora reads `.w_norm` / `.b_norm` exactly as `.diff` / `.diff_b`)
SINGLE_SUFFIXES = {".alpha": "alpha", ".diff_b": "diff_b", ".diff": "diff", ".b_norm": "diff_b", ".w_norm": "diff"}
# adapters ComfyUI's weight_adapter implements (and its `set` patch): merged whole-layer by the family's
# `patch_weight` (ComfyUI's own code in the rank); a family without one refuses them
ADAPTER_SUFFIXES = {
    **{f".hada_{n}": "LoHa" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{n}": "LoKr" for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
    ".dora_scale": "DoRA", ".oft_blocks": "OFT / BOFT", ".rescale": "OFT / BOFT",
    **{f".{n}.weight": "GLoRA" for n in ("a1", "a2", "b1", "b2")},
    ".lora_mid.weight": "LoCon (tucker)", ".set_weight": "set_weight",
}
# what a sharded model cannot take at all: refused, never silently skipped
REFUSED_SUFFIXES = {".reshape_weight": "reshaped LoRA (it changes the layer's shape)", ".oft_diag": "OFT (oft_diag)"}


def alias_table(key_map: dict, aliases: dict | None = None) -> dict:
    """LoRA module name (any supported spelling) -> the model's parameter stem.

    A stem is the parameter name without `.weight` for weights, the full name otherwise. `aliases` ({other name:
    checkpoint key}, e.g. diffusers' names for a model built from the host's class) adds the spellings of LoRAs
    saved under those names.
    """
    table, ambiguous = {}, set()
    for dname, ckey in key_map.items():
        ckey = strip_prefix(ckey)
        if dname.endswith(".weight"):
            ds, cs = dname[:-len(".weight")], (ckey[:-len(".weight")] if ckey.endswith(".weight") else ckey)
        elif dname.endswith(".bias"):
            continue  # biases are addressed as `<module>.diff_b`
        else:
            ds, cs = dname, ckey
        dus, cus = ds.replace(".", "_"), cs.replace(".", "_")
        # ds is the host module path, which ComfyUI's own LoRA keys spell as `diffusion_model.<path>` (the file's
        # keys may carry another prefix: Cosmos' `net.`)
        for alias in (ds, "transformer." + ds, "base_model.model." + ds, "unet." + ds, "diffusion_model." + ds,
                      "model.diffusion_model." + ds, cs, "diffusion_model." + cs, "model.diffusion_model." + cs, "transformer." + cs,
                      "lora_unet_" + cus, "lora_unet_" + dus, "lora_transformer_" + dus, "lora_transformer_" + cus,
                      "lycoris_" + cus, "lycoris_" + dus):
            if table.get(alias, ds) != ds:
                ambiguous.add(alias)
            table[alias] = ds
    for alias in ambiguous:
        del table[alias]
    if aliases:
        by_key = {strip_prefix(v): k for k, v in key_map.items()}
        for other, ckey in aliases.items():
            mine = by_key.get(strip_prefix(ckey))
            if mine is None or not other.endswith(".weight") or not mine.endswith(".weight"):
                continue
            os_, ms = other[:-len(".weight")], mine[:-len(".weight")]
            for alias in (os_, "transformer." + os_, "base_model.model." + os_, "unet." + os_,
                          "lora_transformer_" + os_.replace(".", "_"), "lora_unet_" + os_.replace(".", "_")):
                table.setdefault(alias, ms)
    return table


@dataclass
class LoraTarget:
    param: str          # the model's parameter name
    kind: str           # "lora" (up @ down), "diff" (full delta) or "adapter" (whole layer, by patch_weight)
    up: str | None = None
    down: str | None = None
    alpha: float | None = None
    rank: int = 0
    diff: str | None = None
    shapes: tuple = ()  # full shapes of (up, down) or (diff,)
    module: str = ""    # the LoRA module (normalised name) and its weight's tensors as ((file key, name under
    keys: tuple = ()    # `module`), ...): what ComfyUI's load_lora reads when the layer is merged whole
    adapter: str = ""   # the adapter type(s), for messages


def _normalise(key: str) -> str:
    if key.startswith("lora_unet__"):  # Wan-Fun LoRAs (ComfyUI's convert_lora_wan_fun)
        key = "lora_unet_" + key[len("lora_unet__"):]
    return key


def _split_key(key: str):
    """(module, role) for a LoRA tensor key; role in up/down/alpha/diff/diff_b, adapter:<kind> or refused:<kind>."""
    for up, down in PAIR_SUFFIXES:
        if key.endswith(up):
            return key[:-len(up)], "up"
        if key.endswith(down):
            return key[:-len(down)], "down"
    for suffix, role in SINGLE_SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    for suffix, kind in ADAPTER_SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], "adapter:" + kind
    for suffix, kind in REFUSED_SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], "refused:" + kind
    return None, None


def looks_like_lora(header: dict) -> bool:
    return any((r or "").startswith(("up", "down", "diff", "adapter:")) for r in (_split_key(k)[1] for k in header))


def plan_lora(path: str, lora_header: dict, key_map: dict, model_header: dict, alpha_values: dict | None = None,
              aliases: dict | None = None, adapters: bool = False):
    """Map a LoRA file onto the model from headers alone: (targets, unmatched LoRA keys).

    `alpha_values`: {key: float} for the file's `.alpha` scalars (read by the caller; headers hold no values).
    `adapters`: whether LoHa / LoKr / DoRA / ... modules may be planned (as whole-layer "adapter" targets); the
    caller must then merge them with ComfyUI's code (merge_loras' `patch_weight`).
    Raises LoraError (naming the file) for adapter types this model cannot take, shape mismatches, or a LoRA
    none of whose modules belong to this model.
    """
    table = alias_table(key_map, aliases)
    modules, module_keys, module_adapters, unknown = _keys_by_module(path, lora_header, adapters)
    targets, unmatched = [], list(unknown)
    for module, roles in modules.items():
        stem = table.get(module)
        if stem is None:
            unmatched.extend(k for k, _ in module_keys[module])
            if "diff_b" in roles:
                unmatched.append(roles["diff_b"])
            continue
        weight = stem + ".weight" if stem + ".weight" in key_map else stem
        keys = tuple(module_keys[module])
        if module in module_adapters:  # the whole layer, by ComfyUI's code (which checks the shapes)
            kinds = sorted(module_adapters[module])
            if kinds == ["DoRA"] and not ({"up", "down"} <= set(roles)):
                raise LoraError(f"{path}: module '{module}' has a DoRA scale but not both LoRA matrices; the file "
                                f"is incomplete")
            targets.append(LoraTarget(weight, "adapter", module=module, keys=keys, adapter=" + ".join(kinds),
                                      shapes=(tuple(model_header[key_map[weight]][0]),)))
        elif "up" in roles or "down" in roles:
            targets.append(_lora_target(path, module, roles, keys, weight, lora_header, model_header[key_map[weight]]
                                        if "up" in roles and "down" in roles else None, alpha_values))
        if "diff" in roles and module not in module_adapters:
            full = model_header[key_map[weight]][0]
            if tuple(lora_header[roles["diff"]][0]) != tuple(full):
                raise LoraError(f"{path}: '{roles['diff']}' has shape {tuple(lora_header[roles['diff']][0])}, the "
                                f"model's {weight} has {tuple(full)}")
            targets.append(LoraTarget(weight, "diff", diff=roles["diff"], shapes=(tuple(full),), module=module,
                                      keys=keys))
        if "diff_b" in roles:
            bias = stem + ".bias"
            if bias not in key_map:
                unmatched.append(roles["diff_b"])
                continue
            full = model_header[key_map[bias]][0]
            if tuple(lora_header[roles["diff_b"]][0]) != tuple(full):
                raise LoraError(f"{path}: '{roles['diff_b']}' has shape {tuple(lora_header[roles['diff_b']][0])}, the "
                                f"model's {bias} has {tuple(full)}")
            # (merged whole, e.g. an fp8 bias, ComfyUI reads it as `<module>.diff_b`)
            targets.append(LoraTarget(bias, "diff", diff=roles["diff_b"], shapes=(tuple(full),), module=module,
                                      keys=((roles["diff_b"], module + ".diff_b"),)))
    if not targets:
        sample = ", ".join(sorted(lora_header)[:3])
        raise LoraError(f"{path}: none of this LoRA's {len(lora_header)} tensors belong to the loaded model (keys "
                        f"like {sample}); is it a LoRA for another model family, or for the text encoder?")
    return targets, unmatched


def _keys_by_module(path: str, lora_header: dict, adapters: bool):
    """The file's keys grouped by (normalised) module: (module -> {role: key}, module -> [(file key, name under the
    normalised module)] (biases aside), module -> adapter kinds, keys of no module). Refused types raise here."""
    modules, module_keys, module_adapters, unknown = defaultdict(dict), defaultdict(list), defaultdict(set), []
    for key in lora_header:
        module, role = _split_key(key)
        if module is None:
            unknown.append(key)
            continue
        kind = role.split(":", 1)[1] if ":" in role else ""
        if role.startswith("refused:"):
            raise LoraError(f"{path}: '{key}' is a {kind}, which the parallel loader cannot merge into a sharded "
                            f"model; sample with the native model (UNETLoader) for this LoRA")
        if role.startswith("adapter:") and not adapters:
            raise LoraError(f"{path}: '{key}' is a {kind} adapter, which the parallel loader merges only on model "
                            f"families whose ranks run ComfyUI's own model class (which patches the layer whole); "
                            f"without it only plain LoRA (up/down, alpha, diff) files merge: convert it to a plain "
                            f"LoRA, or sample with the native model")
        name = _normalise(module)
        if role.startswith("adapter:"):
            module_adapters[name].add(kind)
            modules[name].setdefault("adapter", key)
        else:
            modules[name][role] = key
        if role != "diff_b":
            module_keys[name].append((key, name + key[len(module):]))
    return modules, module_keys, module_adapters, unknown


def _lora_target(path, module, roles, keys, weight, lora_header, weight_entry, alpha_values) -> LoraTarget:
    """A plain LoRA's target (up / down, alpha): both matrices there, and of shapes that fit `weight` (its header
    entry `weight_entry`)."""
    if "up" not in roles or "down" not in roles:
        raise LoraError(f"{path}: module '{module}' has only one of the two LoRA matrices "
                        f"({', '.join(sorted(roles.values()))}); the file is incomplete")
    up_shape, down_shape = lora_header[roles["up"]][0], lora_header[roles["down"]][0]
    full = weight_entry[0]
    rank = down_shape[0]
    if (len(up_shape) < 2 or up_shape[1] != rank or up_shape[0] != full[0]
            or math.prod(down_shape[1:]) != math.prod(full[1:])):
        raise LoraError(f"{path}: '{module}' has up {tuple(up_shape)} / down {tuple(down_shape)}, which do "
                        f"not fit the model's {weight} of shape {tuple(full)}: this LoRA was trained for "
                        f"another model (size or variant)")
    alpha = None
    if "alpha" in roles:
        alpha = (alpha_values or {}).get(roles["alpha"])
    return LoraTarget(weight, "lora", up=roles["up"], down=roles["down"], alpha=alpha, rank=rank,
                      shapes=(tuple(up_shape), tuple(down_shape)), module=module, keys=keys)


def read_lora_header(path: str) -> dict:
    """The LoRA's header (refusing pickles and truncated files, like model files)."""
    try:
        header = read_header(path)
    except CheckpointError as e:
        raise LoraError(str(e).replace("model file", "LoRA file")) from None
    if not looks_like_lora(header):
        raise LoraError(f"{path}: not a LoRA file (no lora_up/lora_down, lora_A/lora_B or diff tensors; keys like "
                        f"{', '.join(sorted(header)[:3])})")
    return header


def check_lora(path: str, key_map: dict, model_header: dict, aliases: dict | None = None,
               header: dict | None = None) -> tuple:
    """Before any rank reads it: the LoRA mapped onto the model from headers alone, exactly as the ranks map it
    (plan_lora, every adapter kind allowed as on the ranks). Raises LoraError for a LoRA of the wrong shape or one
    that matches nothing; returns (LoRA tensors applied, the keys that match nothing), which the ranks skip as
    ComfyUI's own loader does ("lora key not loaded"). `header`: {key: (shape, dtype)} of LoRA tensors not yet in
    a file (a native loader's), `path` then only names them."""
    if header is None:
        header = read_lora_header(path)
    elif not looks_like_lora(header):
        raise LoraError(f"{path}: not a LoRA (keys like {', '.join(sorted(header)[:3])})")
    targets, unmatched = plan_lora(path, header, key_map, model_header, {}, aliases, adapters=True)
    applied = len(header) - len(unmatched)
    return applied, unmatched


def lora_key(loras) -> tuple:
    """The identity of a LoRA list for caching: ((realpath, size, mtime_ns, strength), ...), zero strengths dropped."""
    out = []
    for item in loras or ():
        path, strength = item[0], float(item[-1])
        if strength == 0.0:
            continue
        try:
            st = os.stat(path)
        except OSError:
            raise LoraError(f"LoRA file not found: {path}") from None
        out.append((os.path.realpath(path), st.st_size, st.st_mtime_ns, strength))
    return tuple(out)


def _alphas(reader, header: dict) -> dict:
    return {k: float(reader.read(k).reshape(-1)[0]) for k in header if k.endswith(".alpha")}


def merge_loras(model: torch.nn.Module, loras, key_map: dict, model_header: dict, touched: set,
                aliases: dict | None = None, compute_dtype: torch.dtype | None = None, patch_weight=None,
                checkpoint: str | None = None, store_weight=None, quantized=None) -> dict:
    """Merge `loras` ([(path, strength), ...]) into the model's (sharded) parameters.

    Each parameter gets the sum of all LoRAs' deltas in fp32 and is cast back once. Names of changed
    parameters are added to `touched` as they change, so a caller can restore them after a failure.
    `patch_weight(weight, key, patches)` (the family's, ComfyUI's own code in the rank) merges a whole layer:
    with it (and `checkpoint`, the model file the base layers are read from) LoHa / LoKr / DoRA / ... files merge;
    without it they are refused. `store_weight(module, pname, weight, name)` (the family's) turns a whole patched
    layer into what the host stores for a parameter held in fp8 (ComfyUI: stochastic rounding back to fp8, seeded by
    the parameter's key, through the layer's scale): with it an fp8 parameter is merged whole and stays fp8, as
    natively; without it the merged shard is held in the compute precision. `quantized` (the host's
    models.host.HostQuantLayers, for a model of ComfyUI's mixed-precision layers) merges into a quantized layer as
    ComfyUI's ModelPatcher does (whole, then requantized by the layer); such a layer merges only that way.
    """
    params = dict(model.named_parameters())
    per_param = defaultdict(list)
    readers, unmatched = [], {}
    base = None
    try:
        for path, strength in loras:
            header = read_lora_header(path)
            reader = open_slices(path)
            readers.append(reader)
            targets, skipped = plan_lora(path, header, key_map, model_header, _alphas(reader, header), aliases,
                                         adapters=patch_weight is not None and checkpoint is not None)
            if skipped:
                unmatched[path] = skipped
            for t in targets:
                if t.param not in params:
                    raise LoraError(f"{path}: targets {t.param}, which this model does not have")
                per_param[t.param].append((reader, t, float(strength)))
        full_layers = 0
        for name, items in per_param.items():
            if _is_gguf_weight(model, name):  # stays quantized: the LoRA runs beside it as its factors
                touched.update(_attach_factors(model, name, params[name], items))
                continue
            fp8_stored = store_weight is not None and held_dtype(params[name]) in FP8_DTYPES and checkpoint is not None
            quant = quantized is not None and quantized.holds(name)
            # a chunked shard (a fused k / v projection) is not one slice of up / down: merged whole, then sharded
            chunked = shard_chunks_of(model, name) > 1
            if (chunked or quant) and (patch_weight is None or checkpoint is None):
                what, fix = (("quantized", "a model file without quantized layers") if quant else
                             ("split in blocks over the tensor-parallel ranks", "tp 1"))
                raise LoraError(f"{loras[0][0]}: {name} is {what}, which only a whole-layer merge handles; use {fix} "
                                f"for this LoRA")
            if any(t.kind == "adapter" for _, t, _ in items) or fp8_stored or chunked or quant:
                if base is None:
                    base = open_slices(checkpoint)
                touched.update(_merge_param(model, name, params[name], items, compute_dtype,
                                            full=(base, key_map[name], patch_weight,
                                                  file_bytes(*model_header[key_map[name]])),
                                            store_weight=store_weight if fp8_stored else None,
                                            quantized=quantized if quant else None))
                full_layers += 1
            else:
                touched.update(_merge_param(model, name, params[name], items, compute_dtype))
    finally:
        for r in readers + ([base] if base is not None else []):
            r.close()
    return {"lora_params": len(per_param), "lora_full_layers": full_layers,
            "lora_unmatched": {p: len(k) for p, k in unmatched.items()},
            "lora_unmatched_keys": {p: k[:5] for p, k in unmatched.items()}}


def _is_gguf_weight(model, name) -> bool:
    from .gguf_linear import GGUFLinear

    module_name, _, pname = name.rpartition(".")
    return pname == "weight" and isinstance(model.get_submodule(module_name), GGUFLinear)


def _attach_factors(model, name, p, items) -> set:
    """A plain LoRA on a GGUF layer kept quantized: its up / down factors (this rank's rows of up for a
    column-parallel layer, its columns of down for a row-parallel one; whole under sharded weights, whose layer
    computes on the gathered weight) are applied at compute time, scaled by alpha / rank x strength."""
    module_name, _, _ = name.rpartition(".")
    module = model.get_submodule(module_name)
    dim, rank, parts = shard_dim_of(model, name)
    if is_sharded(p):
        dim = None
    for reader, t, strength in items:
        if t.kind != "lora":
            raise LoraError(f"{reader.path}: its {t.adapter or t.kind} patch for {name} targets a GGUF layer kept "
                            f"quantized, which takes plain LoRAs (up / down) only: use a plain LoRA, or the "
                            f"safetensors model for this adapter")
        up, down = reader.read(t.up).float().flatten(1), reader.read(t.down).float().flatten(1)
        if dim == 0:
            up = shard_of(up, 0, rank, parts, shard_chunks_of(model, name))
        elif dim == 1:
            down = shard_of(down, 1, rank, parts)
        scale = (t.alpha / t.rank) if t.alpha is not None else 1.0
        device = local_tensor(p).device
        module.lora_factors.append((down.contiguous().to(device), up.contiguous().to(device), strength * scale))
    return {name}


def _full_layer(name, base_weight, items, full) -> torch.Tensor:
    """The layer patched whole: the base layer (`base_weight`, fp32, full size, as ComfyUI holds it) with every
    LoRA's patch for it applied in list order by the family's `patch_weight`."""
    _, key, patch_weight, _ = full
    patches, seen = [], set()
    for reader, t, strength in items:
        if (id(reader), t.module) in seen:  # a module's `lora` and `diff` targets are one patch for ComfyUI
            continue
        seen.add((id(reader), t.module))
        patches.append(({as_name: reader.read(k).clone() for k, as_name in t.keys}, t.module, strength))
    try:
        w = patch_weight(base_weight, name, patches)
    except Exception as e:
        files = ", ".join(dict.fromkeys(r.path for r, _, _ in items))
        kinds = ", ".join(dict.fromkeys(t.adapter for _, t, _ in items if t.adapter))
        raise LoraError(f"{files}: the {kinds or 'LoRA'} patch for {key} could not be applied: {e}") from None
    return w.float()


def _merge_param(model, name, p, items, compute_dtype=None, full=None, store_weight=None, quantized=None) -> set:
    """Merge into one parameter; returns the names it changed (a scaled-fp8 layer's scale too).
    `full`: (checkpoint reader, checkpoint key, patch_weight, bytes of the layer in the file) to merge the layer
    whole (see _full_layer); `store_weight`: with `full`, store an fp8 parameter as the host does; `quantized`:
    with `full`, the host's mixed-precision layers, which merge this quantized layer themselves (see merge_loras)."""
    from ..parallel.tensor_parallel import BIAS_ON_RANK0

    if quantized is not None:
        reader, key, _, nbytes = full
        raw = reader.read(key, None, nbytes).clone()  # (a view into the file's map until the reader moves on)
        return quantized.merge_whole(model, name, raw, lambda base: _full_layer(name, base, items, full))

    module_name, _, pname = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    dim, rank, parts = shard_dim_of(model, name)
    if dim == BIAS_ON_RANK0:  # a row-parallel bias lives on TP rank 0 only: the others keep zeros
        if rank != 0:
            return set()
        dim = None
    # a host layer (ComfyUI's ops) holding fp8: merged whole and stored in fp8 by `store_weight`; without it,
    # dequantized with its per-tensor scale and held in the compute precision with its scale at 1 (both restored
    # from the file when the LoRA changes)
    host_fp8 = p.dtype in FP8_DTYPES  # a weight or an fp8 bias
    sharded = is_sharded(p)  # a sharded block weight (FSDP owns it): merged into its local rows in place
    local = local_tensor(p)
    weight_scale = getattr(module, "scale_weight", None) if host_fp8 and pname == "weight" else None
    if full is not None:  # the whole layer from the file, as this rank's shard was loaded from it
        reader, key, _, nbytes = full  # (the reader drops its memory map every so many bytes read)
        base = reader.read(key, None, nbytes).to(p.dtype).float()
        if host_fp8 and torch.is_tensor(weight_scale):
            base = base * weight_scale.detach().float().to(base.device)
        w = _full_layer(name, base, items, full)
        if store_weight is not None:  # rounded whole (the rounding's random stream spans the layer), then sliced
            w = store_weight(module, pname, w, name)
        w = shard_of(w, dim, rank, parts, shard_chunks_of(model, name))
        if tuple(w.shape) != tuple(local.shape):
            raise LoraError(f"{key}: the patched layer's slice has shape {tuple(w.shape)}, the shard "
                            f"{tuple(local.shape)}")
        if store_weight is not None and sharded:
            local.copy_(w)
            return {name}
        if store_weight is not None:  # stays fp8 with its scale, as ComfyUI holds it after patching
            module._parameters[pname] = torch.nn.Parameter(w.contiguous().to(p.device), requires_grad=False)
            return {name}
        w = w.contiguous().to(p.device)
    elif host_fp8:
        w = local.detach().float() * (weight_scale.detach().float() if torch.is_tensor(weight_scale) else 1.0)
    else:
        w = local.detach().float()
    for reader, t, strength in (items if full is None else ()):
        if t.kind == "lora":  # only this shard's rows of up (column-parallel) or columns of down (row-parallel)
            up_shape, down_shape = t.shapes
            up = reader.read(t.up, slice_for(up_shape, 0, rank, parts) if dim == 0 else None)
            down = reader.read(t.down, slice_for(down_shape, 1, rank, parts) if dim == 1 else None)
            scale = (t.alpha / t.rank) if t.alpha is not None else 1.0
            delta = torch.mm(up.float().flatten(1), down.float().flatten(1)).reshape(w.shape)
            w += (strength * scale) * delta
        else:
            d = reader.read(t.diff, slice_for(t.shapes[0], dim, rank, parts) if dim is not None else None)
            w += strength * d.float().reshape(w.shape)
    if host_fp8 and sharded:
        raise LoraError(f"{name}: an fp8 layer of a sharded block merges only whole, through the family's "
                        f"store_weight; this family has none: use weights 'replicated' for this LoRA")
    if host_fp8:
        module._parameters[pname] = torch.nn.Parameter(w.to(compute_dtype or torch.float32), requires_grad=False)
        if torch.is_tensor(weight_scale):
            weight_scale.data.fill_(1.0)
            return {name, f"{module_name}.scale_weight"}
        return {name}
    local.copy_(w)
    return {name}
