"""Tensor-parallel layers (parallel_backend/parallel/tensor_parallel.py) on tp=2 gloo ranks vs torch's own layers.

Each rank shrinks a meta-device template (as the plan does to the host's layers before loading: here plain
nn.Linear, which keeps its class) or builds the head-sharded norm from one, fills its parameters by the layer's
declared `shard_dims` (what the loader slices; a row-parallel bias on TP rank 0 only, zeros elsewhere), and runs
its part; the test reassembles and compares with nn.Linear / nn.RMSNorm on the full tensors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from parallel_backend.config import ParallelConfig
from parallel_backend.parallel.tensor_parallel import (
    BIAS_ON_RANK0,
    HeadShardedRMSNorm,
    head_sharded_norm,
    host_column_parallel,
    host_row_parallel,
)

pytestmark = pytest.mark.engine  # no ComfyUI here: runs on one host only

TOL = 1e-5
TP = 2
D_IN, D_HID, D_OUT = 64, 96, 48
X_SHAPE = (2, 7, D_IN)


def _reference_modules():
    torch.manual_seed(0)
    col = nn.Linear(D_IN, D_HID)
    row = nn.Linear(D_HID, D_OUT)
    row_nobias = nn.Linear(D_HID, D_OUT, bias=False)
    norm = nn.RMSNorm(D_HID, eps=1e-6)
    norm_noeps = nn.RMSNorm(D_HID, eps=None)
    for n in (norm, norm_noeps):
        n.weight.data = 1 + 0.1 * torch.randn(D_HID)
    x = torch.randn(*X_SHAPE)
    return dict(col=col, row=row, row_nobias=row_nobias, norm=norm, norm_noeps=norm_noeps), x


def _load_shard(sharded: nn.Module, full: nn.Module) -> None:
    """Fill a sharded layer from the full one, slicing each parameter as `shard_dims` declares (the loader's rule:
    a BIAS_ON_RANK0 tensor is read whole by TP rank 0, the other ranks hold zeros)."""
    for pname, p in list(sharded.named_parameters(recurse=False)):
        src = getattr(full, pname).detach()
        dim = sharded.shard_dims.get(pname)
        if dim == BIAS_ON_RANK0:
            src = src if sharded.tp_rank == 0 else torch.zeros_like(src)
        elif dim is not None:
            src = src.chunk(sharded.tp_size, dim)[sharded.tp_rank]
        assert src.shape == p.shape, (pname, src.shape, p.shape)
        setattr(sharded, pname, nn.Parameter(src.clone(), requires_grad=False))


def _shard_of(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(TP, -1)[rank]


def _rank_fn(mesh, full, x):
    group, r, n = mesh.groups["tp"], mesh.coord["tp"], mesh.config.tp
    with torch.device("meta"):  # templates without weights, as the model is built before loading
        meta = {k: (nn.Linear(m.in_features, m.out_features, bias=m.bias is not None) if isinstance(m, nn.Linear)
                    else nn.RMSNorm(m.normalized_shape, eps=m.eps)) for k, m in full.items()}
    col = host_column_parallel(meta["col"], group, r, n)
    row = host_row_parallel(meta["row"], group, r, n)
    row_nobias = host_row_parallel(meta["row_nobias"], group, r, n)
    norm = head_sharded_norm(meta["norm"], group, r, n)
    norm_noeps = head_sharded_norm(meta["norm_noeps"], group, r, n)
    assert type(col) is nn.Linear and type(row) is nn.Linear  # the layer's own class, shrunk
    assert (col.in_features, col.out_features) == (D_IN, D_HID // n)
    assert (row.in_features, row.out_features) == (D_HID // n, D_OUT)
    assert isinstance(norm, HeadShardedRMSNorm) and row_nobias.bias is None
    for layer, key in ((col, "col"), (row, "row"), (row_nobias, "row_nobias"), (norm, "norm"),
                       (norm_noeps, "norm_noeps")):
        _load_shard(layer, full[key])
    with torch.no_grad():
        h = _shard_of(torch.randn(*X_SHAPE[:-1], D_HID, generator=torch.Generator().manual_seed(5)), r)
        return {
            "rank": r,
            "param_elems": {k: sum(p.numel() for p in m.parameters()) for k, m in
                            (("col", col), ("row", row), ("norm", norm))},
            "col": col(x),                       # this rank's output features
            "row": row(h),                       # full output (all-reduced)
            "row_nobias": row_nobias(h),
            "norm": norm(h),                     # this rank's channels, normalised over all of them
            "norm_noeps": norm_noeps(h),
            "mlp": row(norm(col(x))),            # column -> head norm -> row: no gather in between
            "norm_bf16": norm(h.bfloat16()),
        }


@pytest.fixture(scope="module")
def tp_results():
    from parallel_backend.testing.spmd import run_on_ranks

    full, x = _reference_modules()
    results = run_on_ranks(_rank_fn, ParallelConfig(world_size=TP, tp=TP, device="cpu", dtype="fp32"), full, x)
    return full, x, sorted(results, key=lambda r: r["rank"])


def _max(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.multirank
def test_column_parallel_linear(tp_results):
    full, x, res = tp_results
    ref = full["col"](x).detach()
    out = torch.cat([r["col"] for r in res], -1)
    assert out.shape == ref.shape
    assert res[0]["param_elems"]["col"] == (D_IN * D_HID + D_HID) // TP
    d = _max(out, ref)
    print(f"column parallel max abs diff {d:.2e}")
    assert d <= TOL


@pytest.mark.multirank
def test_row_parallel_linear(tp_results):
    full, x, res = tp_results
    h = torch.randn(*X_SHAPE[:-1], D_HID, generator=torch.Generator().manual_seed(5))
    for key in ("row", "row_nobias"):
        ref = full[key](h).detach()
        for r in res:  # every rank holds the full, reduced output
            assert r[key].shape == ref.shape
            d = _max(r[key], ref)
            print(f"{key} rank {r['rank']} max abs diff {d:.2e}")
            assert d <= TOL
    # the bias is held full size on every rank (zeros off TP rank 0), so the all-reduce adds it once
    assert res[0]["param_elems"]["row"] == D_OUT * D_HID // TP + D_OUT


@pytest.mark.multirank
def test_head_sharded_rmsnorm(tp_results):
    full, x, res = tp_results
    h = torch.randn(*X_SHAPE[:-1], D_HID, generator=torch.Generator().manual_seed(5))
    for key in ("norm", "norm_noeps"):
        ref = full[key](h).detach()
        out = torch.cat([r[key] for r in res], -1)
        d = _max(out, ref)
        print(f"{key} max abs diff {d:.2e}")
        assert d <= TOL
        # normalising each shard on its own would be wrong: the test can tell the difference
        local = torch.cat([nn.functional.rms_norm(_shard_of(h, i), (D_HID // TP,), _shard_of(full[key].weight, i),
                                                  full[key].eps) for i in range(TP)], -1)
        assert _max(local, ref) > 100 * TOL
    ref16 = full["norm"](h.bfloat16().float()).detach()
    out16 = torch.cat([r["norm_bf16"] for r in res], -1)
    assert out16.dtype == torch.bfloat16 and _max(out16.float(), ref16) <= 2e-2


@pytest.mark.multirank
def test_column_norm_row_chain(tp_results):
    full, x, res = tp_results
    with torch.no_grad():
        ref = full["row"](full["norm"](full["col"](x)))
    for r in res:
        d = _max(r["mlp"], ref)
        print(f"column->norm->row rank {r['rank']} max abs diff {d:.2e}")
        assert d <= TOL


def test_tp1_layers_are_plain_layers():
    """tp=1 (no group): the layers compute exactly what torch's do."""
    full, x = _reference_modules()
    col = host_column_parallel(full["col"], None, 0, 1)
    _load_shard(col, full["col"])
    norm = head_sharded_norm(full["norm"], None, 0, 1)
    _load_shard(norm, full["norm"])
    row = host_row_parallel(full["row"], None, 0, 1)
    _load_shard(row, full["row"])
    with torch.no_grad():
        assert _max(row(norm(col(x))), full["row"](full["norm"](full["col"](x)))) <= TOL


def test_shapes_that_do_not_split_are_refused():
    with torch.device("meta"):
        col, row = nn.Linear(8, 9), nn.Linear(9, 8)
    with pytest.raises(AssertionError):
        host_column_parallel(col, None, 0, 2)
    with pytest.raises(AssertionError):
        host_row_parallel(row, None, 0, 2)
