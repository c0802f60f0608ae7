"""Feed-forward matcher.

Anchor: an activation (silu, gelu, relu; tanh/erf/sigmoid for hand-written GELU and SiLU). Walk back through
element-wise ops to the projection that feeds it (gate, or up for plain MLPs) and forward to the projection
that consumes it (down). A multiplication on the way whose other operand comes from a second projection of the
same input (or the other half of a fused ``gate_up``) makes it gated.
"""

from __future__ import annotations

from torch.fx import Node

from ..capture import CapturedGraph
from . import ops
from .match import FFNMatch, NearMiss
from .walk import LinearInfo, Walk, arg, common_prefix, linear_info, module_path, walk_back, walk_forward

_THROUGH = frozenset({*ops.ELEMENTWISE, *ops.SHAPE_ONLY})


def _walk_to_projection(cg: CapturedGraph, start: Node | list[Node], forward: bool = False) -> Walk:
    stop = lambda n: linear_info(cg, n) is not None  # noqa: E731
    through = lambda n: ops.op_class(n) in _THROUGH  # noqa: E731
    return (walk_forward if forward else walk_back)(start, stop, through, limit=64)


def _slice_marker(walk: Walk) -> tuple[str, object] | None:
    """Which part of a fused projection a walk came through: (split node, index) or a slice's bounds."""
    for node in walk.visited:
        if ops.op_class(node) == ops.GETITEM and node.args and ops.is_op(node.args[0], ops.SPLIT):
            return node.args[0].name, node.args[1]
        if ops.op_class(node) in (ops.GETITEM, ops.SLICE) and len(node.args) > 1:
            return node.args[0].name if isinstance(node.args[0], Node) else "", str(node.args[1:])
    return None


def _activation_name(node: Node) -> str:
    cls = ops.op_class(node)
    if cls == ops.GELU and arg(node, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return {ops.TANH: "gelu_tanh", ops.ERF: "gelu", ops.SIGMOID: "silu"}.get(cls or "", cls or "?")


def match_ffn(cg: CapturedGraph, exclude: set[Node] | None = None) -> tuple[list[FFNMatch], list[NearMiss]]:
    """Every FFN block, in graph order; ``exclude`` holds nodes already claimed (attention softcapping)."""
    exclude = exclude or set()
    matches: list[FFNMatch] = []
    misses: list[NearMiss] = []
    seen_down: set[Node] = set()
    for node in list(cg.graph.nodes):
        cls = ops.op_class(node)
        if cls not in ops.ACTIVATIONS or node in exclude:
            continue
        result = _build(cg, node)
        if isinstance(result, str):
            if cls in ops.STRONG_ACTIVATIONS:
                misses.append(NearMiss("ffn", node.name, module_path(node) or "", result))
            continue
        if result.down.node in seen_down:
            continue
        seen_down.add(result.down.node)
        matches.append(result)
    return matches, misses


def _build(cg: CapturedGraph, act: Node) -> FFNMatch | str:
    inputs = [a for a in act.args[:1] if isinstance(a, Node)]
    back = _walk_to_projection(cg, inputs)
    if len(back.found) != 1:
        return f"activation is fed by {len(back.found)} projections, expected 1"
    fwd = _walk_to_projection(cg, act, forward=True)
    if len(fwd.found) != 1:
        return f"activation feeds {len(fwd.found)} projections, expected 1 (down)"
    act_in = linear_info(cg, back.found[0])
    down = linear_info(cg, fwd.found[0])
    assert act_in is not None and down is not None
    gate: LinearInfo | None = None
    up = act_in
    fused = False
    marker = _slice_marker(back)
    for node in fwd.visited:
        if ops.op_class(node) != ops.MUL:
            continue
        for other in node.args[:2]:
            if not isinstance(other, Node) or other in fwd.visited or other is act:
                continue
            side = _walk_to_projection(cg, other)
            if len(side.found) != 1 or side.found[0] is down.node:
                continue
            side_lin = linear_info(cg, side.found[0])
            if side_lin is None or side_lin.input is not act_in.input:
                continue
            if side_lin.node is act_in.node:
                side_marker = _slice_marker(side)
                if marker is None or side_marker is None or side_marker == marker:
                    continue  # the same tensor again: a composite activation such as tanh-GELU
                fused = True
            gate, up = act_in, side_lin
    names = [x.weight.name for x in (up, gate, down) if x is not None]
    hidden = down.out_features
    intermediate = down.in_features
    if act_in.in_features != hidden:
        return f"projection widths disagree: input {act_in.in_features}, output {hidden}"
    nodes = list(dict.fromkeys([*back.visited, act, *fwd.visited]))
    return FFNMatch(
        layer=common_prefix(names) or down.name, activation=_activation_name(act), gated=gate is not None,
        up=up, gate=gate, down=down, fused_gate_up=fused, hidden_size=hidden, intermediate_size=intermediate,
        anchor=act, nodes=nodes,
    )
