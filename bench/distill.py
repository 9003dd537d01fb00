"""The workflow most Wan 2.2 users run: A14B's two experts, a 4-step distill LoRA path at cfg 1.0 (two
KSamplerAdvanced split at a boundary step), optionally with EasyCache and TorchCompileModel - through ComfyUI's
native Load Diffusion Model and through the pack on each mesh, in one run.

    python bench/distill.py [--device cpu|cuda] [--blocks 1] [--latent 3,16,16] [--meshes cfg2,ulysses2,ring2]
                            [--variants plain,easycache,compile] [--dtype fp32] [--steps 4] [--decode 16]

Experts: synthetic files of Wan 2.2 A14B width (5120, 40 heads, ffn 13824) with --blocks blocks each (random
weights: speed and agreement only). Per mesh and variant: seconds per step of the second (warm) run, its ratio
to native with the same variant (> 1: the pack is faster), forwards that reached the model (a step cache skips
some), the first run's seconds (group load excluded; compile included), and max |pack - native|.
On CPU every rank shares the same cores: the ratios say what the pack costs, not what GPUs would gain.

--decode W: the end-to-end rows (the plain variant's warm sampling, then its VAE Decode, as the graph runs them): a
random Wan 2.1 VAE of ComfyUI's class at width W (the release's: 96) - native VAE Decode on Load VAE's VAE, the
pack's VAE Decode on the Parallel VAE Loader's VAE on the experts' group (tiled at VAE Decode (Tiled)'s defaults);
its max |diff| is from native VAE Decode (Tiled) at those defaults (pixels in [0, 1]).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from _common import conditioning, count_forwards, header, import_comfy, table, write_fast_checkpoint

from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes, write_tiny_wan_vae


def mesh_degrees(name: str) -> dict:
    """'cfg2xulysses2' -> {'cfg': 2, 'ulysses': 2}."""
    out = {}
    for part in name.split("x"):
        axis = part.rstrip("0123456789")
        out[axis] = int(part[len(axis):])
    return out


def two_expert_sample(high, low, pos, neg, latent, steps, boundary, cfg, seed=42):
    """ComfyUI's Wan 2.2 graph: the high-noise expert to the boundary step, the low-noise one after it."""
    import nodes as comfy_nodes

    ks = comfy_nodes.KSamplerAdvanced()
    mid = ks.sample(high, "enable", seed, steps, cfg, "euler", "simple", pos, neg, latent, 0, boundary, "enable")[0]
    return ks.sample(low, "disable", 0, steps, cfg, "euler", "simple", pos, neg, mid, boundary, 10000, "disable")[0]


