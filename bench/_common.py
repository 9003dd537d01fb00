"""Shared bits of the bench scripts: repo on sys.path, the machine header, plain-text tables.

Every script prints `header(title)` first, so a pasted table always says where and how it was made.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/x.py` puts bench/ on sys.path, not the repo root
    sys.path.insert(0, REPO)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    import torch

    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    lines = [f"cpu:     {cpu_model()} ({cores} logical cores, {usable} usable by this process)",
             f"python:  {platform.python_version()}   torch: {torch.__version__}"]
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        lines.append(f"memory:  {total_kb / 2**20:.1f} GiB")
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"gpu:     {len(names)} x {', '.join(sorted(set(names)))} (CUDA {torch.version.cuda})")
    else:
        lines.append("gpu:     none (CPU only)")
    return lines


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def header(title: str) -> None:
    print("=" * 100)
    print(title)
    print("-" * 100)
    for line in machine_lines():
        print(line)
    print(f"command: {command_line()}")
    print("=" * 100)


def table(rows: list[list], headers: list[str], align: str | None = None) -> str:
    """Rows of cells as an aligned text table; `align` is one char per column, 'l' or 'r'."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells]
    return "\n".join(out)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def write_fast_checkpoint(path: str, shapes: dict, dtype=None, seed: int = 0, prefix: str = "",
                          metadata: dict | None = None, extra: dict | None = None) -> str:
    """A synthetic checkpoint of real shapes, written fast (keys under `prefix`; `metadata`: the file's string
    metadata; `extra`: {key: tensor} stored as given in place of the drawn ones, e.g. fp32 buffers).

    parallel_backend.testing.synthetic.write_checkpoint draws every value with torch.randn (about 40 s for
    Wan 14B's width with 2 blocks on a 2-core box). Benchmarks that measure bytes and memory only
    need the right shapes, dtypes and O(1) activations, so here each tensor is a tiled pool of 1 M
    normal values with synthetic.random_tensor's per-kind scaling (norm weights ~1, biases small,
    matrices / sqrt(fan_in), modulation / sqrt(dim)).
    """
    import math

    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 20, generator=g)
    sd = {}
    for i, (key, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        t = pool.roll(-((i * 7919) % pool.numel()))[:n]  # a different window of the pool per tensor
        if "modulation" in key:
            t = t / math.sqrt(shape[-1])
        elif key.endswith("bias"):
            t = t * 0.02
        elif len(shape) == 1:
            t = 1.0 + 0.1 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        t = t.to(dtype)
        if n > t.numel():  # tile in the target dtype: one pass over the output bytes
            t = t.repeat(-(-n // t.numel()))[:n]
        sd[prefix + key] = t.reshape(shape).contiguous()
    sd.update({prefix + k: t.contiguous() for k, t in (extra or {}).items()})
    save_file(sd, path, metadata=metadata)
    return path


def import_comfy(device: str = "cpu"):
    """ComfyUI importable in this process ($COMFYUI_PATH, else scripts/setup.sh's copy), through the tests'
    host helper; device 'cuda' leaves ComfyUI on the GPU (the native side of a GPU benchmark)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import comfy_host

    return comfy_host.import_comfy(cpu=device != "cuda")


def conditioning(tokens: int = 512, width: int = 4096, seed: int = 11):
    """Positive / negative CONDITIONING of umt5's shape (what CLIPTextEncode gives Wan), random."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return ([[torch.randn(1, tokens, width, generator=g), {}]], [[torch.randn(1, tokens, width, generator=g), {}]])


def count_forwards(model) -> dict:
    """Count the evaluations that reach a native ComfyUI model's own `_forward` (a step cache skips them)."""
    dm = model.model.diffusion_model
    counter = {"n": 0}
    inner = dm._forward

    def counted(*a, **k):
        counter["n"] += 1
        return inner(*a, **k)

    dm._forward = counted
    return counter


# ---- weight formats of a Wan DiT file (memory.py, comm_volume.py) ---------------------------------------------------
WEIGHT_FORMATS = ("bf16", "fp8", "Q8_0", "Q6_K", "Q5_K", "Q4_K")  # the files Wan 14B is shipped / converted in


def wan_file_header(preset: str, fmt: str, layers: int | None = None) -> dict:
    """key -> (shape, stored dtype) of a Wan file of `preset`'s real shapes (`layers` blocks; None: the real count)
    in `fmt`: "bf16" all BF16; "fp8" a plain fp8 e4m3fn file (testing.synthetic.write_fp8_variant(scaled=False):
    every weight of 2+ dims fp8, the rest BF16); a GGUF quant type: city96's per-tensor rule as
    testing.gguf_files.write_gguf_dit applies it to a BF16 source (gguf_type_for)."""
    import torch

    from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes

    shapes = wan_shapes(**{**WAN_PRESETS[preset], **({"num_layers": layers} if layers else {})})
    if fmt == "bf16":
        return {k: (s, "BF16") for k, s in shapes.items()}
    if fmt == "fp8":
        return {k: (s, "F8_E4M3" if k.endswith(".weight") and len(s) >= 2 else "BF16") for k, s in shapes.items()}
    from parallel_backend.testing.gguf_files import gguf_type_for

    return {k: (s, gguf_type_for(k, s, torch.bfloat16, fmt)) for k, s in shapes.items()}
