"""RoPE detection on the path from a query projection to its attention.

Styles: ``rotate_half`` (HF: ``x*cos + rotate_half(x)*sin``), ``interleaved`` (GPT-J: pairs stacked), and
``complex`` (Meta's ``view_as_complex(x) * freqs_cis``). The rotary width comes from the rotated tensor's last
dim (partial rotary when it is below the head size); the base from the frequency buffer the cos/sin derive
from.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from ..capture import CapturedGraph
from . import ops
from .match import RopeInfo
from .walk import input_nodes, shape, walk_back


def _trig_source(node: Node) -> Node | None:
    """The cos or sin node a multiplier derives from, if any (a short walk through views and casts)."""
    walk = walk_back(node, stop=lambda n: ops.is_op(n, ops.COS, ops.SIN), through=_cheap, limit=32)
    return walk.found[0] if walk.found else None


def _cheap(node: Node) -> bool:
    return ops.op_class(node) in (ops.VIEW, ops.CAST, ops.GETITEM, ops.SLICE, ops.MUL, ops.TRANSPOSE,
                                  ops.EXPAND) or node.op == "call_function"


def find_rope(cg: CapturedGraph, path: list[Node], head_dim: int) -> RopeInfo | None:
    """Look for a rotary embedding among the nodes of a query's path."""
    for node in path:
        if ops.op_class(node) == ops.COMPLEX and node.target in ops.targets_of(ops.COMPLEX) and shape(node):
            # view_as_complex input is (..., d/2, 2); its output (..., d/2).
            src = node.args[0] if node.args and isinstance(node.args[0], Node) else node
            dims = shape(src) or ()
            rotary = 2 * dims[-2] if len(dims) >= 2 and dims[-1] == 2 else 2 * (shape(node) or (0,))[-1]
            return RopeInfo("complex", rotary, _base_from_buffers(cg, path, rotary))
    for node in path:
        if ops.op_class(node) != ops.ADD:
            continue
        terms = [a for a in node.args[:2] if ops.is_op(a, ops.MUL)]
        if len(terms) != 2:
            continue
        trig = [_trig_of_mul(t) for t in terms]
        if not all(trig):
            continue
        rotary = (shape(node) or (head_dim,))[-1]
        style = "interleaved" if any(_uses_stack(t) for t in terms) else "rotate_half"
        base = _base_from_trig([t for t in trig if t is not None], cg, rotary)
        return RopeInfo(style, rotary, base)
    return None


def _trig_of_mul(mul: Node) -> Node | None:
    for operand in mul.args[:2]:
        if isinstance(operand, Node):
            trig = _trig_source(operand)
            if trig is not None:
                return trig
    return None


def _uses_stack(mul: Node) -> bool:
    return any(ops.is_op(a, ops.STACK) or (ops.is_op(a, ops.VIEW) and ops.is_op(a.args[0], ops.STACK))
               for a in mul.args[:2] if isinstance(a, Node))


def _base_from_trig(trig: list[Node], cg: CapturedGraph, rotary: int) -> float | None:
    walk = walk_back(trig, stop=lambda n: cg.weight(n) is not None, through=lambda n: True, limit=64)
    for node in walk.found:
        base = _base_from_tensor(cg.weight(node).tensor, rotary)  # type: ignore[union-attr]
        if base is not None:
            return base
    return None


def _base_from_buffers(cg: CapturedGraph, path: list[Node], rotary: int) -> float | None:
    """The complex style multiplies by a ``freqs_cis`` buffer: find it among the path's other inputs."""
    others = [n for p in path for n in input_nodes(p) if n not in path]
    walk = walk_back(others, stop=lambda n: cg.weight(n) is not None, through=lambda n: True, limit=64)
    for node in walk.found:
        base = _base_from_tensor(cg.weight(node).tensor, rotary)  # type: ignore[union-attr]
        if base is not None:
            return base
    return None


def _base_from_tensor(t: torch.Tensor | None, rotary: int) -> float | None:
    """Recover ``base`` from ``theta_1 = base ** (-2 / rotary)``, read from inv_freq, freqs_cis or a cos table."""
    if t is None or rotary < 4:
        return None
    t = t.detach()
    if t.is_complex() and t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:
        theta = float(torch.angle(t[1, 1]))
    elif t.is_floating_point() and t.dim() == 1 and t.numel() == rotary // 2 and t.numel() > 1:
        theta = float(t[1])
    else:
        return None
    if not 0 < theta < math.pi:
        return None
    return float(f"{theta ** (-rotary / 2.0):.5g}")
