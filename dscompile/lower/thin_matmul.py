"""Decode-time matmuls as weight-streaming kernels, for CPUs where BLAS reads weights slowly.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix, so it is bound by how fast
the weights stream from memory. BLAS reads them well below the bandwidth: MKL's matrix-vector product on AMD
(11 against 31 GB/s on a 2-core EPYC), and on Intel as soon as there are several rows (8 rows: 9-15 GB/s against
28). :class:`ThinMatmulPass` rewrites such thin products into the native kernel ``dscompile::thin_linear``
(``ops/thin_linear.cpp``: 26 GB/s at 8 rows), or, where it cannot be built, into Inductor's vectorised C++
reduction over ``W[n, :] * x[m, :]``; wide ones (prefill) keep BLAS. It runs as Inductor's post-grad custom pass,
so Inductor's graph cache keys on it (a decomposition table would not be part of the key, and a cached BLAS graph
would come back).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor import inductor_prims
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._prims_common import make_contiguous_strides_for
from torch.fx import Graph, Node
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves

from ..capture import node_value
from ..ops import native

aten = torch.ops.aten

THIN_ROWS = 16
"""Products with at most this many rows are rewritten; above it BLAS's blocking wins."""


def is_thin(rows: Any) -> bool:
    """Only concrete row counts qualify: the decode step is compiled with static shapes."""
    return isinstance(rows, int) and rows <= THIN_ROWS


def emit(graph: Graph, target: Any, *args: Any) -> Node:
    """A new node with its fake value, which Inductor's lowering reads."""
    from torch._guards import detect_fake_mode

    node = graph.call_function(target, args)
    values = map_arg(args, node_value)
    fake_mode = detect_fake_mode([v for v in tree_leaves(values) if isinstance(v, torch.Tensor)])
    with fake_mode:
        node.meta["val"] = target(*values)
    return node


def _thin_product(graph: Graph, a: Node, b: Node) -> Node:
    """``a @ b`` as ``sum(b.t()[:, None, :] * a[None], -1).t()``.

    ``b`` is usually ``W.t()`` of a Linear weight ``W [N, K]``, so ``b.t()`` is ``W`` again and each output element
    reads one contiguous row of it. The output is laid out ``[N, M]`` then transposed, so a weight row serves all
    ``M`` inputs while it is in cache. The portable path, for machines where the native kernel cannot be built.
    """
    weight = emit(graph, aten.unsqueeze.default, emit(graph, aten.permute.default, b, [1, 0]), 1)
    rows = node_value(a)
    if rows.shape[0] > 1:
        # Realise ``a`` first: inlined into the reduction, its producer (a norm, say) would be recomputed for every
        # weight row and every input row. With one row, recomputing it is free next to reading the weight.
        a = emit(graph, inductor_prims.force_stride_order, a, list(make_contiguous_strides_for(rows.shape)))
    products = emit(graph, aten.mul.Tensor, weight, emit(graph, aten.unsqueeze.default, a, 0))
    return emit(graph, aten.permute.default, emit(graph, aten.sum.dim_IntList, products, [-1]), [1, 0])


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


def _kernel_fits(bias: Node | None, a: Node, b: Node) -> bool:
    """Whether ``dscompile::thin_linear`` takes this product: float32, the weight ``b.t()`` with unit column stride
    (a Linear weight or a slice of its rows), a plain bias."""
    a_val, b_val = node_value(a), node_value(b)
    bias_val = node_value(bias) if bias is not None else None
    return (a_val.dtype == torch.float32 and a_val.device.type == "cpu" and b_val.stride(0) == 1
            and (bias_val is None or (isinstance(bias_val, torch.Tensor) and bias_val.dim() == 1
                                      and bias_val.dtype == torch.float32)))


_INPUT_VIEWS = (aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default, aten.reshape.default,
                aten._unsafe_view.default)


def _input_key(a: Node) -> tuple[Any, ...]:
    """Products of one activation share this key: each reads it through its own reshape of the same node."""
    if a.op == "call_function" and a.target in (aten.reshape.default, aten.view.default):
        return (a.args[0], tuple(a.args[1]))  # type: ignore[arg-type]
    return (a,)


def _hoistable(node: Node, before: Node, order: dict[Node, int]) -> bool:
    """Whether ``node`` is defined before ``before``, or is a view (of views) of graph inputs that can move there:
    a carved MoE's flattened expert blocks are ``permute(view(weight))``."""
    if order[node] < order[before] or node.op in ("placeholder", "get_attr"):
        return True
    return node.op == "call_function" and node.target in _INPUT_VIEWS and all(
        _hoistable(arg, before, order) for arg in node.all_input_nodes)


def _hoist(node: Node, before: Node, order: dict[Node, int]) -> None:
    """Move ``node`` and the views and attributes it reads (see :func:`_hoistable`) up to just before ``before``."""
    if order[node] < order[before] or node.op == "placeholder":
        return
    for arg in node.all_input_nodes:
        _hoist(arg, before, order)
    before.prepend(node)
    order[node] = order[before] - 0.5


class ThinMatmulPass(CustomGraphPass):
    """Rewrites every ``mm``/``addmm`` with at most :data:`THIN_ROWS` rows into the native kernel, where it is
    built and takes the product (products of one activation in one call), else into a fused multiply-reduce."""

    def __init__(self, native_kernels: bool | None = None):
        self.native_kernels = native.load() if native_kernels is None else native_kernels

    def __call__(self, graph: Graph) -> None:
        groups: dict[tuple[Any, ...], list[tuple[Node, Node | None, Node, Node]]] = {}
        for node in list(graph.nodes):
            operands = _operands(node)
            if operands is None:
                continue
            bias, a, b = operands
            if self.native_kernels and _kernel_fits(bias, a, b):
                groups.setdefault(_input_key(a), []).append((node, bias, a, b))
                continue
            with graph.inserting_before(node):
                product = _thin_product(graph, a, b)
                if bias is not None:
                    product = emit(graph, aten.add.Tensor, bias, product)
            node.replace_all_uses_with(product)
            graph.erase_node(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for members in groups.values():
            first = members[0][0]
            if len(members) > 1 and all(_hoistable(b, first, order) and (bias is None or _hoistable(bias, first, order))
                                        for _, bias, _, b in members):
                self._together(graph, members, order)
            else:
                for member in members:
                    self._together(graph, [member], order)

    @staticmethod
    def _together(graph: Graph, members: list[tuple[Node, Node | None, Node, Node]], order: dict[Node, int]) -> None:
        """One kernel call for every product in ``members`` (they read the same activation); weights defined
        after the first product (views of graph inputs) move up to it."""
        first, _, a, _ = members[0]
        for _, bias, _, b in members:
            for operand in (b, bias):
                if isinstance(operand, Node):
                    _hoist(operand, first, order)
        with graph.inserting_before(first):
            weights = [emit(graph, aten.permute.default, b, [1, 0]) for _, _, _, b in members]
            if len(members) == 1:
                products = [emit(graph, torch.ops.dscompile.thin_linear.default, a, weights[0], members[0][1])]
            else:
                many = emit(graph, torch.ops.dscompile.thin_linear_many.default, a, weights,
                            [bias for _, bias, _, _ in members])
                products = [emit(graph, operator.getitem, many, i) for i in range(len(members))]
        for (node, _, _, _), product in zip(members, products):
            node.replace_all_uses_with(product)
            graph.erase_node(node)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__, *native.source_files())), self.native_kernels)
