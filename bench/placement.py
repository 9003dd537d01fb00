"""Predicted vs measured seconds of one model call per placement, over links slowed on purpose, beside ComfyUI's
native model on one process.

    python bench/placement.py [--links 100,25,10,1] [--delay-ms 0.05] [--preset wan2.1-1.3b] [--blocks 2]
                              [--latent 16,4,32,32]

For each emulated link (PDIT_EMULATE_LINK: every collective of the ranks waits as a link of that rate and latency
would), a 2-rank cfg=2 group starts (probing its links), loads the model and times a one-row call (cfg 1, a distill
LoRA's case) under each fold it can take: none (one rank computes, the other idles) and 2x into Ulysses; and a
two-row call (cond + uncond, cfg > 1), each replica one row. `predicted` is planner.predict_call_seconds on what the
group measured, `measured` the median call through WorkerGroup.forward (shared-memory transfer included), `auto` the
fold the group picks itself. `vs 1 rank`: the one-rank placement's measured seconds over this row's; `vs native`:
ComfyUI's native model's (one process, all cores) over this row's (> 1: faster).

CPU ranks on a small machine: both ranks share its cores, so a sequence split's compute gain is at most what the
cores give; the emulated links are in-process waits (parallel/collectives.py), not a network.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from _common import header, import_comfy, table, write_fast_checkpoint

from parallel_backend import planner
from parallel_backend.config import ParallelConfig
from parallel_backend.runtime.group import get_group, stop_all
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes


def _inputs(rows: int, latent: tuple, text_dim: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, *latent, generator=g), torch.full((rows,), 700.0),
            torch.randn(rows, 512, text_dim, generator=g))


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _native(path: str, latent: tuple, text_dim: int, repeats: int) -> dict:
    """ComfyUI's own model of the file in this process: seconds of a one-row and a two-row call."""
    import_comfy()
    import comfy.sd
    model = comfy.sd.load_diffusion_model(path).model.diffusion_model
    with torch.no_grad():
        return {rows: _median(lambda: model(*_inputs(rows, latent, text_dim)), repeats) for rows in (1, 2)}


def _link_rows(path: str, gbit: float, delay_ms: float, latent: tuple, text_dim: int, repeats: int) -> list:
    """[(call, placement, predicted, measured, auto?)] for one emulated link."""
    stop_all()
    os.environ["PDIT_EMULATE_LINK"] = f"gbit={gbit},delay_ms={delay_ms}"
    try:
        g = get_group(ParallelConfig(world_size=2, cfg=2, device="cpu", dtype="fp32"))
    finally:
        os.environ.pop("PDIT_EMULATE_LINK")
    g.measured_folds = True  # as auto mode sets it
    info = g.load(path, "fp32")
    out = []
    x, t, ctx = _inputs(1, latent, text_dim)
    g.forward(x, t, ctx)  # the group measures a block of this width, and picks its fold
    auto = g.last_placement[0].fold
    measured = next(iter(g.measured.values()))
    for rows in (1, 2):
        x, t, ctx = _inputs(rows, latent, text_dim)
        call = planner.CallShape(info["num_heads"] * info["head_dim"], info["num_heads"], info["num_layers"],
                                 planner.latent_tokens(tuple(x.shape), info["patch_size"]), rows, 4,
                                 info["out_channels"] * 4)
        for p in planner.fold_choices(g.config, rows, info["num_heads"]):
            seconds = _median(lambda: g.forward(x, t, ctx, fold=p.fold), repeats)
            out.append((f"{rows} row{'s' if rows > 1 else ''}", p.describe(rows),
                        planner.predict_call_seconds(p, call, measured), seconds, rows == 1 and p.fold == auto))
    links = ", ".join(f"{k} {v['bandwidth'] / 1e9:.3g} GB/s {v['latency'] * 1e3:.2f} ms"
                      for k, v in g.links.items() if isinstance(v, dict))
    print(f"  {gbit} Gbit/s + {delay_ms} ms emulated: measured {links}; probe {g.links['seconds']:.2f} s", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default="100,25,10,1", help="emulated rates, Gbit/s")
    ap.add_argument("--delay-ms", type=float, default=0.05, help="emulated latency per message")
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--latent", default="16,4,32,32", help="C,T,H,W of one row")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    header("placement: predicted vs measured seconds per call over emulated links (2 CPU ranks, cfg=2 group)")
    cfg = dict(WAN_PRESETS[args.preset], num_layers=args.blocks)
    latent = tuple(int(v) for v in args.latent.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdit_bench_") as tmp:
        path = write_fast_checkpoint(os.path.join(tmp, "model.safetensors"), wan_shapes(**cfg),
                                     dtype=torch.float32)
        native = _native(path, latent, cfg["text_dim"], args.repeats)
        for n, s in native.items():
            rows.append(["-", f"{n} row{'s' if n > 1 else ''}", "native ComfyUI (1 process)", "", f"{s:.3f}", "",
                         "1.00", ""])
        try:
            for gbit in (float(v) for v in args.links.split(",")):
                link = _link_rows(path, gbit, args.delay_ms, latent, cfg["text_dim"], args.repeats)
                one = next(m for c, d, _, m, _ in link if c == "1 row" and d == "one rank")
                for c, d, pred, meas, auto in link:
                    rows.append([f"{gbit:g}", c, d, f"{pred:.3f}", f"{meas:.3f}",
                                 f"{one / meas:.2f}" if c == "1 row" else "",
                                 f"{native[int(c[0])] / meas:.2f}", "auto" if auto else ""])
        finally:
            stop_all()
    print(f"model: {args.preset} width, {args.blocks} blocks, fp32; latent {latent} a row; median of {args.repeats}; "
          f"{os.cpu_count()} cores shared by all ranks (load average {os.getloadavg()[0]:.1f} at the end); "
          f"{args.delay_ms} ms per message")
    print(table(rows, ["Gbit/s", "call", "placement", "predicted s", "measured s", "vs 1 rank", "vs native",
                       "chosen"], align="lllrrrrl"))


if __name__ == "__main__":
    main()
