"""Split a fused QKV projection into separate Q, K and V projections, so MLA can route K and V through a latent.

GPT-2 (``c_attn``, a ``Conv1D``), Phi-3 (``qkv_proj``), nanoGPT and most hand-written transformers compute
``[q | k | v] = x W^T + b`` in one projection and cut the result into three column ranges (``split``, ``chunk`` or
slices). MLA factors ``[W_k; W_v]`` and replaces the K and V projections, which needs them as projections of their
own. This rewrite replaces each cut piece by a projection onto the weight rows (views of the fused weight, no copy)
that produce it: exact, as every output element is the same dot product.

Which columns a piece takes is found by running the graph's own cutting ops on a probe tensor holding each column's
index, so ``split``, ``chunk``, ``narrow``, ``slice`` and indexing at the ATen or the torch level are read alike.

Layouts that interleave heads (GPT-NeoX views the output as ``[..., heads, 3 * head_dim]``, optionally transposes
it, then cuts the last dimension) are split too: each piece's rows are every head's slice of the fused weight, a
gathered copy (no view can express them), and the new projection's output is viewed and transposed as the piece was.
Such a copy carries the address of its first row in the fused weight (:func:`source_ptr`), so a layer is known by
the same key in every graph, and a saved plan finds it again.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..capture import WeightRef, node_value
from ..patterns import AttentionMatch, ops
from ..patterns.walk import LinearInfo, shape


def split_fused_qkv(gm: GraphModule, attentions: Sequence[AttentionMatch],
                    weights: dict[str, WeightRef] | None = None) -> list[AttentionMatch]:
    """``attentions`` with every fused projection that is cut into ``q, k, v`` column ranges split in ``gm``.

    ``weights`` (a captured graph's weight table) learns the new weight nodes. Layers whose fused output is used
    any other way are returned unchanged (still fused; MLA says why it leaves them)."""
    out = list(attentions)
    changed = []
    for i, attn in enumerate(attentions):
        split = _split(gm, attn, f"qkv_{i}", weights) if attn.fused_qkv else None
        if split is not None:
            out[i] = split
            changed.append(i)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        live = set(gm.graph.nodes)
        for i in changed:
            out[i] = dataclasses.replace(out[i], nodes=[n for n in out[i].nodes if n in live])
    return out


@dataclasses.dataclass
class _Piece:
    """One of q, k, v: the node that holds it, the fused output columns it takes (in its own order), and, for an
    interleaved layout, the view and the shape ops that turn a projection's output into it."""

    node: Node
    columns: torch.Tensor
    view: Node | None = None
    chain: tuple[Node, ...] = ()

    @property
    def span(self) -> tuple[int, int] | None:
        """``(lo, hi)`` when the columns are one contiguous range (the rows can be a view of the fused weight)."""
        lo = int(self.columns[0])
        return (lo, lo + len(self.columns)) if torch.equal(self.columns, torch.arange(lo, lo + len(self.columns))) \
            else None


def source_ptr(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s first element lives in the model: its own address, or for a gathered copy of a fused
    weight's rows the address of its first row in that weight."""
    return getattr(tensor, "_dscompile_source_ptr", tensor.data_ptr())


def _rows(tensor: torch.Tensor, columns: torch.Tensor, piece: _Piece, out_in: bool, bias: bool) -> torch.Tensor:
    """The rows of a fused weight (``out_in`` layout, or ``in_out`` as Conv1D keeps it) or bias behind ``columns``."""
    tensor = tensor if bias or out_in else tensor.t()
    span = piece.span
    if span is not None:
        return tensor[span[0]:span[1]]
    rows = tensor[columns].contiguous()
    rows._dscompile_source_ptr = tensor[int(columns[0])].data_ptr()  # type: ignore[attr-defined]
    return rows


def _split(gm: GraphModule, attn: AttentionMatch, prefix: str,
           weights: dict[str, WeightRef] | None) -> AttentionMatch | None:
    fused = attn.k
    if fused.node is not attn.q.node or fused.node is not attn.v.node or fused.weight.tensor is None:
        return None
    out, x = _output_and_input(fused)
    if out is None or x is None:
        return None
    pieces = _pieces(out, fused.out_features) or _head_pieces(out, fused.out_features)
    sizes = [attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim, attn.n_kv_heads * attn.v_head_dim]
    if pieces is None or [len(p.columns) for p in pieces] != sizes or \
            not torch.equal(torch.cat([p.columns for p in pieces]).sort().values, torch.arange(sum(sizes))):
        return None
    graph = gm.graph
    aten = isinstance(fused.node.target, torch._ops.OpOverload)
    first = min((p.view or p.node for p in pieces), key=list(graph.nodes).index)
    parts: list[dict[str, WeightRef]] = []
    with graph.inserting_before(first):  # every weight before every projection: later rewrites may read any of them
        for part, piece in zip("qkv", pieces):
            refs: dict[str, WeightRef] = {}
            for kind, ref in (("weight", fused.weight), ("bias", fused.bias)):
                if ref is None or ref.tensor is None:
                    continue
                tensor = _rows(ref.tensor.detach(), piece.columns, piece, fused.weight_layout == "out_in",
                               kind == "bias")
                name = f"{prefix}_{part}_{kind}"
                gm.register_buffer(name, tensor, persistent=False)
                node = graph.get_attr(name)
                node.meta["val"] = tensor
                span = piece.span
                where = f"{span[0]}:{span[1]}" if span else f"{part} of each head"
                refs[kind] = WeightRef(f"{ref.name}[{where}]", node, tensor)
            parts.append(refs)
            if weights is not None:
                weights.update({ref.node.name: ref for ref in refs.values()})
    infos = []
    for refs, piece in zip(parts, pieces):
        with graph.inserting_before(first):
            bias = refs["bias"].node if "bias" in refs else None
            linear = graph.call_function(torch.ops.aten.linear.default if aten else F.linear,
                                         (x, refs["weight"].node, bias))
        linear.meta = dict(piece.node.meta)
        shaped = _reshape_like(graph, linear, piece, node_value(out))
        piece.node.replace_all_uses_with(shaped)
        infos.append(LinearInfo(node=linear, input=x, weight=refs["weight"], bias=refs.get("bias"),
                                in_features=fused.in_features, out_features=len(piece.columns),
                                weight_layout="out_in"))
    q, k, v = infos
    return dataclasses.replace(attn, q=q, k=k, v=v, fused_qkv=False,
                               nodes=[*attn.nodes, *(i.node for i in infos)])


def _output_and_input(fused: LinearInfo) -> tuple[Node | None, Node | None]:
    """The node holding the fused ``[..., q + k + v]`` output, and an input with the same leading dimensions.

    ``Conv1D`` flattens the tokens for its ``addmm`` and views the result back: the input before the flattening
    serves, so each new projection's output has the shape of the piece it replaces."""
    out = fused.node
    if ops.op_class(out) != ops.LINEAR and len(out.users) == 1:
        (user,) = out.users
        if ops.op_class(user) == ops.VIEW:
            out = user
    lead = (shape(out) or ())[:-1]
    for x in (fused.input, fused.input.args[0] if ops.op_class(fused.input) == ops.VIEW else None):
        if isinstance(x, Node) and (shape(x) or ())[:-1] == lead and lead:
            return out, x
    return out, None


def _pieces(out: Node, width: int) -> list[_Piece] | None:
    """The nodes that take column ranges of ``out`` (every use of it must be one), in column order."""
    val = node_value(out)
    if not isinstance(val, torch.Tensor) or val.shape[-1] != width:
        return None
    probe = torch.arange(width).reshape([1] * (val.dim() - 1) + [width])
    pieces = []
    for node, columns in _cut(out, probe) or []:
        span = _span(columns, probe.shape)
        if span is None:
            return None
        pieces.append(_Piece(node, torch.arange(*span)))
    return sorted(pieces, key=lambda p: int(p.columns[0])) or None


def _head_pieces(out: Node, width: int) -> list[_Piece] | None:
    """GPT-NeoX's layout: ``out`` viewed as ``[..., heads, per_head]``, transposed or not (the last dimension stays
    last), then cut along the last dimension; each piece's columns in its own ``(head, dim)`` order."""
    val = node_value(out)
    if len(out.users) != 1 or not isinstance(val, torch.Tensor) or val.shape[-1] != width:
        return None
    (view,) = out.users
    shaped = node_value(view)
    if ops.op_class(view) != ops.VIEW or not isinstance(shaped, torch.Tensor) or shaped.dim() != val.dim() + 1 \
            or tuple(shaped.shape[:-2]) != tuple(val.shape[:-1]):
        return None
    heads, per_head = int(shaped.shape[-2]), int(shaped.shape[-1])
    chain, node = [], view
    while len(node.users) == 1 and ops.op_class(next(iter(node.users))) == ops.TRANSPOSE:
        node = next(iter(node.users))
        chain.append(node)
    probe = torch.arange(width).reshape([1] * (val.dim() - 1) + [heads, per_head])
    for link in chain:
        probe = _run(link, probe)
        if not isinstance(probe, torch.Tensor) or probe.shape[-1] != per_head:
            return None  # the transposes must keep each head's values last
    pieces = []
    for piece, columns in _cut(node, probe) or []:
        flat = columns.movedim(-1, 0).reshape(columns.shape[-1], -1)  # [dims, heads]: each head's columns
        first = flat[0].sort().values
        if flat.shape[1] != heads or not torch.equal(flat, flat[:1] + torch.arange(flat.shape[0])[:, None]) \
                or not torch.equal(first // per_head, torch.arange(heads)):
            return None
        lo = int(first[0] % per_head)
        rows = (torch.arange(heads)[:, None] * per_head + lo + torch.arange(flat.shape[0])).reshape(-1)
        pieces.append(_Piece(piece, rows, view, tuple(chain)))
    return sorted(pieces, key=lambda p: int(p.columns[0])) or None


def _cut(node: Node, probe: torch.Tensor) -> list[tuple[Node, torch.Tensor]] | None:
    """What each user of ``node`` (a cutting op, or a split read by ``getitem``) takes of ``probe``."""
    taken: list[tuple[Node, Any]] = []
    for user in node.users:
        result = _run(user, probe)
        if result is None:
            return None
        if isinstance(result, torch.Tensor):
            taken.append((user, result))
        elif all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                 for u in user.users):
            taken += [(u, result[u.args[1]]) for u in user.users]
        else:
            return None
    return taken


def _reshape_like(graph: torch.fx.Graph, linear: Node, piece: _Piece, fused: torch.Tensor) -> Node:
    """``linear``'s output shaped as ``piece`` was: the same view (this piece's head width last) and transposes.
    Each new node's example value is computed from ``fused``, the fused output's."""
    if piece.view is None:
        return linear
    heads = int(node_value(piece.view).shape[-2])
    per_head = len(piece.columns) // heads
    value = fused[..., :len(piece.columns)]
    linear.meta = {"val": value}
    view = piece.view
    sizes = list(view.args[1]) if len(view.args) == 2 and isinstance(view.args[1], (list, tuple)) else \
        list(view.args[1:])
    if sizes[-1] != -1:
        sizes[-1] = per_head
    with graph.inserting_after(linear):
        node = graph.create_node(view.op, view.target, (linear, sizes) if len(view.args) == 2 and
                                 isinstance(view.args[1], (list, tuple)) else (linear, *sizes), dict(view.kwargs))
    value = value.reshape(*value.shape[:-1], heads, per_head)
    node.meta = {"val": value}
    for link in piece.chain:
        with graph.inserting_after(node):
            node = graph.create_node(link.op, link.target, (node, *link.args[1:]), dict(link.kwargs))
        value = _run(link, value)
        node.meta = {"val": value}
    return node


def _run(node: Node, probe: torch.Tensor) -> Any:
    """``node``'s op applied to ``probe`` in place of its first argument (None when that is not possible)."""
    args, kwargs = node.args[1:], node.kwargs
    if _has_node((args, kwargs)):
        return None
    if node.op == "call_function" and ops.op_class(node) in (ops.SPLIT, ops.SLICE, ops.GETITEM, ops.TRANSPOSE):
        fn: Any = node.target
    elif node.op == "call_method" and node.target in ("split", "chunk", "narrow", "__getitem__", "transpose",
                                                      "permute"):
        fn = getattr(torch.Tensor, str(node.target))
    else:
        return None
    try:
        return fn(probe, *args, **kwargs)
    except Exception:  # noqa: BLE001 - an op the probe cannot run: the layer stays fused
        return None


def _has_node(value: Any) -> bool:
    found = []
    torch.fx.node.map_aggregate(value, lambda a: found.append(a) if isinstance(a, Node) else None)
    return bool(found)


def _span(columns: Any, probe_shape: torch.Size) -> tuple[int, int] | None:
    """``(lo, hi)`` when ``columns`` keeps the leading dimensions and takes columns ``lo .. hi - 1`` in order."""
    if not isinstance(columns, torch.Tensor) or columns.dim() != len(probe_shape) or \
            tuple(columns.shape[:-1]) != tuple(probe_shape[:-1]) or columns.numel() == 0:
        return None
    flat = columns.reshape(-1)
    lo = int(flat[0])
    return (lo, lo + flat.numel()) if torch.equal(flat, torch.arange(lo, lo + flat.numel())) else None
