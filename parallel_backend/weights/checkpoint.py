"""What every checkpoint reader shares (safetensors in reads.py, GGUF in gguf.py): the error that names a file the
pack cannot read, the key prefixes a file may put before the model's module paths, and the memory map that is
re-opened every so many bytes so its pages do not pile up in a rank's resident memory."""
from __future__ import annotations

REOPEN_BYTES = 64 << 20
# what ComfyUI's own files put before the diffusion model's module paths (comfy.sd strips them the same way)
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class CheckpointError(ValueError):
    pass


def strip_prefix(key: str, prefixes: tuple = MODEL_PREFIXES) -> str:
    """`key` without the first of `prefixes` it starts with (the module path a file's key names)."""
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def stripped_shapes(header: dict, prefixes: tuple = MODEL_PREFIXES) -> dict:
    """module path -> shape of every tensor of a header ({key: (shape, dtype)}), the prefixes stripped."""
    return {strip_prefix(k, prefixes): tuple(v[0]) for k, v in header.items()}


class ReopeningReader:
    """A memory-mapped checkpoint read slice by slice, re-opened (its map dropped) after `budget` bytes of its pages
    were touched, so the pages do not pile up in resident memory. Subclasses open (`_open_file`) and drop
    (`_drop_file`) their file; `_handle(touch)` gives the open one."""

    def __init__(self, path: str, budget: int = REOPEN_BYTES):
        self.path, self.budget = path, budget or REOPEN_BYTES
        self._f = None
        self._touched = 0
        self.bytes_read = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._f is not None:
            self._drop_file(self._f)
            self._f = None
        self._touched = 0

    def _handle(self, touch: int):
        if self._f is not None and self._touched + touch > self.budget:
            self.close()
        if self._f is None:
            self._f = self._open_file()
        self._touched += touch
        return self._f

    def _open_file(self):
        raise NotImplementedError

    def _drop_file(self, f) -> None:
        pass
