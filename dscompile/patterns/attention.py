"""Attention matcher.

Anchors: a ``scaled_dot_product_attention`` node, or the eager ``matmul -> [scale, mask, softcap] -> softmax ->
[dropout] -> matmul`` chain. From the anchor, Q, K and V are walked back to their projections (through views,
RoPE, q/k norms, GQA ``repeat_kv`` and cache concatenation); the output is walked forward to the output
projection.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..capture import CapturedGraph
from . import ops
from .mask import MaskProbe, read_masks
from .match import AttentionMatch, NearMiss
from .rope import find_rope
from .walk import (
    LinearInfo,
    Walk,
    arg,
    common_prefix,
    dtype,
    linear_info,
    module_path,
    shape,
    walk_back,
    walk_forward,
)

_BARRIERS = frozenset({ops.SDPA, ops.SOFTMAX, ops.MATMUL, ops.EMBEDDING, ops.ADDMM, ops.LINEAR})
_SCORE_CHAIN = frozenset({*ops.ELEMENTWISE, ops.MASKED_FILL, ops.WHERE, ops.VIEW, ops.CAST, ops.TRANSPOSE})


def _is_weightless_matmul(cg: CapturedGraph, node: Node) -> bool:
    return ops.op_class(node) == ops.MATMUL and linear_info(cg, node) is None


class _Anchor:
    """The pieces of one attention before projections are resolved."""

    def __init__(self, kind: str, node: Node, out: Node, q: object, k: object, v: object):
        self.kind, self.node, self.out = kind, node, out
        self.q, self.k, self.v = q, k, v
        self.chain: list[Node] = []
        self.mask: MaskProbe | None = None
        self.is_causal = False
        self.scale: float | None = None


def _sdpa_anchor(node: Node) -> _Anchor:
    anchor = _Anchor("sdpa", node, node, arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value"))
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, Node):
        anchor.mask = MaskProbe(mask, "allow" if _is_bool(mask) else "additive")
    anchor.is_causal = bool(arg(node, 5, "is_causal", False) is True)
    scale = node.kwargs.get("scale")
    anchor.scale = float(scale) if isinstance(scale, (int, float)) else None
    return anchor


def _is_bool(node: Node) -> bool:
    return dtype(node) == torch.bool


def eager_anchor(cg: CapturedGraph, softmax: Node) -> _Anchor | str:
    """The ``Q @ K^T -> ... -> softmax -> @ V`` chain around ``softmax`` (scores, mask, V matmul), or why not."""
    src = softmax.args[0] if softmax.args else None
    if not isinstance(src, Node):
        return "softmax without a tensor input"
    back = walk_back(src, stop=lambda n: _is_weightless_matmul(cg, n),
                     through=lambda n: ops.op_class(n) in _SCORE_CHAIN, limit=64)
    if len(back.found) != 1:
        return "softmax is not fed by one Q @ K^T matmul"
    fwd = walk_forward(softmax, stop=lambda n: _is_weightless_matmul(cg, n),
                       through=lambda n: n is softmax or ops.op_class(n) in (ops.DROPOUT, ops.CAST, ops.VIEW),
                       limit=16)
    if len(fwd.found) != 1:
        return "softmax output does not feed one probs @ V matmul"
    scores, out = back.found[0], fwd.found[0]
    q, kt = scores.args[0], scores.args[1]
    k = kt.args[0] if isinstance(kt, Node) and ops.op_class(kt) == ops.TRANSPOSE else kt
    if out.args[0] not in fwd.visited and out.args[0] is not softmax:
        return "softmax output is not the left operand of the value matmul"
    anchor = _Anchor("eager", out, out, q, k, out.args[1])
    chain = _score_chain(scores, back.visited)
    anchor.chain = [scores, *chain, softmax, *fwd.visited]
    for node in chain:
        cls = ops.op_class(node)
        if cls == ops.ADD:
            other = [a for a in node.args[:2] if isinstance(a, Node) and a not in chain and a is not scores]
            if other and len(shape(other[0]) or ()) >= 2:
                anchor.mask = MaskProbe(other[0], "additive")
        elif cls == ops.MASKED_FILL and isinstance(arg(node, 1, "mask"), Node):
            anchor.mask = MaskProbe(arg(node, 1, "mask"), "block")  # type: ignore[arg-type]
        elif cls == ops.WHERE and isinstance(node.args[0], Node):
            on_chain = node.args[1] in chain or node.args[1] is scores
            anchor.mask = MaskProbe(node.args[0], "allow" if on_chain else "block")
    return anchor


def _score_chain(scores: Node, visited: list[Node]) -> list[Node]:
    """The nodes between the scores matmul and softmax; the walk back also passed through the mask's own
    construction (a cast of an additive mask), which must not be mistaken for the scores path."""
    between = set(visited)
    on_path: set[Node] = set()
    frontier = [scores]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in between and user not in on_path:
                on_path.add(user)
                frontier.append(user)
    return [n for n in visited if n in on_path]


def _projection_walk(cg: CapturedGraph, start: object) -> Walk:
    def through(n: Node) -> bool:
        return n.op in ("call_function", "call_method") and ops.op_class(n) not in _BARRIERS

    return walk_back(start if isinstance(start, Node) else [], stop=lambda n: linear_info(cg, n) is not None,
                     through=through)


def _kv_heads_from_path(walk: Walk, at_anchor: tuple[int, ...] | None) -> int | None:
    """Heads before GQA repetition: the input of an expand/repeat on K's path, else K's heads at the anchor."""
    for node in walk.visited:
        if ops.op_class(node) in (ops.EXPAND, ops.REPEAT) and node.args and isinstance(node.args[0], Node):
            dims = shape(node.args[0]) or ()
            if len(dims) == 5:
                return dims[1]
            if len(dims) == 4:
                return dims[-3]
    return at_anchor[-3] if at_anchor and len(at_anchor) == 4 else None


def match_attention(cg: CapturedGraph) -> tuple[list[AttentionMatch], list[NearMiss]]:
    """Every attention block in graph order, and the anchors that did not make one."""
    matches: list[AttentionMatch] = []
    misses: list[NearMiss] = []
    probes: list[MaskProbe] = []
    for node in list(cg.graph.nodes):
        cls = ops.op_class(node)
        if cls == ops.SDPA:
            anchor: _Anchor | str = _sdpa_anchor(node)
        elif cls == ops.SOFTMAX:
            anchor = eager_anchor(cg, node)
        else:
            continue
        result = anchor if isinstance(anchor, str) else _build(cg, anchor)
        if isinstance(result, str):
            misses.append(NearMiss("attention", node.name, module_path(node) or "", result))
            continue
        matches.append(result)
        if anchor.mask is not None:
            probes.append(anchor.mask)
    _resolve_masks(cg, matches, probes)
    return matches, misses


def _single(cg: CapturedGraph, walk: Walk, what: str) -> LinearInfo | str:
    if walk.exhausted:
        return f"{what}: walk ran past its limit before reaching a projection"
    if len(walk.found) != 1:
        return f"{what}: expected one projection, found {len(walk.found)}"
    info = linear_info(cg, walk.found[0])
    return info if info is not None else f"{what}: not a projection"


def _build(cg: CapturedGraph, a: _Anchor) -> AttentionMatch | str:
    walks = {name: _projection_walk(cg, x) for name, x in (("q", a.q), ("k", a.k), ("v", a.v))}
    lins: dict[str, LinearInfo] = {}
    for name, walk in walks.items():
        got = _single(cg, walk, name)
        if isinstance(got, str):
            return got
        lins[name] = got
    q_shape, k_shape, v_shape = shape(a.q), shape(a.k), shape(a.v)
    if not q_shape or not k_shape or not v_shape:
        return "query/key/value shapes are unknown"
    head_dim, v_head_dim = q_shape[-1], v_shape[-1]
    fused = lins["q"].node is lins["k"].node or lins["k"].node is lins["v"].node
    n_heads = q_shape[-3] if len(q_shape) == 4 else lins["q"].out_features // head_dim
    if not fused:
        n_kv = lins["k"].out_features // head_dim
    else:
        n_kv = _kv_heads_from_path(walks["k"], k_shape) or n_heads
    if n_kv <= 0 or n_heads % n_kv:
        return f"heads {n_heads} not a multiple of KV heads {n_kv}"
    out = walk_forward(a.out, stop=lambda n: linear_info(cg, n) is not None,
                       through=lambda n: n is a.out or ops.op_class(n) in ops.SHAPE_ONLY, limit=32)
    o = linear_info(cg, out.found[0]) if len(out.found) == 1 else None
    names = [lins[x].weight.name for x in ("q", "k", "v")] + ([o.weight.name] if o else [])
    layer = common_prefix(names) or lins["q"].name
    q_path = walks["q"].visited
    nodes = list(dict.fromkeys([*q_path, *walks["k"].visited, *walks["v"].visited, *a.chain, a.node,
                                *out.visited]))
    return AttentionMatch(
        layer=layer, kind=a.kind, anchor=a.node, q=lins["q"], k=lins["k"], v=lins["v"], o=o,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, v_head_dim=v_head_dim, fused_qkv=fused,
        rope=find_rope(cg, q_path, head_dim),
        qk_norm=any(ops.op_class(n) in (ops.RSQRT, ops.RMS_NORM, ops.LAYER_NORM) for n in q_path),
        causal=True if a.is_causal else (None if a.mask else False), window=None, scale=a.scale,
        mask=a.mask.node if a.mask else None, nodes=nodes,
    )


def _resolve_masks(cg: CapturedGraph, matches: list[AttentionMatch], probes: list[MaskProbe]) -> None:
    read = read_masks(cg, probes)
    for m in matches:
        if m.mask is not None and m.mask.name in read:
            m.causal, m.window = read[m.mask.name]