def with_variant(model, variant, threshold):
    if variant == "easycache":
        from comfy_extras.nodes_easycache import EasyCacheNode
        return EasyCacheNode.execute(model, threshold, 0.15, 0.95, False)[0]
    if variant == "compile":
        from comfy_extras.nodes_torch_compile import TorchCompileModel
        return TorchCompileModel.execute(model, "inductor")[0]
    return model


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp32 on cpu, bf16 on cuda by default")
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--latent", default="3,16,16", help="latent T,H,W (16 channels); 21,90,160 = 720p 81 frames")
    ap.add_argument("--ctx", type=int, default=512, help="text tokens (umt5 gives 512)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--boundary", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--meshes", default="cfg2,ulysses2,ring2,cfg2xulysses2")
    ap.add_argument("--variants", default="plain,easycache,compile")
    ap.add_argument("--easycache-threshold", type=float, default=0.2, help="EasyCache reuse_threshold (node default)")
    ap.add_argument("--decode", type=int, default=0, help="end-to-end rows: VAE width (0: none; the release's: 96)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the native rows (0: torch's default; "
                    "a CPU rank gets cores / ranks)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    header(f"Wan 2.2 A14B distill shape ({args.steps} steps, cfg {args.cfg}): native ComfyUI vs the pack per mesh")
    import_comfy(args.device)
    import comfy.sd

    import comfy_host  # (tests/, put on sys.path by import_comfy)
    import parallel_backend.runtime.group as group_mod
    sys_pack = comfy_host.import_pack()
    variants = args.variants.split(",")
    t, h, w = (int(v) for v in args.latent.split(","))
    latent = {"samples": torch.zeros(1, 16, t, h, w)}
    tokens = t * (h // 2) * (w // 2)
    pos, neg = conditioning(args.ctx)
    cfg = dict(WAN_PRESETS["wan2.2-a14b"], num_layers=args.blocks)
    rows, native, e2e = [], {}, []
    with tempfile.TemporaryDirectory(prefix="pdit_distill_") as tmp:
        paths = [write_fast_checkpoint(os.path.join(tmp, f"wan22_{n}_noise.safetensors"), wan_shapes(**cfg),
                                       dtype=tdtype, seed=i) for i, n in enumerate(("high", "low"))]
        vae_path = write_tiny_wan_vae(os.path.join(tmp, "wan_2.1_vae.safetensors"), dim=args.decode) \
            if args.decode else None
        import folder_paths
        folder_paths.add_model_folder_path("diffusion_models", tmp)
        # native: both experts as ComfyUI's UNETLoader loads them, the same variants
        for variant in variants:
            experts = [comfy.sd.load_diffusion_model(p, model_options={"dtype": tdtype}) for p in paths]
            counters = [count_forwards(m) for m in experts]
            models = [with_variant(m, variant, args.easycache_threshold) for m in experts]
            _, first = timed(lambda: two_expert_sample(*models, pos, neg, latent, args.steps, args.boundary, args.cfg))
            n0 = sum(c["n"] for c in counters)
            out, warm = timed(lambda: two_expert_sample(*models, pos, neg, latent, args.steps, args.boundary,
                                                        args.cfg))
            native[variant] = (out["samples"], warm / args.steps)
            rows.append(["native", variant, f"{warm / args.steps:.3f}", "1.00", sum(c["n"] for c in counters) - n0,
                         f"{first:.1f}", "-"])
            if vae_path and variant == "plain":
                native_vae = native_vae_decode(vae_path, out["samples"])
                native_vae["total"] = warm + native_vae["seconds"]
                e2e.append(["native (VAE Decode)", f"{warm:.2f}", f"{native_vae['seconds']:.2f}",
                            f"{native_vae['total']:.2f}", "1.00", "-"])
            del experts, models, counters
        # free the native experts (and what torch.compile cached for them) before the ranks take the memory
        import gc
        torch._dynamo.reset()
        gc.collect()
        for mesh in args.meshes.split(","):
            deg = mesh_degrees(mesh)
            world = 1
            for d in deg.values():
                world *= d
            d = {a: deg.get(a, 1) for a in ("cfg", "ulysses", "ring", "tp", "dp")}
            spec = sys_pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(world, d["cfg"], d["ulysses"], d["ring"],
                                                                         d["tp"], d["dp"], dtype, args.device,
                                                                         "sdpa")[0]
            loader = sys_pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]()
            experts = [loader.load(os.path.basename(p), dtype, spec, residency="resident")[0] for p in paths]
            group = group_mod.active_groups()[0]
            try:
                for variant in variants:
                    models = [with_variant(m, variant, args.easycache_threshold) for m in experts]
                    _, first = timed(lambda: two_expert_sample(*models, pos, neg, latent, args.steps, args.boundary,
                                                               args.cfg))
                    f0 = group.stats()[0]["forwards"]
                    out, warm = timed(lambda: two_expert_sample(*models, pos, neg, latent, args.steps, args.boundary,
                                                                args.cfg))
                    ref, native_step = native[variant]
                    per_step = warm / args.steps
                    rows.append([mesh, variant, f"{per_step:.3f}", f"{native_step / per_step:.2f}",
                                 group.stats()[0]["forwards"] - f0, f"{first:.1f}",
                                 f"{(out['samples'] - ref).abs().max().item():.1e}"])
                    if vae_path and variant == "plain":
                        e2e.append(pack_e2e_row(sys_pack, spec, vae_path, mesh, warm, out["samples"], native_vae))
            finally:
                group_mod.stop_all()
    print(f"experts: A14B width, {args.blocks} block(s) each, {dtype}, device {args.device}; latent 16x{t}x{h}x{w} "
          f"({tokens} tokens), {args.ctx} text tokens; EasyCache reuse_threshold {args.easycache_threshold}; native "
          f"rows on {torch.get_num_threads()} thread(s)")
    print(table(rows, ["mesh", "variant", "s/step", "x native", "forwards", "first run s", "max |diff|"],
                align="llrrrrr"))
    if e2e:
        print(f"\nend to end (plain variant, warm run): sampling, then VAE Decode of the {t}-frame latent "
              f"({4 * t - 3} frames of {8 * h} x {8 * w}) by a random Wan 2.1 VAE of width {args.decode}")
        print(table(e2e, ["graph", "sampling s", "decode s", "total s", "x native", "decode max |diff| vs tiled"],
                    align="lrrrrr"))


def native_vae_decode(path: str, samples) -> dict:
    """ComfyUI's VAE Decode and VAE Decode (Tiled) at its default widgets on Load VAE's VAE for the file: seconds of
    the first, the second's pixels (what the pack's tiled decode must equal)."""
    import comfy.sd
    import comfy.utils
    sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=meta)
    with torch.inference_mode():
        vae.decode(samples[:, :, :1, :8, :8])  # loads the VAE (as the pack's rows): not timed
        _, seconds = timed(lambda: vae.decode(samples))
        tiled = vae.decode_tiled(samples, tile_x=64, tile_y=64, overlap=8, tile_t=16, overlap_t=2)
    return {"seconds": seconds, "tiled": tiled.float().cpu()}


def pack_e2e_row(pack, spec: dict, path: str, mesh: str, sampling: float, samples, native_vae: dict) -> list:
    """VAE Decode on the Parallel VAE Loader's VAE (the experts' group: the same spec) after the pack's sampling."""
    import importlib
    make = importlib.import_module(pack.__name__ + ".nodes.vae_proxy").make_parallel_vae
    vae = make(spec, path, "default")
    with torch.inference_mode():
        vae.decode(samples[:, :, :1, :8, :8])  # loads the VAE onto the ranks: not timed (a graph loads it once)
        pixels, seconds = timed(lambda: vae.decode(samples))
    diff = (pixels.float().cpu() - native_vae["tiled"]).abs().max().item()
    total = sampling + seconds
    return [f"{mesh} + Parallel VAE Loader", f"{sampling:.2f}", f"{seconds:.2f}", f"{total:.2f}",
            f"{native_vae['total'] / total:.2f}", f"{diff:.1e}"]


if __name__ == "__main__":
    main()
