"""LoRAs on the pack's MODEL, in the ComfyUI process, before any rank reads them.

- A LoRA is mapped onto the model from the two files' headers exactly as the ranks map it: one made for another
  model size is refused here, naming the layer, instead of behind a rank's traceback; keys that match nothing are
  logged as ComfyUI's own loader logs them ("lora key not loaded: ...") and counted in the returned report.
- A native LoRA loader's tensors (LoraLoader, LoraLoaderModelOnly) stay with the MODEL, as ComfyUI's own patches
  keep them, and are written as a file into the worker group's own folder only when its ranks need them: the
  folder goes with the group (Unload, a fault, a config change, ComfyUI exiting - its ranks remove it even when
  ComfyUI is killed), and a restarted group gets them written again.
"""
import functools
import hashlib
import logging
import os

import torch

from . import engine


class LoraTensors:
    """The tensors a native LoRA loader read, kept with the MODEL that uses them."""

    def __init__(self, tensors: dict):
        self.tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        h = hashlib.sha1()
        for k in sorted(self.tensors):
            t = self.tensors[k]
            h.update(k.encode())
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self.name = f"native_lora_{h.hexdigest()[:20]}.safetensors"

    def path_in(self, group) -> str:
        """The file the ranks read, in `group`'s folder (written once per group)."""
        path = os.path.join(group.scratch_dir("loras"), self.name)
        if not os.path.exists(path):
            from safetensors.torch import save_file
            save_file(self.tensors, path + ".part")
            os.replace(path + ".part", path)  # never a half-written file under the final name
        return path


def lora_path(source, group) -> str:
    """A LoRA list entry's file: a models/loras path as is, a native loader's tensors written for `group`."""
    return source.path_in(group) if isinstance(source, LoraTensors) else source


@functools.lru_cache(maxsize=8)
def _model_keys(path: str, stamp: tuple, precision: str) -> tuple:
    """(header, parameter name -> checkpoint key, diffusers aliases) of a model file, from ComfyUI's own class built
    on meta exactly as the ranks build it (no weights read)."""
    reads, models = engine.reads, engine.models
    header = reads.read_header(path)
    family = models.detect_family(header, path)
    model, _, prefix = family.build(header, reads.compute_dtype(precision), path,
                                    storage=reads.weight_storage(precision))
    # the family's own map where it has one (the ranks read and merge under it: HunyuanVideo's released key names)
    key_map = getattr(family, "key_map", reads.host_key_map)(model, prefix)
    return header, key_map, family.diffusers_names(reads.model_keys(header))


def check_lora(proxy, source, strength: float) -> str:
    """Map the LoRA `source` (a file, or a native loader's LoraTensors) onto the proxy's model as the ranks will:
    refuse a LoRA of the wrong shape, log each key that matches nothing as ComfyUI does, and return a one-line
    report."""
    st = os.stat(proxy.path)
    header, key_map, aliases = _model_keys(proxy.path, (st.st_size, st.st_mtime_ns), proxy.precision)
    if isinstance(source, LoraTensors):
        name = "a native loader's LoRA"
        lora_header = {k: (list(t.shape), str(t.dtype)) for k, t in source.tensors.items()}
    else:
        name, lora_header = os.path.basename(source), None
    applied, unmatched = engine.lora.check_lora(str(source if lora_header is None else name), key_map,
                                                             header, aliases, header=lora_header)
    for key in unmatched:
        logging.warning("lora key not loaded: %s", key)  # ComfyUI's own words (comfy/lora.py)
    report = f"{name} at strength {strength:g}: {applied} of {applied + len(unmatched)} LoRA tensors applied"
    if unmatched:
        report += (f"; {len(unmatched)} match no layer of {os.path.basename(proxy.path)} and were not loaded "
                   f"(e.g. {', '.join(unmatched[:3])}): is the LoRA made for another model size or variant?")
        logging.warning("parallel_dit: LoRA %s", report)
    return report


def with_parallel_lora(model, proxy, source, strength) -> tuple:
    """(a clone of the pack's MODEL with the LoRA `source` added at `strength`, merged on the ranks; the LoRA's report:
    how many of its tensors apply). `source`: a models/loras path, or a native loader's LoraTensors. A LoRA of the
    wrong shape is refused here, before any rank reads it."""
    report = check_lora(proxy, source, strength)
    lora_proxy = proxy.with_loras(tuple(proxy.loras) + ((source, float(strength)),))
    patched = model.clone()
    patched.add_object_patch("diffusion_model", lora_proxy)
    group = proxy.warm_group()
    if proxy.resident or not group.holds_other_models(proxy.path, proxy.precision):
        lora_proxy.group()  # merge now, so a LoRA that does not fit fails here, naming its file
    # else: the group holds another model a sampler of this graph may still use (Parallel Model Loader's
    # "swap"); this model and its LoRAs are loaded when its own sampler first calls it
    return patched, report
