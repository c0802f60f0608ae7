"""The thin-matmul lowering: decode-sized products become the native kernel (products of one activation in one
call) or, without it, fused reductions; wide ones stay BLAS; numerics hold."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dscompile.lower.decode_step import compile_decode_step
from dscompile.lower.thin_matmul import THIN_ROWS, ThinMatmulPass, is_thin
from dscompile.ops import native

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
    ThinMatmulPass(native_kernels=False)(gm.graph)
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
    for native_kernels in (False, True):
        wide, _ = _linear_graph(THIN_ROWS + 1, bias=True)
        ThinMatmulPass(native_kernels)(wide.graph)
        assert aten.addmm.default in _targets(wide)
        scaled, _ = _linear_graph(4, bias=True, scale=True)
        ThinMatmulPass(native_kernels)(scaled.graph)
        assert aten.addmm.default in _targets(scaled)


def test_only_concrete_small_row_counts_are_thin():
    assert is_thin(1) and is_thin(THIN_ROWS)
    assert not is_thin(THIN_ROWS + 1)
    assert not is_thin(torch.SymInt) and not is_thin(None)


def test_the_pass_has_a_cache_key():
    # Inductor's graph cache keys on it; without one a cached BLAS graph could come back. With and without the
    # native kernel the graphs differ, and so do the keys.
    assert ThinMatmulPass().uuid() == ThinMatmulPass().uuid() is not None
    assert ThinMatmulPass(native_kernels=False).uuid() != ThinMatmulPass(native_kernels=True).uuid()


@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_decode_sized_linear_skips_blas_and_matches(rows):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 64))
    x = torch.randn(rows, 1, 64)
    compiled = torch.compile(layer, backend=compile_decode_step, dynamic=False, fullgraph=True)
    with torch.no_grad():
        expected = layer(x)
        compiled(x)
        with torch.profiler.profile() as prof:
            got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    names = {event.key for event in prof.key_averages()}
    assert not names & {"aten::mm", "aten::addmm"}, names
    assert ("dscompile::thin_linear" in names) == native.load()


needs_native = pytest.mark.skipif(not native.load(), reason="native kernels need a C++ compiler")


@needs_native
@pytest.mark.parametrize("rows", [1, 8])
def test_products_of_one_activation_share_one_native_call(rows):
    """q, k and v (and gate and up) read one activation through reshapes of their own: one ``thin_linear_many``
    serves them; a product of another activation gets its own ``thin_linear``."""
    torch.manual_seed(0)
    x, wq, wk, wv, wo, bk = (torch.randn(rows, 24), torch.randn(24, 24), torch.randn(8, 24), torch.randn(8, 24),
                             torch.randn(24, 24), torch.randn(8))

    def fn(x, wq, wk, wv, wo, bk):
        h = torch.relu(x)
        q = h.reshape(rows, 24) @ wq.t()
        k = torch.addmm(bk, h.reshape(rows, 24), wk.t())
        v = h.reshape(rows, 24) @ wv.t()
        return (q + torch.cat([k, v], -1).repeat(1, 2)[:, :24]) @ wo.t()

    inputs = (x, wq, wk, wv, wo, bk)
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    expected = fn(*inputs)
    ThinMatmulPass(native_kernels=True)(gm.graph)
    gm.graph.lint()
    gm.recompile()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.dscompile.thin_linear_many.default) == 1
    assert calls.count(torch.ops.dscompile.thin_linear.default) == 1
    assert not set(calls) & {aten.mm.default, aten.addmm.default}
    torch.testing.assert_close(gm(*inputs), expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_half_precision_products_keep_the_reduction():
    x, w = torch.randn(4, 24, dtype=torch.bfloat16), torch.randn(40, 24, dtype=torch.bfloat16)
    gm = make_fx(lambda x, w: torch.mm(torch.relu(x), w.t()), tracing_mode="fake")(x, w)
    ThinMatmulPass(native_kernels=True)(gm.graph)
    assert torch.ops.dscompile.thin_linear.default not in _targets(gm) and aten.sum.dim_IntList in _targets(gm)
