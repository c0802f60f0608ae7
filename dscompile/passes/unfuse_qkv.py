"""Split a fused QKV projection into separate Q, K and V projections, so MLA can route K and V through a latent.

GPT-2 (``c_attn``, a ``Conv1D``), Phi-3 (``qkv_proj``), nanoGPT and most hand-written transformers compute
``[q | k | v] = x W^T + b`` in one projection and cut the result into three column ranges (``split``, ``chunk`` or
slices). MLA factors ``[W_k; W_v]`` and replaces the K and V projections, which needs them as projections of their
own. This rewrite replaces each cut piece by a projection onto the weight rows (views of the fused weight, no copy)
that produce it: exact, as every output element is the same dot product.

Which columns a piece takes is found by running the graph's own cutting ops on a probe tensor holding each column's
index, so ``split``, ``chunk``, ``narrow``, ``slice`` and indexing at the ATen or the torch level are read alike.
Layouts that interleave heads (GPT-NeoX views ``[..., heads, 3 * head_dim]`` before cutting) are left fused.
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


def _split(gm: GraphModule, attn: AttentionMatch, prefix: str,
           weights: dict[str, WeightRef] | None) -> AttentionMatch | None:
    fused = attn.k
    if fused.node is not attn.q.node or fused.node is not attn.v.node or fused.weight.tensor is None:
        return None
    out, x = _output_and_input(fused)
    if out is None or x is None:
        return None
    pieces = _pieces(out, fused.out_features)
    sizes = [attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim, attn.n_kv_heads * attn.v_head_dim]
    if pieces is None or [hi - lo for _, lo, hi in pieces] != sizes or pieces[0][1] != 0 \
            or any(a[2] != b[1] for a, b in zip(pieces, pieces[1:])):
        return None
    graph = gm.graph
    aten = isinstance(fused.node.target, torch._ops.OpOverload)
    first = min((p for p, _, _ in pieces), key=list(graph.nodes).index)
    parts: list[dict[str, WeightRef]] = []
    with graph.inserting_before(first):  # every weight before every projection: later rewrites may read any of them
        for part, (_, lo, hi) in zip("qkv", pieces):
            refs: dict[str, WeightRef] = {}
            for kind, ref in (("weight", fused.weight), ("bias", fused.bias)):
                if ref is None or ref.tensor is None:
                    continue
                tensor = ref.tensor.detach()
                tensor = tensor[lo:hi] if kind == "bias" or fused.weight_layout == "out_in" else tensor[:, lo:hi].t()
                name = f"{prefix}_{part}_{kind}"
                gm.register_buffer(name, tensor, persistent=False)
                node = graph.get_attr(name)
                node.meta["val"] = tensor
                refs[kind] = WeightRef(f"{ref.name}[{lo}:{hi}]", node, tensor)
            parts.append(refs)
            if weights is not None:
                weights.update({ref.node.name: ref for ref in refs.values()})
    infos = []
    for refs, (piece, lo, hi) in zip(parts, pieces):
        with graph.inserting_before(first):
            bias = refs["bias"].node if "bias" in refs else None
            linear = graph.call_function(torch.ops.aten.linear.default if aten else F.linear,
                                         (x, refs["weight"].node, bias))
        linear.meta = dict(piece.meta)
        piece.replace_all_uses_with(linear)
        infos.append(LinearInfo(node=linear, input=x, weight=refs["weight"], bias=refs.get("bias"),
                                in_features=fused.in_features, out_features=hi - lo, weight_layout="out_in"))
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


def _pieces(out: Node, width: int) -> list[tuple[Node, int, int]] | None:
    """The nodes that take column ranges of ``out`` (every use of it must be one), in column order."""
    val = node_value(out)
    if not isinstance(val, torch.Tensor) or val.shape[-1] != width:
        return None
    probe = torch.arange(width).reshape([1] * (val.dim() - 1) + [width])
    pieces: list[tuple[Node, int, int]] = []
    for user in out.users:
        result = _run(user, probe)
        if result is None:
            return None
        if isinstance(result, torch.Tensor):
            taken: list[tuple[Node, Any]] = [(user, result)]
        elif all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                 for u in user.users):
            taken = [(u, result[u.args[1]]) for u in user.users]
        else:
            return None
        for node, columns in taken:
            span = _span(columns, probe.shape)
            if span is None:
                return None
            pieces.append((node, *span))
    return sorted(pieces, key=lambda p: p[1])


def _run(node: Node, probe: torch.Tensor) -> Any:
    """``node``'s op applied to ``probe`` in place of its first argument (None when that is not possible)."""
    args, kwargs = node.args[1:], node.kwargs
    if _has_node((args, kwargs)):
        return None
    if node.op == "call_function" and ops.op_class(node) in (ops.SPLIT, ops.SLICE, ops.GETITEM):
        fn: Any = node.target
    elif node.op == "call_method" and node.target in ("split", "chunk", "narrow", "__getitem__"):
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
