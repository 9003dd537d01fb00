"""Inputs for one forward of the tiny Wan (parallel_backend.testing.synthetic's "tiny" preset)."""
import torch


def wan_inputs(batch=2, seed=0):
    """x (B, 16, 2, 8, 8), per-row timesteps from 900 down to 100, and a 12-token umt5-width context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 2, 8, 8, generator=g)
    t = torch.linspace(900.0, 100.0, batch)
    ctx = torch.randn(batch, 12, 4096, generator=g)
    return x, t, ctx
