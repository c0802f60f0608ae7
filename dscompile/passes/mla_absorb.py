"""MLA ``absorb`` mode in the runtime's program: attention reads the cached latent directly.

``reconstruct`` mode rebuilds K and V for every cache slot at every step, which costs
``capacity x rank x kv_width`` multiply-adds per layer and step. Here nothing is rebuilt (DeepSeek-V2's absorbed
decode): with keys ``k = U_k c`` (RoPE-free dimensions) and values ``v = U_v c``,

* ``q . k = (U_k^T q) . c``: each query is mapped into the latent space once, then scored against the latents;
* ``sum_t p_t v_t = U_v (sum_t p_t c_t)``: the probabilities weight the latents, and ``U_v`` maps the result once.

The few dimensions a layer keeps rotary (``mla_rope``) are cached as they are, per KV head, after rotation, and
add their own ``q . k`` term. A K bias adds the same amount to all of a query's scores and cancels in the softmax;
a V bias passes through unchanged because the probabilities sum to one.

Absorbing pays at decode, where one query meets many cached tokens. A prefill chunk has many queries, and scoring
each of them in the latent space would hold ``tokens x capacity`` scores per head in memory; so the program's
prefill graph instead rebuilds keys and values from the same caches for the model's own (fused) attention, and the
absorbed form lives in a second graph, ``CachedProgram.decode_gm``, that the runtime compiles for decoding. Both
are exact at full rank for models without RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from ..lowrank import JointFactors
from ..patterns import AttentionMatch
from .kv_cache import CachedProgram, LayerCache
from .mla_rope import keep_rotary, rope_sum

aten = torch.ops.aten
_INDEX_COPY = aten.index_copy_.default
_SDPA = aten.scaled_dot_product_attention.default


@dataclass
class LayerSite:
    """One layer's nodes in one graph of the program: the K/V projections' input, the Q and K projections, the
    writes of this step's K and V into the layer's caches, those caches, and the graph's ``cache_position``."""

    gm: GraphModule
    x: Node
    q: Node
    k: Node
    v_bias: Node | None
    k_store: Node
    v_store: Node
    k_cache: Node
    v_cache: Node
    position: Node

    @property
    def graph(self) -> Graph:
        return self.gm.graph


def absorb_layer(program: CachedProgram, i: int, f: JointFactors, rope_dims: tuple[int, ...], prefill: LayerSite,
                 decode: LayerSite) -> str | None:
    """Layer ``i`` caches its latent (and its rotary key dims): the prefill graph rebuilds keys and values from
    them for the model's own attention; the decode graph attends in the latent space. Returns why not when an
    attention or RoPE this rewrite needs is not found (nothing is changed then)."""
    attn = program.matches.attention[i]
    site = _attention_site(decode.k_store, decode.v_store)
    if site is None:
        return "the attention over the cache was not found"
    edits = [(prefill, prefill.k_store.args[3], prefill.k), (decode, decode.k_store.args[3], decode.k),
             (decode, site[1].args[0], decode.q)]
    prefill_query = _query_of(prefill)
    if prefill_query is not None:
        edits.append((prefill, prefill_query, prefill.q))
    if attn.rope is not None:
        if prefill_query is None or any(rope_sum(start, proj) is None for _, start, proj in edits):  # type: ignore[arg-type]
            return "the RoPE sum on its query or key path was not found"
        for where, start, proj in edits:
            keep_rotary(where.graph, start, proj, rope_dims, attn.rope.rotary_dim,  # type: ignore[arg-type]
                        lambda mask, gm=where.gm, name=f"mla_{i}_rope_keep_{proj.name}": _buffer(gm, name, mask))
    nope = tuple(d for d in range(attn.head_dim) if d not in rope_dims)
    layout = _Layout(attn, f.rank, len(nope))
    _rebuild(prefill, i, f, rope_dims, nope, layout)
    query = site[1].args[0]  # read after the RoPE edit, which redirected the attention to the partial rotation
    latents, up_k, up_v, rope_keys, rotary = _write_latent(decode, i, f, rope_dims)
    kind, node = site[0], site[1]
    graph = decode.graph
    with graph.inserting_before(node):
        plain = _index(decode.gm, f"mla_{i}_nope_index", nope) if rope_dims else None
        scores = layout.scores(graph, query, latents, up_k, plain, rope_keys, rotary)
    if kind == "sdpa":
        with graph.inserting_before(node):
            probs = _sdpa_probs(graph, node, scores, program.dtype, attn)
            out = layout.context(graph, probs, latents, up_v, decode.v_bias)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    else:
        node.replace_all_uses_with(scores)
        graph.erase_node(node)
        value_matmul = site[2]  # type: ignore[misc]
        with graph.inserting_before(value_matmul):
            out = layout.context(graph, value_matmul.args[0], latents, up_v, decode.v_bias)
        value_matmul.replace_all_uses_with(out)
        graph.erase_node(value_matmul)
    _drop_full_cache(decode)
    old = program.layers[i]
    program.layers[i] = LayerCache(old.layer, old.n_kv_heads, old.head_dim, old.v_head_dim, old.window, f.rank,
                                   len(rope_dims))
    return None


