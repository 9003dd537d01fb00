"""What a group measures of its own hardware, for the planner's cost model (planner.predict_call_seconds).

- probe_links: run by every rank right after the process group forms, before the mesh's sub-groups exist: timed
  all-to-alls over all ranks and exchanges with the ring neighbours, each at a small and a large message (latency
  from the small one, bandwidth from the difference), through the same wrappers the model's collectives use
  (parallel/collectives.py, so its PDIT_EMULATE_LINK testing knob slows them alike). Every rank's numbers are
  gathered and the slowest kept: a collective runs at its slowest link. Exchanges between ranks on different nodes
  are a class of their own.
- time_block: one synthetic transformer block (projections, self-attention, cross-attention, FFN) of a model's
  width at the tokens a rank holds under each sequence share; the projections and the attention timed apart, since
  one scales with the tokens and the other with their square. The owner asks for it once per model shape and latent
  (op "time_block"); the group keeps the answers.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..parallel.collectives import all_to_all_single, ring_exchange

SMALL, LARGE = 4 << 10, 1 << 20  # bytes each rank sends per probe message
REPEATS = 3


def _timed(fn, repeats: int = REPEATS, before=None) -> float:
    """Median seconds of fn() after one warm-up call (`before`: run untimed ahead of each call)."""
    times = []
    for i in range(repeats + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_to_all_seconds(world: int, nbytes: int, device) -> float:
    x = torch.zeros(world, max(1, nbytes // (world - 1) // 4), dtype=torch.float32, device=device)

    def run():
        all_to_all_single(x, dist.group.WORLD)
        _sync(device)
    return _timed(run, before=dist.barrier)


def _exchange_seconds(nbytes: int, device) -> float:
    x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)

    def run():
        ring_exchange(x, dist.group.WORLD).wait()
        _sync(device)
    return _timed(run, before=dist.barrier)


def _fit(small_s: float, large_s: float, small_b: int, large_b: int) -> tuple:
    """(bytes per second, seconds per message) from two message sizes' times (a large message that took barely
    longer than the small one is noise: its time counts at least a tenth, so the bandwidth stays finite)."""
    return (large_b - small_b) / max(large_s - small_s, 0.1 * large_s, 1e-9), max(small_s, 1e-7)


def probe_links(world: int, local_ranks: int, device) -> dict:
    """Every rank calls this on the initialised default group; returns the same dict on every rank:
    all_to_all and p2p (and p2p_across between nodes) as {"bandwidth": B/s, "latency": s}, and the probe's
    seconds. One rank: {}."""
    if world < 2:
        return {}
    # the first functional collective of a process sets them up (seconds on gloo); the model's first forward would
    # pay it otherwise, so it is not part of the probe's time
    all_to_all_single(torch.zeros(world, 1, device=device), dist.group.WORLD)
    t0 = time.perf_counter()
    a2a = [_all_to_all_seconds(world, n, device) for n in (SMALL, LARGE)]
    p2p = [_exchange_seconds(n, device) for n in (SMALL, LARGE)]
    rank = dist.get_rank()
    crosses = float(rank // local_ranks != ((rank + 1) % world) // local_ranks)
    mine = torch.tensor([*_fit(*a2a, SMALL, LARGE), *_fit(*p2p, SMALL, LARGE), crosses], dtype=torch.float64)
    table = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(table, mine.to(device) if device.type == "cuda" else mine)
    rows = [t.cpu().tolist() for t in table]
    slowest = lambda rs, i: {"bandwidth": min(r[i] for r in rs), "latency": max(r[i + 1] for r in rs)}
    out = {"all_to_all": slowest(rows, 0)}
    inside = [r for r in rows if not r[4]]
    across = [r for r in rows if r[4]]
    out["p2p"] = slowest(inside or across, 2)
    if across:
        out["p2p_across"] = slowest(across, 2)
    out["seconds"] = time.perf_counter() - t0
    return out


class _SyntheticBlock(torch.nn.Module):
    """A DiT block's work without its weights' values: self-attention, cross-attention to the text, FFN."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.cq, self.ckv, self.cout = (torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim),
                                        torch.nn.Linear(dim, dim))
        self.up, self.down = torch.nn.Linear(dim, ffn), torch.nn.Linear(ffn, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def projections(self, x, ctx, heads: int):
        """Everything but the self-attention kernel: the norms, modulations (shift / scale / gate) and rotary
        embedding a DiT block applies elementwise count on a small latent."""
        shift, scale, gate = (torch.ones_like(x[:, :1]) * 0.1 for _ in range(3))
        q, k, v = self.qkv(self.norm(x) * (1 + scale) + shift).chunk(3, dim=-1)
        q, k = F.rms_norm(q, q.shape[-1:]), F.rms_norm(k, k.shape[-1:])
        q = q * torch.cos(q) + k * torch.sin(k)  # rotary's elementwise work
        x = x + self.out(q + k + v) * gate
        c = self.cq(self.norm(x))
        ck, cv = self.ckv(ctx).chunk(2, dim=-1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
        x = x + self.cout(F.scaled_dot_product_attention(split(c), split(ck), split(cv)).transpose(1, 2).flatten(2))
        return x + self.down(F.gelu(self.up(self.norm(x) * (1 + scale) + shift), approximate="tanh")) * gate


BLOCK_BUDGET_S = 0.25  # seconds one timed block may take: a larger latent is timed at fewer tokens and scaled


@torch.no_grad()
def time_block(device, dtype, dim: int, heads: int, ffn: int, tokens: int, context: int, shares: list) -> dict:
    """{"tokens": the tokens timed, "blocks": {share: (projection seconds, attention seconds)}} of one row through a
    synthetic block, for a rank holding tokens / share of the sequence (projections, cross-attention to `context`
    text tokens) and heads / share of the heads over the whole sequence (Ulysses' attention; Ring's does the same
    work in share steps). Timed at `tokens`, or at fewer (doubling from 256 while the next size stays within
    BLOCK_BUDGET_S) when the whole latent would take longer: planner.block_seconds scales them."""
    block = _SyntheticBlock(dim, ffn).to(device, dtype)
    ctx = torch.randn(1, max(1, context), dim, device=device, dtype=dtype)
    timed = min(tokens, 256)
    # doubling the tokens at most quadruples a block's time (its attention)
    while timed < tokens and 4 * sum(_block_seconds(block, ctx, heads, timed, 1, device, dtype, 1)) < BLOCK_BUDGET_S:
        timed = min(tokens, 2 * timed)
    return {"tokens": timed, "blocks": {s: _block_seconds(block, ctx, heads, timed, s, device, dtype)
                                        for s in shares}}


def _block_seconds(block, ctx, heads: int, tokens: int, share: int, device, dtype, repeats: int = REPEATS) -> tuple:
    """(projection seconds, attention seconds) of one row at `share` (see time_block)."""
    dim = ctx.shape[-1]
    x = torch.randn(1, max(1, tokens // share), dim, device=device, dtype=dtype)
    h = max(1, heads // share)
    q = torch.randn(1, h, tokens, dim // heads, device=device, dtype=dtype)

    def proj():
        block.projections(x, ctx, heads)
        _sync(device)

    def attn():
        F.scaled_dot_product_attention(q, q, q)
        _sync(device)
    scale = heads / share / h  # heads that do not split: a rank still does 1 / share of the work
    return _timed(proj, repeats), _timed(attn, repeats) * scale
