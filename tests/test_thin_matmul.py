"""The thin-matmul lowering: decode-sized products become fused reductions, wide ones stay BLAS, numerics hold."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dscompile.lower.thin_matmul import THIN_ROWS, ThinMatmulPass, compile_thin, is_thin

aten = torch.ops.aten


def _linear_graph(rows: int, bias: bool, scale: bool = False) -> tuple[torch.fx.GraphModule, tuple]:
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 24), torch.randn(40, 24), torch.randn(40)
    if scale:
        def fn(x, w, b):
            return torch.addmm(b, torch.relu(x), w.t(), beta=0.5)
    elif bias:
        def fn(x, w, b):
            return torch.addmm(b, torch.relu(x), w.t())
    else:
        def fn(x, w, b):
            return torch.mm(torch.relu(x), w.t())
    return make_fx(fn, tracing_mode="fake")(x, w, b), (x, w, b)


def _targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_thin_products_become_reductions_with_the_same_values(rows, bias):
    gm, inputs = _linear_graph(rows, bias)
    expected = gm(*inputs)
    ThinMatmulPass()(gm.graph)
    gm.recompile()
    assert not _targets(gm) & {aten.mm.default, aten.addmm.default}
    assert aten.sum.dim_IntList in _targets(gm)
    torch.testing.assert_close(gm(*inputs), expected, rtol=1e-5, atol=1e-5)
    # Inductor lowers from the nodes' fake values, so every new node carries one of the right shape.
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    (output,) = gm.graph.find_nodes(op="output")
    assert output.args[0].meta["val"].shape == expected.shape
    # Several rows: the activation is realised before the reduction, so its producer is not recomputed per row.
    assert (torch.ops.prims.inductor_force_stride_order.default in _targets(gm)) == (rows > 1)


def test_wide_and_scaled_products_keep_blas():
    wide, _ = _linear_graph(THIN_ROWS + 1, bias=True)
    ThinMatmulPass()(wide.graph)
    assert aten.addmm.default in _targets(wide)
    scaled, _ = _linear_graph(4, bias=True, scale=True)
    ThinMatmulPass()(scaled.graph)
    assert aten.addmm.default in _targets(scaled)


def test_only_concrete_small_row_counts_are_thin():
    assert is_thin(1) and is_thin(THIN_ROWS)
    assert not is_thin(THIN_ROWS + 1)
    assert not is_thin(torch.SymInt) and not is_thin(None)


def test_the_pass_has_a_cache_key():
    # Inductor's graph cache keys on it; without one a cached BLAS graph could come back.
    assert ThinMatmulPass().uuid() == ThinMatmulPass().uuid() is not None


@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_decode_sized_linear_skips_blas_and_matches(rows):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 64))
    x = torch.randn(rows, 1, 64)
    compiled = torch.compile(layer, backend=compile_thin, dynamic=False, fullgraph=True)
    with torch.no_grad():
        expected = layer(x)
        compiled(x)
        with torch.profiler.profile() as prof:
            got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    names = {event.key for event in prof.key_averages()}
    assert not names & {"aten::mm", "aten::addmm"}, names
