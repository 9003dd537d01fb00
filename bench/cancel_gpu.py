"""One-GPU check of issue 26's CUDA paths (bench/gpu_check.sh's environment; about 3 minutes on an H200):

    python bench/cancel_gpu.py [--preset wan2.1-1.3b] [--blocks 30]

1. a world-size-1 NCCL group loads a synthetic Wan of the preset's shapes (bf16), and reports its GPU's memory after
   the load (what each call's activations are checked against);
2. per latent (480p and 720p, 81 frames, cond + uncond in one call): ComfyUI's own activation estimate for the class
   (BaseModel.memory_required, its flash-attention formula on CUDA) beside the rank's measured peak of the call
   (torch's allocator, beyond the weights), and the seconds per call;
3. Cancel 0.3 s into a 720p call: the rank stops at the next block (the group stays), how long it took, and the next
   call equals the same call before the cancel;
4. a latent whose estimate exceeds the GPU is refused before it is sent (CallTooLarge), the group unchanged.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from _common import header, import_comfy, table, write_fast_checkpoint

from parallel_backend.config import ParallelConfig
from parallel_backend.planner import CallTooLarge
from parallel_backend.runtime.group import WorkerGroup
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes


class Cancelled(Exception):
    pass


def comfy_estimate(path: str, shape) -> int:
    """ComfyUI's memory_required for this file's class, as the pack's nodes ask it (nodes/fit.py)."""
    import comfy.model_detection

    from parallel_backend.weights.reads import meta_tensors, read_header
    sd = meta_tensors(read_header(path))
    mc = comfy.model_detection.model_config_from_unet(sd, "")
    mc.set_inference_dtype(torch.bfloat16, None)
    mc.unet_config["disable_unet_model_creation"] = True
    base = mc.get_model(sd, "")
    return int(type(base).memory_required(base, tuple(shape)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--device", default="cuda", help="cpu (gloo, small latents): to check the script itself")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    latents = (("480p 81f", (21, 60, 104)), ("720p 81f", (21, 90, 160))) if cuda else (("tiny", (1, 32, 32)),)
    header("issue 26 on one GPU: activation estimate vs measured, Cancel mid-call, a call too large")
    import_comfy(args.device)
    cfg = {**WAN_PRESETS[args.preset], "num_layers": args.blocks}
    path = write_fast_checkpoint(os.path.join(tempfile.mkdtemp(), "wan.safetensors"), wan_shapes(**cfg),
                                 dtype=torch.bfloat16)
    g = WorkerGroup(ParallelConfig(world_size=1, device=args.device, dtype="bf16")).start()
    try:
        g.load(path, "bf16")
        print(f"after load: {g.call_memory}")
        ctx = torch.randn(2, 512, 4096)
        t = torch.tensor([500.0, 500.0])
        rows, outs = [], {}
        for name, thw in latents:
            x = torch.randn(2, 16, *thw, generator=torch.Generator().manual_seed(1))
            est = comfy_estimate(path, x.shape)
            g.stats()  # resets the peak
            t0 = time.perf_counter()
            outs[name] = g.forward(x, t, ctx, activations=est, what=name)
            took = time.perf_counter() - t0
            s = g.stats()[0]
            peak = s["cuda_peak"] - s["cuda_allocated"] if cuda else 0
            rows.append([name, thw[0] * thw[1] * thw[2] // 4, f"{est / 2**30:.2f}",
                         f"{peak / 2**30:.2f}" if cuda else "n/a", f"{est / max(peak, 1):.2f}" if cuda else "n/a",
                         f"{took:.2f}"])
        print(table(rows, ["latent (2 rows)", "tokens/row", "ComfyUI estimate GiB", "measured peak GiB",
                           "estimate / measured", "s/call"]))
        name, thw = latents[-1]
        x = torch.randn(2, 16, *thw, generator=torch.Generator().manual_seed(1))
        t0 = time.monotonic()

        def interrupt():
            if time.monotonic() - t0 > 0.3:
                raise Cancelled()
        try:
            g.forward(x, t, ctx, interrupt=interrupt)
            print("Cancel: the call finished before the ranks saw the cancel")
        except Cancelled:
            print(f"Cancel 0.3 s into a {name} call: raised after {time.monotonic() - t0:.2f} s, stopped at "
                  f"{g.progress.started()}, group alive {g.alive()}")
        again = g.forward(x, t, ctx)
        print(f"the same call after the cancel vs before: max abs {(again - outs[name]).abs().max().item():.2e}")
        huge = (2, 16, 81, 256, 256) if cuda else (2, 16, 1, 2048, 2048)
        try:
            g.forward(torch.zeros(huge), t, ctx, activations=comfy_estimate(path, huge), what=str(huge))
            print("too large: NOT refused")
        except CallTooLarge as e:
            print(f"too large: refused: {e}")
        print(f"group alive after the refusal: {g.alive()}")
    finally:
        g.stop()


if __name__ == "__main__":
    main()
