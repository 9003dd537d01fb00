"""Demo: sample a generated tiny Wan 2.1 with the pack on 2 CPU ranks through headless ComfyUI.

Uses only ComfyUI's HTTP API (POST /prompt, GET /history), as any API client would. The text
encoder is replaced by a fake-embedding node because the real umt5 cannot be downloaded here.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.append(REPO)

import comfy_host  # noqa: E402
from parallel_backend.testing.synthetic import write_tiny_wan  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=os.path.join(REPO, "demo_output"), help="where the demo writes everything")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    ckpt = os.path.join(args.dir, "tiny_wan21_t2v.safetensors")
    if not os.path.exists(ckpt):
        write_tiny_wan(ckpt)
    base = comfy_host.make_base_dir(os.path.join(args.dir, "comfyui_base"), {"diffusion_models": [ckpt]})
    graph = comfy_host.tiny_cpu_variant(comfy_host.load_workflow("wan21_t2v_parallel_api.json"),
                                        os.path.basename(ckpt), seed=args.seed, steps=args.steps,
                                        prefix="parallel_dit/demo")
    print(f"starting headless ComfyUI ({comfy_host.comfyui_path()}) ...", flush=True)
    with comfy_host.ComfyServer(base) as server:
        t0 = time.monotonic()
        prompt_id = server.queue(graph)
        print(f"queued prompt {prompt_id} on {server.url}; sampling {args.steps} steps on 2 CPU ranks ...",
              flush=True)
        hist = server.wait(prompt_id, timeout=600)
        if hist["status"]["status_str"] != "success":
            print(server.log_tail(), file=sys.stderr)
            raise SystemExit(f"prompt failed: {hist['status']}")
        latent, path = comfy_host.saved_latent(base, "parallel_dit/demo")
        plan = [l for l in server.log_tail(200).splitlines() if "parallel_dit:" in l]
    print("\n".join(plan))
    print(f"done in {time.monotonic() - t0:.1f} s: latent {tuple(latent.shape)}, mean |x| {latent.abs().mean():.3f}")
    print(f"output written to: {path}")
    print(f"ComfyUI log: {server.log_path}")


if __name__ == "__main__":
    main()
