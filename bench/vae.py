"""Parallel VAE decode vs ComfyUI's VAE Decode and VAE Decode (Tiled): time per decode, peak memory, and how far each
tiled result is from the untiled decode.

    python bench/vae.py                                   # CPU: width-16 Wan 2.1 VAE, 480p / 720p latents, 5 frames
    python bench/vae.py --frames 1                        # CPU, what a shared 2-core machine finishes: 1 frame
    python bench/vae.py --device cuda --dim 96 --frames 21 --ranks 1   # one GPU: the release's width, 81 frames

A random Wan 2.1 VAE of ComfyUI's class (width --dim; the release's is 96) is written once. Rows:
  native decode        ComfyUI's vae.decode (VAE Decode), untiled;
  native tiled         vae.decode_tiled with VAE Decode (Tiled)'s default widgets (512 px, 64 overlap, 64 frames, 8);
  pack N ranks         VAE Decode on the Parallel VAE Loader's VAE: the same tiles dealt over N ranks (dp=N).
peak: CUDA: torch.cuda.max_memory_allocated (this process for native rows, each rank's for the pack's); CPU: VmHWM
above the RSS before the decode for native rows, each rank's VmHWM (since it started: weights, imports and the
decode) for the pack's, rank 0 first. "vs untiled" / "vs tiled": max abs difference from the native untiled / tiled
decode (pixels in [0, 1]). On a shared 2-core machine the CPU times are ratios at best.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common  # noqa: E402  (bench/ helpers: the repo on sys.path, the machine header)

LATENTS = {"480p": (60, 104), "720p": (90, 160)}  # latent H, W of 832x480 / 1280x720


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak(device: str) -> int:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm_hwm()


def peak_since(device: str, base: int) -> int:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return vm_hwm() - base


def timed(fn, device: str):
    base = reset_peak(device)
    t0 = time.perf_counter()
    out = fn()
    peak_since(device, base)  # (synchronizes)
    return out, time.perf_counter() - t0, peak_since(device, base)


def native_rows(path: str, latent, device: str) -> tuple:
    import comfy.sd
    import comfy.utils
    import torch
    sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=meta)
    tiles = dict(tile_x=64, tile_y=64, overlap=8, tile_t=16, overlap_t=2)  # VAE Decode (Tiled)'s defaults, Wan 2.1
    with torch.inference_mode():
        vae.decode(latent[:, :, :1, :8, :8])  # loads the VAE onto the device (as the pack's rows): not timed
        whole, t_whole, p_whole = timed(lambda: vae.decode(latent), device)
        tiled, t_tiled, p_tiled = timed(lambda: vae.decode_tiled(latent, **tiles), device)
    return whole.float().cpu(), tiled.float().cpu(), [("native decode", t_whole, p_whole), ("native tiled", t_tiled,
                                                                                               p_tiled)]


def pack_row(pack, path: str, latent, device: str, ranks: int) -> tuple:
    import torch

    import parallel_backend.runtime.group as group
    import importlib
    make = importlib.import_module(pack.__name__ + ".nodes.vae_proxy").make_parallel_vae
    spec = pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(ranks, 1, 1, 1, 1, ranks, "bf16" if device == "cuda"
                                                             else "fp32", device, "sdpa")[0]
    vae = make(spec, path, "default")
    with torch.inference_mode():
        vae.decode(latent[:, :, :2, :8, :8])  # starts the group and loads the VAE: not timed
        g = group.active_groups()[0]
        g.stats()  # resets the ranks' CUDA peaks
        t0 = time.perf_counter()
        out = vae.decode(latent)
        seconds = time.perf_counter() - t0
    peaks = [s.get("cuda_peak", s["peak_rss"]) for s in g.stats()]
    group.stop_all()
    return out.float().cpu(), (f"pack {ranks} rank{'s' if ranks > 1 else ''}", seconds, peaks)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dim", type=int, default=16, help="VAE width (the release's: 96)")
    ap.add_argument("--frames", type=int, default=5, help="latent frames (21 = 81 video frames)")
    ap.add_argument("--latents", default="480p,720p")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the native rows (0: torch's default; "
                    "a CPU rank gets cores / ranks): on a shared 2-core machine 2 threads ran 4x slower than 1")
    args = ap.parse_args()
    folder_paths = _common.import_comfy(args.device)  # noqa: F841  (ComfyUI importable, its `nodes` first)
    import comfy_host
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)

    from parallel_backend.testing.synthetic import write_tiny_wan_vae
    pack = comfy_host.import_pack()
    _common.header("Parallel VAE decode vs ComfyUI's VAE Decode / VAE Decode (Tiled)")
    path = write_tiny_wan_vae(os.path.join(tempfile.mkdtemp(prefix="pdit_vae_"), "wan21_vae.safetensors"),
                              dim=args.dim)
    print(f"Wan 2.1 VAE width {args.dim}, {args.frames} latent frames ({4 * args.frames - 3} video frames), "
          f"{args.device}, native rows on {torch.get_num_threads()} thread(s)")
    print(f"{'latent':8} {'row':16} {'s/decode':>9} {'peak GiB (per rank)':>20} {'vs untiled':>11} {'vs tiled':>9}")
    for name in args.latents.split(","):
        h, w = LATENTS[name]
        latent = torch.randn(1, 16, args.frames, h, w, generator=torch.Generator().manual_seed(0))
        whole, tiled, rows = native_rows(path, latent, args.device)
        outs = [whole, tiled]
        for n in (int(r) for r in args.ranks.split(",")):
            out, row = pack_row(pack, path, latent, args.device, n)
            outs.append(out)
            rows.append(row)
        for (label, seconds, peak), out in zip(rows, outs):
            peak = " / ".join(f"{p / 2**30:.2f}" for p in (peak if isinstance(peak, list) else [peak]))
            print(f"{name:8} {label:16} {seconds:9.2f} {peak:>20} {(out - whole).abs().max().item():11.2e} "
                  f"{(out - tiled).abs().max().item():9.2e}", flush=True)


if __name__ == "__main__":
    main()
