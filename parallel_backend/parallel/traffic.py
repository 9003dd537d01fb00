"""Bytes one rank moves per forward, by the way a model is made to fit: what auto mode compares (config.py) and
bench/comm_volume.py prints. Pure arithmetic (no torch), so the config can use it before any process starts."""
from __future__ import annotations


def weight_gather_bytes(block_weight_bytes: int, world: int) -> float:
    """Sharded weights over `world` ranks: each block is gathered whole once per forward, of which a rank held
    1 / N, so it receives (and sends) block bytes x (N - 1) / N, whatever the latent."""
    return block_weight_bytes * (world - 1) / world


def tensor_parallel_bytes(tokens: int, dim: int, layers: int, tp: int, rows: int = 1, elt: int = 2) -> float:
    """Tensor parallelism over `tp` ranks: per block 3 ring all-reduces (self-attention out, cross-attention out,
    FFN down) of the (rows x tokens, dim) activation, 2 (n - 1) / n of it each (bench/comm_volume.py's leading
    term; the qk-norm sums add < 0.1%)."""
    return 3 * 2 * rows * tokens * dim * elt * layers * (tp - 1) / tp


def ulysses_bytes(tokens: int, dim: int, layers: int, u: int, rows: int = 1, elt: int = 2) -> float:
    """Ulysses over `u` ranks: per block 4 all-to-alls (q, k, v to heads, the output back) of a rank's
    (rows x tokens / u, dim) share, (u - 1) / u of it each (bench/comm_volume.py's per-block term)."""
    return 4 * rows * tokens / u * dim * elt * layers * (u - 1) / u


def ring_bytes(tokens: int, dim: int, layers: int, r: int, rows: int = 1, elt: int = 2) -> float:
    """Ring attention over `r` ranks: per block r - 1 steps, each passing a rank's K and V share
    (2 x rows x tokens / r x dim) to the next rank."""
    return (r - 1) * 2 * rows * tokens / r * dim * elt * layers


def output_gather_bytes(tokens: int, out_per_token: int, n: int, rows: int = 1, elt: int = 2) -> float:
    """A sequence split over `n` ranks gathers the model's output once per forward: each rank sends its
    (rows x tokens / n) tokens' `out_per_token` values to the n - 1 others (bench/comm_volume.py's "outside")."""
    return rows * tokens / n * out_per_token * elt * (n - 1)
