"""Structural walking helpers shared by the matchers (DESIGN decision 1: anchor, then walk).

Matchers start from an anchor node and walk producers or users, looking through ops that only move data
(views, transposes, casts, splits) and stopping at the ops that end a subgraph (projections, matmuls,
softmax, embeddings). Walks are breadth-first and bounded so a strange graph cannot make them explode.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.fx import Node

from ..capture import CapturedGraph, WeightRef, node_value
from . import ops

WALK_LIMIT = 512


def input_nodes(node: Node) -> list[Node]:
    """Every node among ``node``'s args and kwargs, flattened, in order."""
    found: list[Node] = []

    def visit(arg: object) -> None:
        if isinstance(arg, Node):
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                visit(a)
        elif isinstance(arg, dict):
            for a in arg.values():
                visit(a)

    visit(node.args)
    visit(node.kwargs)
    return found


def arg(node: Node, index: int, name: str, default: object = None) -> object:
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def shape(node: object) -> tuple[int, ...] | None:
    """The traced shape of a node, with symbolic sizes replaced by their example hints."""
    val = node_value(node)
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(as_int(d) for d in val.shape)


def as_int(size: object) -> int:
    """A concrete int for a size: symbolic sizes give their hint (the example input's size)."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        hint = size.node.hint if size.node.hint is not None else size.node.maybe_as_int()
        if hint is not None:
            return int(hint)
    return int(size)  # type: ignore[call-overload]


def dtype(node: object) -> torch.dtype | None:
    val = node_value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


@dataclass
class Walk:
    """The result of a bounded walk: nodes where it stopped, nodes it went through, and whether it ran out."""

    found: list[Node]
    visited: list[Node]
    exhausted: bool = False


def walk_back(
    start: Node | Iterable[Node],
    stop: Callable[[Node], bool],
    through: Callable[[Node], bool],
    limit: int = WALK_LIMIT,
) -> Walk:
    """Walk producers breadth-first from ``start``; collect nodes where ``stop`` holds and do not pass them;
    pass only nodes where ``through`` holds."""
    return _walk(start, stop, through, input_nodes, limit)


def walk_forward(
    start: Node | Iterable[Node],
    stop: Callable[[Node], bool],
    through: Callable[[Node], bool],
    limit: int = WALK_LIMIT,
) -> Walk:
    """Walk users breadth-first from ``start`` (the mirror of :func:`walk_back`)."""
    return _walk(start, stop, through, lambda n: list(n.users), limit)


def _walk(
    start: Node | Iterable[Node],
    stop: Callable[[Node], bool],
    through: Callable[[Node], bool],
    step: Callable[[Node], list[Node]],
    limit: int,
) -> Walk:
    queue: deque[Node] = deque([start] if isinstance(start, Node) else start)
    seen: set[Node] = set(queue)
    found: list[Node] = []
    visited: list[Node] = []
    while queue:
        node = queue.popleft()
        if stop(node):
            found.append(node)
            continue
        visited.append(node)
        if len(visited) > limit:
            return Walk(found, visited, exhausted=True)
        if not through(node):
            continue
        for nxt in step(node):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return Walk(found, visited)


@dataclass
class LinearInfo:
    """A projection ``y = x W^T + b`` in any spelling: ``linear``, GPT-2's ``Conv1D`` ``addmm``, ``x @ W``."""

    node: Node
    input: Node
    weight: WeightRef
    bias: WeightRef | None
    in_features: int
    out_features: int
    weight_layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D / x @ W)

    @property
    def name(self) -> str:
        """The module path of the projection, e.g. ``model.layers.0.self_attn.q_proj``."""
        return self.weight.name.rsplit(".", 1)[0] if "." in self.weight.name else self.weight.name

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "weight": self.weight.name,
            "shape": list(self.weight.shape),
            "bias": self.bias.name if self.bias else None,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "layout": self.weight_layout,
        }


def _resolve_weight(cg: CapturedGraph, node: object) -> tuple[WeightRef | None, int]:
    """Follow casts, views and transposes from ``node`` to a weight; return it and the transposes passed."""
    transposes = 0
    for _ in range(8):
        if not isinstance(node, Node):
            return None, 0
        ref = cg.weight(node)
        if ref is not None:
            return ref, transposes
        cls = ops.op_class(node)
        if cls == ops.TRANSPOSE:
            transposes += 1
        elif cls not in (ops.CAST, ops.VIEW):
            return None, 0
        node = node.args[0] if node.args else None
    return None, 0


def linear_info(cg: CapturedGraph, node: Node) -> LinearInfo | None:
    """Describe ``node`` as a projection by a 2-D weight, or None if it is not one."""
    cls = ops.op_class(node)
    if cls == ops.LINEAR:
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        ref, t = _resolve_weight(cg, w)
        layout = "out_in" if t % 2 == 0 else "in_out"
    elif cls == ops.ADDMM:
        b, x, w = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
        ref, t = _resolve_weight(cg, w)
        layout = "in_out" if t % 2 == 0 else "out_in"
    elif cls == ops.MATMUL and node.target is not torch.einsum and len(node.args) >= 2:
        x, w, b = node.args[0], node.args[1], None
        ref, t = _resolve_weight(cg, w)
        layout = "in_out" if t % 2 == 0 else "out_in"
    else:
        return None
    if ref is None or len(ref.shape) != 2 or not isinstance(x, Node):
        return None
    bias_ref, _ = _resolve_weight(cg, b)
    rows, cols = ref.shape
    in_f, out_f = (cols, rows) if layout == "out_in" else (rows, cols)
    return LinearInfo(node, x, ref, bias_ref, in_f, out_f, layout)


# ``L['args'][0]`` / ``L['args'].0``: transformers >= 5.24 wraps forward, so the model is the wrapper's first argument
_DYNAMO_ROOT = re.compile(r"^L\[['\"](self|fn|model|mod)['\"]\]\.?|^L\[['\"]args['\"]\](\[0\]|\.0)\.?")


def module_path(node: Node) -> str | None:
    """The qualified name of the innermost module that called ``node``, from the tracer's ``nn_module_stack``.

    Weight names cannot tell which module used a tied weight (Dynamo lifts it once, under its first name); the
    module stack can. Dynamo spells paths ``L['self'].model.layers[0]``, export ``model.layers.0``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = _DYNAMO_ROOT.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".") or None


def common_prefix(names: Iterable[str]) -> str:
    """The longest dotted module path shared by ``names`` (``a.b.c.weight``, ``a.b.d.weight`` -> ``a.b``)."""
    split = [n.split(".") for n in names]
    if not split:
        return ""
    prefix: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)
