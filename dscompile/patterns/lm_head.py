"""LM-head matcher: the last projection whose output width is the vocabulary (the token embedding's rows)."""

from __future__ import annotations

from torch.fx import Node

from ..capture import CapturedGraph, WeightRef
from . import ops
from .match import LMHeadMatch, NearMiss
from .walk import linear_info, module_path, shape, walk_back, walk_forward


def token_embedding(cg: CapturedGraph) -> WeightRef | None:
    """The largest embedding table the graph looks tokens up in."""
    best: WeightRef | None = None
    for node in cg.graph.nodes:
        if ops.op_class(node) != ops.EMBEDDING:
            continue
        for candidate in node.args[:2]:
            ref = cg.weight(candidate)
            if ref is not None and len(ref.shape) == 2 and (best is None or ref.shape[0] > best.shape[0]):
                best = ref
    return best


def _same_tensor(a: WeightRef, b: WeightRef) -> bool:
    if a.node is b.node or a.tensor is b.tensor:
        return True
    if a.tensor is None or b.tensor is None or a.tensor.shape != b.tensor.shape:
        return False
    return a.tensor.data_ptr() == b.tensor.data_ptr()


def _drops_positions(node: Node) -> bool:
    """True for a slice that keeps fewer positions than it gets; HF's ``logits_to_keep=0`` slice keeps all."""
    before = shape(node.args[0]) if node.args else None
    after = shape(node)
    return before is not None and after is not None and before != after


def match_lm_head(cg: CapturedGraph) -> tuple[list[LMHeadMatch], list[NearMiss]]:
    projections = [info for n in cg.graph.nodes if (info := linear_info(cg, n)) is not None]
    if not projections:
        return [], []
    embedding = token_embedding(cg)
    if embedding is not None:
        vocab = embedding.shape[0]
        candidates = [p for p in projections if p.out_features == vocab]
        if not candidates:
            return [], [NearMiss("lm_head", embedding.name, "", f"no projection outputs the vocabulary ({vocab})")]
    else:
        candidates = [max(projections, key=lambda p: p.out_features)]
        vocab = candidates[0].out_features
    head = candidates[-1]
    shape_ops = (ops.VIEW, ops.CAST, ops.TRANSPOSE)
    back = walk_back(head.input, stop=lambda n: ops.op_class(n) in (ops.GETITEM, ops.SLICE),
                     through=lambda n: ops.op_class(n) in shape_ops, limit=8)
    fwd = walk_forward(head.node, stop=lambda n: ops.op_class(n) == ops.TANH,
                       through=lambda n: n is head.node or ops.op_class(n) in (*shape_ops, ops.DIV, ops.MUL),
                       limit=8)
    tied = embedding is not None and _same_tensor(head.weight, embedding)
    # A tied head's weight may be named after the embedding (Dynamo lifts it once); the caller module is not.
    layer = (module_path(head.node) if tied else None) or head.name
    nodes: list[Node] = [head.node]
    return [LMHeadMatch(
        layer=layer, linear=head, vocab_size=vocab, hidden_size=head.in_features, tied=tied,
        tied_to=embedding.name if tied and embedding is not None else None,
        sliced=any(_drops_positions(n) for n in back.found),
        softcap=bool(fwd.found), nodes=nodes,
    )], []