def _query_of(where: LayerSite) -> Node | None:
    """The query of the attention reading the layer's K cache in the prefill graph (SDPA or ``Q @ K^T``)."""
    for user in where.k_store.users:
        if user.target is _SDPA:
            return user.args[0]  # type: ignore[return-value]
    scores = _consumer(where.k_store, through_transpose=True)
    return scores.args[0] if scores is not None else None  # type: ignore[return-value]


def _write_latent(where: LayerSite, i: int, f: JointFactors, rope_dims: tuple[int, ...]
                  ) -> tuple[Node, Node, Node, Node | None, Node | None]:
    """New cache inputs for layer ``i`` and the writes of this step's latent (and rotated key dims) into them;
    returns the latent cache, the factors' nodes, the rotary key cache and the index of the rotary dims."""
    from .mla import register_factors  # mla imports this module

    graph = where.graph
    names = register_factors(where.gm, f"mla_{i}", f)
    with graph.inserting_before(where.k_cache):
        latent_cache = graph.placeholder(f"latent_cache_{i}")
        rope_cache = graph.placeholder(f"rope_key_cache_{i}") if rope_dims else None
    with graph.inserting_before(where.k_store):
        down, up_k, up_v = (graph.get_attr(n) for n in names)
        latent = graph.call_function(aten.linear.default, (where.x, down))
        latents = graph.call_function(_INDEX_COPY, (latent_cache, 1, where.position, latent))
        rope_keys = rotary = None
        if rope_cache is not None:
            rotary = _index(where.gm, f"mla_{i}_rope_index", rope_dims)
            picked = graph.call_function(aten.index_select.default, (where.k_store.args[3], -1, rotary))
            rope_keys = graph.call_function(_INDEX_COPY, (rope_cache, 2, where.position, picked))
    return latents, up_k, up_v, rope_keys, rotary


def _rebuild(where: LayerSite, i: int, f: JointFactors, rope_dims: tuple[int, ...], nope: tuple[int, ...],
             layout: _Layout) -> None:
    """Prefill: keys and values for every slot from the latent cache (unrotated dims) and the rotary key cache,
    in the caches' ``[batch, kv_heads, capacity, dim]`` layout, for the model's own (fused) attention. K's bias is
    left out: it adds the same amount to all of a query's scores."""
    latents, up_k, up_v, rope_keys, _ = _write_latent(where, i, f, rope_dims)
    graph = where.graph
    with graph.inserting_before(where.k_store):
        plain = layout.heads_first(graph, graph.call_function(aten.linear.default, (latents, up_k)), layout.nope)
        keys = plain
        if rope_keys is not None:
            order = _index(where.gm, f"mla_{i}_head_order", tuple(torch.tensor(nope + rope_dims).argsort().tolist()))
            joined = graph.call_function(aten.cat.default, ([plain, rope_keys], -1))
            keys = graph.call_function(aten.index_select.default, (joined, -1, order))
        values = layout.heads_first(graph, graph.call_function(aten.linear.default, (latents, up_v, where.v_bias)),
                                    layout.v_dim)
    where.k_store.replace_all_uses_with(keys)
    where.v_store.replace_all_uses_with(values)
    _drop_full_cache(where)


def _drop_full_cache(where: LayerSite) -> None:
    where.graph.eliminate_dead_code()  # GQA repeats and transposes of the old caches (their writes stay: impure)
    for node in (where.k_store, where.v_store, where.k_cache, where.v_cache):
        where.graph.erase_node(node)


