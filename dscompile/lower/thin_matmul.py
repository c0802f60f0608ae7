"""Decode-time matmuls as fused multiply-reduce loops, for CPUs where BLAS reads weights slowly.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix, so it is bound by how fast
the weights stream from memory. On CPUs where the BLAS library takes a generic path (MKL on AMD, for one), its
matrix-vector products read weights at well under half the memory bandwidth, while Inductor's vectorised C++
reduction over ``W[n, :] * x[m, :]`` reads them at nearly full bandwidth (measured on a 2-core EPYC: 11 against
31 GB/s). :class:`ThinMatmulPass` hands such thin products to Inductor as a reduction; wide ones (prefill) keep
BLAS. It runs as Inductor's post-grad custom pass, so Inductor's graph cache keys on it (a decomposition table
would not be part of the key, and a cached BLAS graph would come back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._inductor import inductor_prims
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._prims_common import make_contiguous_strides_for
from torch.fx import Graph, GraphModule, Node

from ..capture import node_value

aten = torch.ops.aten

THIN_ROWS = 16
"""Products with at most this many rows are rewritten; above it BLAS's blocking wins."""


def is_thin(rows: Any) -> bool:
    """Only concrete row counts qualify: the decode step is compiled with static shapes."""
    return isinstance(rows, int) and rows <= THIN_ROWS


def _emit(graph: Graph, target: Any, *args: Any) -> Node:
    """A new node with its fake value, which Inductor's lowering reads."""
    from torch._guards import detect_fake_mode

    node = graph.call_function(target, args)
    values = [node_value(a) for a in args]
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with fake_mode:
        node.meta["val"] = target(*values)
    return node


def _thin_product(graph: Graph, a: Node, b: Node) -> Node:
    """``a @ b`` as ``sum(b.t()[:, None, :] * a[None], -1).t()``.

    ``b`` is usually ``W.t()`` of a Linear weight ``W [N, K]``, so ``b.t()`` is ``W`` again and each output element
    reads one contiguous row of it. The output is laid out ``[N, M]`` then transposed, so a weight row serves all
    ``M`` inputs while it is in cache. (A hand-written register-blocked kernel for 2-16 rows was tried: in the
    whole decode step at batch 8 it was no faster than this reduction.)
    """
    weight = _emit(graph, aten.unsqueeze.default, _emit(graph, aten.permute.default, b, [1, 0]), 1)
    rows = node_value(a)
    if rows.shape[0] > 1:
        # Realise ``a`` first: inlined into the reduction, its producer (a norm, say) would be recomputed for every
        # weight row and every input row. With one row, recomputing it is free next to reading the weight.
        a = _emit(graph, inductor_prims.force_stride_order, a, list(make_contiguous_strides_for(rows.shape)))
    products = _emit(graph, aten.mul.Tensor, weight, _emit(graph, aten.unsqueeze.default, a, 0))
    return _emit(graph, aten.permute.default, _emit(graph, aten.sum.dim_IntList, products, [-1]), [1, 0])


def _operands(node: Node) -> tuple[Node | None, Node, Node] | None:
    """(bias, a, b) of a thin ``mm``/plain ``addmm``; None for anything else."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default:
        bias, (a, b) = None, node.args[:2]
    elif node.target is aten.addmm.default and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        bias, a, b = node.args[:3]
    else:
        return None
    a_val, b_val = node_value(a), node_value(b)
    if not (isinstance(a_val, torch.Tensor) and isinstance(b_val, torch.Tensor)) or a_val.dtype != b_val.dtype:
        return None
    return (bias, a, b) if is_thin(a_val.shape[0]) else None


class ThinMatmulPass(CustomGraphPass):
    """Rewrites every ``mm``/``addmm`` with at most :data:`THIN_ROWS` rows into a fused multiply-reduce."""

    def __call__(self, graph: Graph) -> None:
        for node in list(graph.nodes):
            operands = _operands(node)
            if operands is None:
                continue
            bias, a, b = operands
            with graph.inserting_before(node):
                product = _thin_product(graph, a, b)
                if bias is not None:
                    product = _emit(graph, aten.add.Tensor, bias, product)
            node.replace_all_uses_with(product)
            graph.erase_node(node)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def compile_thin(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """A ``torch.compile`` backend: Inductor with thin matmuls as reductions (CPU decode steps)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches={"post_grad_custom_post_pass": ThinMatmulPass()})
