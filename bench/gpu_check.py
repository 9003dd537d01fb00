"""One-GPU check of the pack against ComfyUI's native model, in one run (bench/gpu_check.sh calls this).

    python bench/gpu_check.py [--device cuda] [--preset wan2.1-1.3b] [--blocks 0] [--latent 9,60,104]
                              [--kernels sdpa,flash,sage] [--steps 4]

1. starts a world-size-1 worker group on the GPU (NCCL) and loads a synthetic Wan file of the preset's shapes at
   full depth (--blocks 0; random weights) in bf16;
2. parity: one forward of the pack vs ComfyUI's native model of the same file (bf16 both): relative RMS and max
   abs of the difference, asserted against a stated bound;
3. speed: seconds per step of 4 euler steps at cfg 1.0 through native ComfyUI and through the pack, for each
   attention kernel (sdpa / flash / sage; a kernel whose package is missing is reported, not run) and with
   TorchCompileModel (inductor) on both; the ratio native / pack (> 1: the pack is faster; at world size 1 the
   pack can only cost: the goal is >= 0.98);
4. GGUF on the device: the torch dequantization kernels vs gguf's own numpy dequantize for every type, eager and
   compiled (inductor could contract a * b - c into an fma and change bits: reported, not hidden), and the same
   model as a GGUF (--gguf, default Q8_0) at world size 1: parity with its dequantized weights and s/step beside
   native bf16 (what dequantizing each linear per call costs).
On CPU (--device cpu, e.g. --preset tiny) it runs the same steps with gloo, to keep the script working.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from _common import conditioning, count_forwards, header, import_comfy, table, write_fast_checkpoint

from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes

# bf16 forward, pack vs native, relative RMS of the difference: both run ComfyUI-equivalent math in bf16 with
# different kernels and op order; measured on CPU (tiny, bf16) ~4e-3. A real mismatch (a wrong shard, rope or
# norm) gives O(1).
PARITY_REL_BOUND = 3e-2


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def per_step(fn, steps, device):
    fn()  # warm-up (and compile)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--blocks", type=int, default=0, help="0 = the preset's full depth")
    ap.add_argument("--latent", default="9,60,104", help="latent T,H,W (16 channels); 9,60,104 = 480p 33 frames")
    ap.add_argument("--kernels", default="sdpa,flash,sage")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="model / compute precision")
    ap.add_argument("--gguf", default="Q8_0", help="GGUF type of section 4's model ('' = skip section 4)")
    args = ap.parse_args()
    header(f"GPU check: pack (world size 1) vs native ComfyUI, {args.preset}")
    import_comfy(args.device)
    import comfy.sd
    import folder_paths

    import comfy_host
    import nodes as comfy_nodes
    import parallel_backend.runtime.group as group_mod
    from parallel_backend.parallel.kernels import missing_package

    pack = comfy_host.import_pack()
    dtype = args.dtype
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = dict(WAN_PRESETS[args.preset])
    if args.blocks:
        cfg["num_layers"] = args.blocks
    t, h, w = (int(v) for v in args.latent.split(","))
    latent = {"samples": torch.zeros(1, cfg["out_dim"], t, h, w)}
    pos, neg = conditioning(512)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="pdit_gpu_check_") as tmp:
        path = write_fast_checkpoint(os.path.join(tmp, "wan_check.safetensors"), wan_shapes(**cfg))
        folder_paths.add_model_folder_path("diffusion_models", tmp)
        native = comfy.sd.load_diffusion_model(path, model_options={"dtype": tdtype})
        counter = count_forwards(native)
        sample = lambda m: comfy_nodes.common_ksampler(m, 1, args.steps, 1.0, "euler", "simple", pos, neg,
                                                       latent)[0]["samples"]

        def spec(kernel):
            return pack.NODE_CLASS_MAPPINGS["ParallelConfig"]().make(1, 1, 1, 1, 1, 1, dtype, args.device, kernel)[0]

        # 2. parity of one forward
        model, plan = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load(os.path.basename(path), dtype,
                                                                             spec("sdpa"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, cfg["in_dim"], t, h, w, generator=g)
        ts = torch.tensor([700.0])
        ctx = pos[0][0]
        dev = torch.device(args.device)
        with torch.no_grad():
            ref = native.model.diffusion_model.to(dev)(x.to(dev, tdtype), ts.to(dev), ctx.to(dev, tdtype)).float().cpu()
        got = group_mod.active_groups()[0].forward(x, ts, ctx)
        rel = ((got - ref).norm() / ref.norm()).item()
        print(f"parity, one forward ({t * (h // 2) * (w // 2)} tokens, {dtype}): relative RMS {rel:.2e} (bound "
              f"{PARITY_REL_BOUND}), max abs {(got - ref).abs().max().item():.3e}; plan: {plan}")
        group_mod.stop_all()
        # 3. speed per kernel, and compiled
        native_step = per_step(lambda: sample(native), args.steps, args.device)
        rows.append(["native", "comfyui default", f"{native_step:.3f}", "1.00", counter["n"]])
        for kernel in args.kernels.split(","):
            pip = missing_package(kernel)
            if pip:
                notes.append(f"{kernel}: not installed ({pip})")
                continue
            model, _ = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load(os.path.basename(path), dtype,
                                                                              spec(kernel))
            s = per_step(lambda: sample(model), args.steps, args.device)
            rows.append(["pack", kernel, f"{s:.3f}", f"{native_step / s:.2f}",
                         group_mod.active_groups()[0].stats()[0]["forwards"]])
            if kernel == "sdpa" and not args.no_compile:
                from comfy_extras.nodes_torch_compile import TorchCompileModel
                s = per_step(lambda: sample(TorchCompileModel.execute(model, "inductor")[0]), args.steps, args.device)
                n = per_step(lambda: sample(TorchCompileModel.execute(native, "inductor")[0]), args.steps, args.device)
                rows.append(["native", "compile (inductor)", f"{n:.3f}", f"{native_step / n:.2f}", "-"])
                rows.append(["pack", "sdpa + compile (inductor)", f"{s:.3f}", f"{native_step / s:.2f}", "-"])
            group_mod.stop_all()
        # 4. GGUF on the device
        if args.gguf:
            kernel_rows = gguf_kernels_check(args.device, compiled=not args.no_compile)
            print(table(kernel_rows, ["type", "eager = gguf", "compiled = gguf"], align="lll"))
            from parallel_backend.testing.gguf_files import write_dequantized_safetensors, write_gguf_dit
            gpath = os.path.join(tmp, f"wan_check_{args.gguf}.gguf")
            write_gguf_dit(path, gpath, args.gguf)
            dpath = write_dequantized_safetensors(gpath, os.path.join(tmp, "wan_check_dequant.safetensors"),
                                                  dtype=tdtype)
            model, plan = pack.NODE_CLASS_MAPPINGS["ParallelModelLoader"]().load(os.path.basename(gpath), dtype,
                                                                                 spec("sdpa"))
            got = group_mod.active_groups()[0].forward(x, ts, ctx)
            deq = comfy.sd.load_diffusion_model(dpath, model_options={"dtype": tdtype})
            with torch.no_grad():
                ref_g = deq.model.diffusion_model.to(dev)(x.to(dev, tdtype), ts.to(dev),
                                                          ctx.to(dev, tdtype)).float().cpu()
            grel = ((got - ref_g).norm() / ref_g.norm()).item()
            print(f"GGUF {args.gguf} pack vs native on its dequantized weights: relative RMS {grel:.2e}; {plan}")
            s = per_step(lambda: sample(model), args.steps, args.device)
            rows.append(["pack", f"sdpa, GGUF {args.gguf} (dequant per call)", f"{s:.3f}", f"{native_step / s:.2f}",
                         group_mod.active_groups()[0].stats()[0]["forwards"]])
            group_mod.stop_all()
            del deq
    depth = cfg["num_layers"]
    print(f"model: {args.preset} width, {depth} blocks, {dtype}, random weights; latent 16x{t}x{h}x{w}; "
          f"{args.steps} euler steps at cfg 1.0; x native = native s/step / this s/step (world size 1)")
    print(table(rows, ["side", "attention", "s/step", "x native", "forwards"], align="llrrr"))
    for n in notes:
        print("note:", n)
    assert rel <= PARITY_REL_BOUND, f"pack vs native relative RMS {rel:.2e} > {PARITY_REL_BOUND}"


def gguf_kernels_check(device: str, compiled: bool) -> list:
    """Each type's torch dequantization on `device` vs gguf.quants.dequantize (numpy, CPU): bit-equal eager, and
    under torch.compile (inductor) when asked; rows of (type, eager, compiled)."""
    import numpy as np

    from parallel_backend.testing.gguf_files import quantize_values
    from parallel_backend.weights.gguf import QUANT_BLOCKS, dequantize
    from parallel_backend.weights.gguf_kernels import dequantize_torch

    rows = []
    rng = np.random.default_rng(0)
    for qtype in QUANT_BLOCKS:
        values = rng.standard_normal((64, 512)).astype(np.float32)
        raw = quantize_values(values, qtype)
        want = dequantize(raw, qtype, (64, 512))
        dev_raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1)).to(device)
        eager = torch.equal(dequantize_torch(dev_raw, qtype, (64, 512)).cpu(), want)
        comp = "-"
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(lambda r, q=qtype: dequantize_torch(r, q, (64, 512)))
            got = fn(dev_raw).cpu()
            comp = "yes" if torch.equal(got, want) else f"no (max abs {(got - want).abs().max().item():.1e})"
        rows.append([qtype, "yes" if eager else "NO", comp])
    return rows


if __name__ == "__main__":
    main()