class _Layout:
    """Head bookkeeping: query head ``h`` reads KV head ``h // group``; ``[B, H, T, x]`` tensors are regrouped to
    ``[B, Hkv, group * T, x]`` and back without naming the symbolic batch and token sizes."""

    def __init__(self, attn: AttentionMatch, rank: int, nope: int):
        self.kv_heads, self.group = attn.n_kv_heads, attn.n_heads // attn.n_kv_heads
        self.heads, self.rank, self.nope, self.v_dim = attn.n_heads, rank, nope, attn.v_head_dim

    def heads_first(self, graph: Graph, x: Node, dim: int) -> Node:
        """``[B, S, kv_heads * dim]`` as ``[B, kv_heads, S, dim]``."""
        split = graph.call_function(aten.unflatten.int, (x, -1, [self.kv_heads, dim]))
        return graph.call_function(aten.transpose.int, (split, 1, 2))

    def grouped(self, graph: Graph, x: Any) -> Node:
        split = graph.call_function(aten.unflatten.int, (x, 1, [self.kv_heads, self.group]))
        return graph.call_function(aten.flatten.using_ints, (split, 2, 3))

    def ungrouped(self, graph: Graph, x: Node) -> Node:
        split = graph.call_function(aten.unflatten.int, (x, 2, [self.group, -1]))
        return graph.call_function(aten.flatten.using_ints, (split, 1, 2))

    def scores(self, graph: Graph, query: Node, latents: Node, up_k: Node, plain: Node | None,
               rope_keys: Node | None, rotary: Node | None) -> Node:
        """``q . k`` for every query head and cache slot, ``[B, H, T, capacity]``."""
        q = self.grouped(graph, query)  # [B, Hkv, G*T, d]
        q_plain = graph.call_function(aten.index_select.default, (q, -1, plain)) if plain is not None else q
        up = graph.call_function(aten.view.default, (up_k, [self.kv_heads, self.nope, self.rank]))
        absorbed = graph.call_function(aten.matmul.default, (q_plain, up))  # [B, Hkv, G*T, r]
        flat = graph.call_function(aten.flatten.using_ints, (absorbed, 1, 2))  # [B, H*T, r]
        keys = graph.call_function(aten.transpose.int, (latents, 1, 2))
        scores = graph.call_function(aten.matmul.default, (flat, keys))  # [B, H*T, capacity]
        scores = graph.call_function(aten.unflatten.int, (scores, 1, [self.heads, -1]))
        if rope_keys is None:
            return scores
        q_rot = graph.call_function(aten.index_select.default, (q, -1, rotary))
        rot_t = graph.call_function(aten.transpose.int, (rope_keys, -2, -1))
        rope_scores = graph.call_function(aten.matmul.default, (q_rot, rot_t))  # [B, Hkv, G*T, capacity]
        return graph.call_function(aten.add.Tensor, (scores, self.ungrouped(graph, rope_scores)))

    def context(self, graph: Graph, probs: Any, latents: Node, up_v: Node, bias: Node | None) -> Node:
        """``sum_t p_t v_t`` as ``U_v (sum_t p_t c_t)``, ``[B, H, T, v_dim]``."""
        flat = graph.call_function(aten.flatten.using_ints, (probs, 1, 2))  # [B, H*T, capacity]
        mixed = graph.call_function(aten.matmul.default, (flat, latents))  # [B, H*T, r]
        grouped = graph.call_function(aten.unflatten.int, (mixed, 1, [self.kv_heads, -1]))
        up = graph.call_function(aten.view.default, (up_v, [self.kv_heads, self.v_dim, self.rank]))
        out = graph.call_function(aten.matmul.default, (grouped, graph.call_function(aten.transpose.int,
                                                                                      (up, 1, 2))))
        if bias is not None:
            per_head = graph.call_function(aten.view.default, (bias, [self.kv_heads, 1, self.v_dim]))
            out = graph.call_function(aten.add.Tensor, (out, per_head))
        return self.ungrouped(graph, out)


def _attention_site(k_store: Node, v_store: Node) -> tuple[str, Node] | tuple[str, Node, Node] | None:
    """``("sdpa", node)`` or ``("eager", scores matmul, value matmul)`` reading the layer's cache."""
    for user in k_store.users:
        if user.target is _SDPA and user.args[1] is k_store and user.args[2] is v_store:
            return "sdpa", user
    scores = _consumer(k_store, through_transpose=True)
    values = _consumer(v_store, through_transpose=False)
    if scores is None or values is None:
        return None
    return "eager", scores, values


def _consumer(store: Node, *, through_transpose: bool) -> Node | None:
    """The matmul reached from a cache store through GQA's repeat (and K's transpose)."""
    node = store
    for _ in range(3):
        users = list(node.users)
        if len(users) != 1:
            return None
        (node,) = users
        if node.target in (aten.matmul.default, aten.bmm.default):
            return node
        if node.target not in (aten.repeat_interleave.self_int, aten.transpose.int) or (
                node.target is aten.transpose.int and not through_transpose):
            return None
    return None


def _sdpa_probs(graph: Graph, sdpa: Node, scores: Node, dtype: torch.dtype, attn: AttentionMatch) -> Node:
    """SDPA's softmax(scale * scores + mask), in float32 like the math kernel."""
    scale = sdpa.kwargs.get("scale")
    if scale is None:
        scale = attn.head_dim ** -0.5
    scaled = graph.call_function(aten.mul.Tensor, (scores, scale))
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    if mask is not None:
        scaled = graph.call_function(aten.add.Tensor, (scaled, mask))
    if dtype != torch.float32:
        scaled = graph.call_function(aten._to_copy.default, (scaled,), {"dtype": torch.float32})
    probs = graph.call_function(aten.softmax.int, (scaled, -1))
    if dtype != torch.float32:
        probs = graph.call_function(aten._to_copy.default, (probs,), {"dtype": dtype})
    return probs


def _buffer(gm: GraphModule, name: str, value: torch.Tensor) -> Node:
    device = next(iter(gm.parameters())).device
    gm.register_buffer(name, value.to(device))
    return gm.graph.get_attr(name)


def _index(gm: GraphModule, name: str, dims: tuple[int, ...]) -> Node:
    return _buffer(gm, name, torch.tensor(dims, dtype=torch.long))
