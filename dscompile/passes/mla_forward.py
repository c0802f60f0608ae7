"""The ``mla`` pass on forward graphs: K and V are computed through one latent per token.

``torch.compile`` hands the backend cache-free forward graphs. There the pass replaces each matched layer's K and V
projections ``W_k x``, ``W_v x`` by ``U_k c`` and ``U_v c`` with ``c = D x``: the numbers the latent-cache runtime
computes, so a model compiled with an MLA profile is the model whose cache holds ``c`` (the memory itself is saved
where dscompile owns the cache: ``OptimizedModel.generate``). The factors come from the model's plan when
``optimize`` made one (calibrated on the user's text), or else from the graph's own example inputs, with a warning
about how few tokens that was. In ``absorb`` mode the query and key dimensions the plan does not keep rotary lose
their rotation here too, and the rotary key rows join the latent (``with_rotary_rows``), as the runtime caches them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..lowrank import JointFactors
from ..patterns import AttentionMatch
from .base import PassContext, PassResult, session_plan
from .cleanup import cleanup
from .mla import bias_node, plain_rows, register_factors
from .mla_plan import MLAPlan, plan_graph
from .mla_rope import keep_rotary, rope_sum
from .unfuse_qkv import split_fused_qkv


def mla_pass(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Route every supported attention's K and V through the plan's latent; report the layers left alone."""
    config = ctx.profile.mla
    assert config is not None, "the pass manager runs mla only for profiles with an MLA config"
    attentions = ctx.matches.attention = split_fused_qkv(gm, ctx.matches.attention, ctx.captured.weights)
    plan: MLAPlan = session_plan(ctx, "mla_plan", attentions, plan_graph, config)
    factors = plan.for_attentions(attentions)
    rope = plan.rope_for_attentions(attentions)
    result = PassResult("mla", gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for i, attn in enumerate(attentions):
        reason = plan.reason(attn)
        if reason is None and i not in factors:
            reason = "no factors for this layer in the plan"
        if reason is None and rope and attn.rope is not None:
            reason = _partial_rope(gm, attn, rope[i], f"mla_{i}")
        if reason is not None:
            result.skipped.append(f"{attn.layer}: {reason}")
            continue
        f = with_rotary_rows(attn, factors[i], rope[i]) if rope and rope[i] else factors[i]
        _through_latent(gm, attn, f, f"mla_{i}", order)
        result.rewrites += 1
        result.notes.append(f"{attn.layer}: K/V through a latent of {f.rank} "
                            f"(was {attn.kv_width} values per token)")
    if result.rewrites:
        cleanup(gm, ctx)
    return result


def _through_latent(gm: GraphModule, attn: AttentionMatch, f: JointFactors, prefix: str,
                    order: dict[Node, int]) -> None:
    graph = gm.graph
    down, up_k, up_v = register_factors(gm, prefix, f)
    first = min(attn.k.node, attn.v.node, key=order.__getitem__)
    linear = attn.k.node.target  # the graph's own spelling of a linear (torch-level or ATen)
    with graph.inserting_before(first):
        weights = [_attr(graph, gm, name) for name in (down, up_k, up_v)]
        latent = _call(graph, linear, attn.k.input, weights[0], None)
        k = _call(graph, linear, latent, weights[1], bias_node(graph, attn.k.node))
        v = _call(graph, linear, latent, weights[2], bias_node(graph, attn.v.node))
    attn.k.node.replace_all_uses_with(k)
    attn.v.node.replace_all_uses_with(v)
    graph.erase_node(attn.k.node)
    graph.erase_node(attn.v.node)


def with_rotary_rows(attn: AttentionMatch, f: JointFactors, rope_dims: tuple[int, ...]) -> JointFactors:
    """Absorb mode's cache as one latent: ``[D; W_k[rotary rows]]`` down, and up-projections that take each rotary
    key row from its own latent entry (what the runtime caches beside ``c``). Copies, rebuilt on every compile, so
    the forward follows healed factors after ``refresh``."""
    k = attn.k.weight.tensor
    assert k is not None
    rows = plain_rows(attn, rope_dims)
    plain = set(rows)
    rotary = [r for r in range(k.shape[0]) if r not in plain]
    down = torch.cat([f.down.detach(), k.detach()[rotary]])
    up_k = torch.zeros(k.shape[0], down.shape[0], dtype=down.dtype, device=down.device)
    up_k[rows, :f.rank] = f.ups[0].detach()
    up_k[rotary, f.rank + torch.arange(len(rotary))] = 1.0
    up_v = torch.cat([f.ups[1].detach(), f.ups[1].new_zeros(f.ups[1].shape[0], len(rotary))], 1)
    return JointFactors(down, [up_k, up_v], f.spectrum)


def _partial_rope(gm: GraphModule, attn: AttentionMatch, rope_dims: tuple[int, ...], prefix: str) -> str | None:
    """Leave the query and key dimensions outside ``rope_dims`` unrotated (the model the absorb runtime runs)."""
    assert attn.rope is not None
    projections = (attn.q.node, attn.k.node)
    if any(rope_sum(attn.anchor, p) is None for p in projections):  # check both before editing either
        return "the RoPE sum on its query or key path was not found"
    for projection in projections:
        name = f"{prefix}_rope_keep_{projection.name}"
        keep_rotary(gm.graph, attn.anchor, projection, rope_dims, attn.rope.rotary_dim,
                    lambda mask, name=name: _constant(gm.graph, gm, name, mask))
    return None


def _constant(graph: torch.fx.Graph, gm: GraphModule, name: str, value: torch.Tensor) -> Node:
    """A fixed tensor the rewrite needs, registered as a frozen parameter (lowering lifts those into inputs)."""
    gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    return _attr(graph, gm, name)


def _attr(graph: torch.fx.Graph, gm: GraphModule, name: str) -> Node:
    node = graph.get_attr(name)
    node.meta["val"] = getattr(gm, name)
    return node


def _call(graph: torch.fx.Graph, target: Any, x: Node, weight: Node, bias: Node | None) -> Node:
    """A linear node with its shape metadata (a fake value like its input's), which matching and lowering read."""
    from ..capture import node_value

    node = graph.call_function(target, (x, weight, bias))
    x_val = node_value(x)
    rows = node_value(weight).shape[0]
    if isinstance(x_val, torch.Tensor):
        node.meta["val"] = x_val.new_empty((*x_val.shape[:-1], rows))
    return node
