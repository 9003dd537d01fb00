"""What crossing machines costs the pack per model evaluation, beside native ComfyUI in the same run: the same
4-rank mesh on one node and on 2 nodes x 2 ranks (node 1 = `python -m parallel_backend.runtime.node` on this
machine, over loopback), so the difference is the multi-node path itself - the op through the store, the input
broadcast and the output return - not the link.

    python bench/multinode.py                         # Wan 1.3B width, 2 blocks, CPU ranks
    python bench/multinode.py --latents "1,16,3,30,52" --repeats 7

Rows per latent (seconds per forward, median; ratio = native / row, > 1 is faster than native):
  native          ComfyUI's own WanModel forward in this process (world 1)
  1 node x 4      WorkerGroup on this machine (FileStore rendezvous, every input from shared memory)
  2 nodes x 2     node 0 = this process's WorkerGroup, node 1 = the node command; the same degrees
Meshes: ulysses2 x ring2 (the ring crosses the nodes; 1 row, cfg 1.0) and ulysses2 x cfg2 (cfg crosses; 2 rows).
CPU: 4 ranks share the machine's cores and loopback is no network, so the ratios say what the machinery costs per
call (milliseconds), not what a real link or GPUs give; bench/comm_volume.py table [5] has the link's share.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from bench._common import header, import_comfy, table, write_fast_checkpoint  # noqa: E402
from parallel_backend.config import ParallelConfig  # noqa: E402
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes  # noqa: E402

MESHES = {"ulysses2 x ring2 (ring across), 1 row": ({"ulysses": 2, "ring": 2}, 1),
          "ulysses2 x cfg2 (cfg across), 2 rows": ({"ulysses": 2, "cfg": 2}, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--latents", default="1,16,3,16,16;1,16,3,30,52", help="B,C,T,H,W per latent, ';'-separated "
                    "(B is taken from each mesh's row count)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    header("multi-node path: 2 nodes x 2 ranks (loopback) vs 1 node x 4 ranks vs native ComfyUI")
    import_comfy("cpu")
    from parallel_backend.runtime.group import WorkerGroup
    from parallel_backend.runtime.mesh import single_rank_mesh
    from parallel_backend.runtime.sharded_model import ShardedModel

    cfg = dict(WAN_PRESETS[args.preset], num_layers=args.blocks)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdit_bench_mn_") as tmp:
        models = os.path.join(tmp, "models", "diffusion_models")
        os.makedirs(models)
        path = write_fast_checkpoint(os.path.join(models, "model.safetensors"), wan_shapes(**cfg),
                                     dtype=torch.float32)
        secret = os.path.join(tmp, "secret")
        with open(secret, "w") as f:
            f.write(os.urandom(16).hex())
        os.chmod(secret, 0o600)
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([_REPO, os.environ.get("PYTHONPATH", "")])}
        node1 = subprocess.Popen([sys.executable, "-m", "parallel_backend.runtime.node", "--rendezvous",
                                  f"127.0.0.1:{port}", "--node-rank", "1", "--nodes", "2", "--nproc-per-node", "2",
                                  "--secret-file", secret, "--model-dir", os.path.join(tmp, "models"), "--device",
                                  "cpu"], cwd=_REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            native = ShardedModel(single_rank_mesh(ParallelConfig(world_size=1, device="cpu", dtype="fp32"),
                                                   torch.device("cpu")), path, "fp32")
            for name, (degrees, batch) in MESHES.items():
                one = WorkerGroup(ParallelConfig(world_size=4, device="cpu", dtype="fp32", threads_per_rank=1,
                                                 **degrees)).start()
                two = WorkerGroup(ParallelConfig(world_size=4, device="cpu", dtype="fp32", threads_per_rank=1,
                                                 nodes=2, ranks_per_node=2, rendezvous=f"127.0.0.1:{port}",
                                                 secret_file=secret, rejoin_timeout=60, **degrees)).start()
                try:
                    one.load(path, "fp32")
                    two.load(path, "fp32", names={path: "diffusion_models/model.safetensors"})
                    for spec in args.latents.split(";"):
                        shape = (batch, *(int(v) for v in spec.split(",")[1:]))
                        g = torch.Generator().manual_seed(0)
                        x, t = torch.randn(shape, generator=g), torch.full((batch,), 700.0)
                        ctx = torch.randn(batch, 512, cfg["text_dim"], generator=g)
                        want = native.forward_rows(x, t, ctx)
                        diff = max((one.forward(x, t, ctx) - want).abs().max().item(),
                                   (two.forward(x, t, ctx) - want).abs().max().item())
                        tn = _median(lambda: native.forward_rows(x, t, ctx), args.repeats)
                        t1 = _median(lambda: one.forward(x, t, ctx), args.repeats)
                        t2 = _median(lambda: two.forward(x, t, ctx), args.repeats)
                        tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
                        in_bytes = x.numel() * 4 + t.numel() * 4 + ctx.numel() * 4
                        rows.append([name, f"{shape}", tokens, f"{tn:.3f}", f"{t1:.3f}", f"{t2:.3f}",
                                     f"{tn / t1:.2f}x", f"{tn / t2:.2f}x", f"{(t2 - t1) * 1e3:+.1f}",
                                     f"{in_bytes / 2**20:.1f}", f"{diff:.1e}"])
                finally:
                    two.stop()
                    one.stop()
        finally:
            node1.kill()
            node1.wait()
    print(table(rows, ["mesh", "latent", "tokens", "native s", "1 node s", "2 nodes s", "1 node vs native",
                       "2 nodes vs native", "2 nodes - 1 node ms", "inputs MiB", "max diff"]))
    print("\n2 nodes - 1 node: the multi-node path per call (op through the store, input broadcast, output "
          "return, remote ranks' threads) on loopback; a real link adds bench/comm_volume.py [5]'s bytes / rate.")


if __name__ == "__main__":
    main()
