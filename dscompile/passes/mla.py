"""The ``mla`` pass (``reconstruct`` mode): the runtime's cache keeps one latent per token instead of K and V.

Per attention layer, ``[W_k; W_v]`` is factored through a latent of width ``r`` (``dscompile.lowrank``, whitened by
calibration statistics of the projection input). The program then computes ``c = D x`` for the step's tokens,
writes ``c`` into the layer's latent cache ``[batch, capacity, r]``, and rebuilds keys and values for every cache
slot as ``U_k c`` and ``U_v c``, replaying the model's own head reshaping and rotary embedding on them (the rotary
part with each slot's position id, which the program keeps in one shared ``[batch, capacity]`` cache). The
cache shrinks from ``2 * kv_heads * head_dim`` to ``r`` values per token and layer; at ``r`` equal to the full
K/V width the outputs are the original's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from ..calibrate import Gram, record_grams
from ..errors import ConfigError
from ..lowrank import JointFactors, allocate_ranks, joint_factorize
from ..patterns import AttentionMatch, ops
from .kv_cache import CachedProgram, LayerCache, same_size, seq_symbol
from .mla_absorb import LayerSite, absorb_layer
from .mla_rope import reaches

log = logging.getLogger("dscompile")

_INDEX_COPY = torch.ops.aten.index_copy_.default


@dataclass
class MLAResult:
    """What the pass did: ranks per rewritten layer, and the layers it left alone with the reason."""

    ranks: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)


def kv_widths(program: CachedProgram) -> list[int]:
    """Values per token each layer caches without MLA (K plus V)."""
    return [layer.kv_values for layer in program.layers]


def calibrate(program: CachedProgram, batches: Sequence[torch.Tensor]) -> dict[int, Gram]:
    """Second moments of every attention's K/V projection input over ``batches`` of token ids (one prefill each)."""
    from ..runtime.generate import prefill_logits

    inputs = [attn.k.input for attn in program.matches.attention]
    unique = list(dict.fromkeys(inputs))
    with record_grams(program.gm, unique) as grams, torch.no_grad():
        for ids in batches:
            prefill_logits(program, ids)
    return {i: grams[node.name] for i, node in enumerate(inputs)}


def unsupported_reason(attn: AttentionMatch) -> str | None:
    """Why a layer's K and V cannot go through one latent yet, or None when they can."""
    if attn.fused_qkv:
        return "fused QKV projection not cut into q, k, v (its output is also read some other way)"
    if attn.k.weight_layout != "out_in" or attn.v.weight_layout != "out_in":
        return "transposed K/V projection weights (x @ W) are not supported yet"
    if not ops.is_op(attn.k.node, ops.LINEAR) or not ops.is_op(attn.v.node, ops.LINEAR):
        return "K or V is not computed by a linear call"
    if attn.k.input is not attn.v.input:
        return "K and V are projected from different inputs"
    if attn.k.weight.tensor is None or attn.v.weight.tensor is None:
        return "the K/V weights are not known at compile time"
    return None


def factorize(program: CachedProgram, grams: dict[int, Gram] | None, kv_ratio: float, *,
              v_weight: float = 1.0, strategy: str = "uniform", ranks: Sequence[int] | None = None,
              shrinkage: float = 0.0) -> dict[int, JointFactors]:
    """Joint K/V factors for the program's layers (see :func:`factorize_attention`)."""
    return factorize_attention(program.matches.attention, grams, kv_ratio, v_weight=v_weight, strategy=strategy,
                               ranks=ranks, shrinkage=shrinkage)


def factorize_attention(attentions: Sequence[AttentionMatch], grams: dict[int, Gram] | None, kv_ratio: float, *,
                        v_weight: float = 1.0, strategy: str = "uniform", ranks: Sequence[int] | None = None,
                        rope_dims: dict[int, tuple[int, ...]] | None = None, shrinkage: float = 0.0
                        ) -> dict[int, JointFactors]:
    """Joint K/V factors for every layer that can take a latent (by index in ``attentions``), with ranks from a
    global budget of ``kv_ratio`` of those layers' cached values, or ``ranks`` given per layer.

    ``rope_dims`` (absorb mode) names, per layer, the head dimensions whose keys stay rotary and are cached as they
    are: those K rows are left out of the factorization (``ups[0]`` holds the other rows, head by head) and their
    cached values come out of the budget. ``shrinkage`` pulls each calibration covariance toward its diagonal before
    the whitening (:func:`dscompile.lowrank.whitening`)."""
    full: dict[int, JointFactors] = {}
    reserved = 0
    for i, attn in enumerate(attentions):
        if unsupported_reason(attn) is not None or (rope_dims is not None and i not in rope_dims):
            continue
        k, v = attn.k.weight.tensor, attn.v.weight.tensor
        if rope_dims is not None:
            k = k[plain_rows(attn, rope_dims[i])]
            reserved += attn.n_kv_heads * len(rope_dims[i])
        width = min(k.shape[0] + v.shape[0], k.shape[1])
        full[i] = joint_factorize([k, v], width, layer_covariance(grams, i), scales=(1.0, v_weight),
                                  shrinkage=shrinkage)
    if not full:
        return {}
    if ranks is None:
        ranks = budget_ranks([attentions[i].kv_width for i in full], list(full.values()), kv_ratio, reserved,
                             strategy)
    elif len(ranks) != len(full):
        raise ConfigError(f"ranks needs one entry per factorable layer ({len(full)}), got {len(ranks)}")
    out: dict[int, JointFactors] = {}
    for (i, f), r in zip(full.items(), ranks):
        if not 1 <= r <= f.rank:
            raise ConfigError(f"rank {r} for layer {i} is outside [1, {f.rank}] (its K/V width)")
        out[i] = JointFactors(f.down[:r].contiguous(), [u[:, :r].contiguous() for u in f.ups], f.spectrum)
    return out


def budget_ranks(kv_widths: Sequence[int], full: Sequence[JointFactors], kv_ratio: float, reserved: int = 0,
                 strategy: str = "uniform") -> list[int]:
    """Latent ranks for layers of ``kv_widths`` cached values each (``full``: their full-rank factors) that keep
    ``kv_ratio`` of those values, ``reserved`` of them going to rotary key dimensions cached as they are."""
    if not 0.0 < kv_ratio <= 1.0:
        raise ConfigError(f"kv_ratio must be in (0, 1], got {kv_ratio}")
    budget = round(kv_ratio * sum(kv_widths)) - reserved
    if budget < len(full) and reserved:
        raise ConfigError(f"kv_ratio={kv_ratio} leaves no room for a latent once the rotary key dimensions "
                          f"({reserved} values per token) are cached: raise kv_ratio or lower mla.rope_dims")
    budget = min(max(budget, len(full)), sum(f.rank for f in full))
    return allocate_ranks([f.spectrum for f in full], budget, strategy=strategy)


def layer_covariance(grams: dict[int, Gram] | None, i: int) -> torch.Tensor | None:
    """Layer ``i``'s calibration covariance of its K/V projection input, if calibration saw it."""
    return grams[i].covariance() if grams is not None and i in grams else None


def plain_rows(attn: AttentionMatch, rope_dims: tuple[int, ...]) -> list[int]:
    """Rows of ``W_k`` whose keys are not rotated in absorb mode: every head's dimensions outside ``rope_dims``."""
    d = attn.head_dim
    return [h * d + j for h in range(attn.n_kv_heads) for j in range(d) if j not in rope_dims]


def apply_latent_cache(program: CachedProgram, factors: dict[int, JointFactors],
                       rope_dims: dict[int, tuple[int, ...]] | None = None) -> MLAResult:
    """Rewrite ``program`` in place so the layers in ``factors`` cache their latent: in ``reconstruct`` mode, or in
    ``absorb`` mode (:mod:`.mla_absorb`, which adds ``program.decode_gm``) when ``rope_dims`` gives each layer's
    rotary key dimensions."""
    if rope_dims is not None:
        return _absorb(program, factors, rope_dims)
    graph = program.gm.graph
    result = _skipped(program, factors)
    holders = _holders(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    seq = seq_symbol(placeholders[0])  # the token ids come first
    with graph.inserting_after(placeholders[-1]):
        slot_cache = graph.placeholder("slot_positions")
    with graph.inserting_after(slot_cache):
        slot_positions = graph.call_function(_INDEX_COPY, (slot_cache, 1, holders["cache_position"],
                                                           holders["position_ids"]))
    for i, f in factors.items():
        stores = unsupported_reason(program.matches.attention[i]) or _cache_stores(program, i, holders)
        if isinstance(stores, str):
            _skip(result, i, stores)
            continue
        _rewrite_layer(program, i, f, holders, stores, slot_positions, seq)
        result.ranks[i] = f.rank
    if not slot_positions.users:
        graph.erase_node(slot_positions)
        graph.erase_node(slot_cache)
    else:
        program.slot_positions = True  # its placeholder went in after all others: the program's last input
    _finish(program.gm)
    return result


def _absorb(program: CachedProgram, factors: dict[int, JointFactors],
            rope_dims: dict[int, tuple[int, ...]]) -> MLAResult:
    """Absorb mode: a copy of the program's graph becomes the decode graph; each layer is rewritten in both."""
    result = _skipped(program, factors)
    copies: dict[Node, Node] = {}
    graph = Graph()
    graph.output(graph.graph_copy(program.gm.graph, copies))
    decode = GraphModule(program.gm, graph)
    holders, decode_holders = _holders(program.gm.graph), _holders(decode.graph)
    for i, f in factors.items():
        attn = program.matches.attention[i]
        stores = unsupported_reason(attn) or _cache_stores(program, i, holders)
        if isinstance(stores, str):
            _skip(result, i, stores)
            continue
        bias = bias_node(program.gm.graph, attn.v.node)
        sites = []
        for gm, where, node in ((program.gm, holders, lambda n: n), (decode, decode_holders, copies.__getitem__)):
            sites.append(LayerSite(gm, node(attn.k.input), node(attn.q.node), node(attn.k.node),
                                   node(bias) if bias is not None else None, *(node(s) for s in stores),
                                   where[f"k_cache_{i}"], where[f"v_cache_{i}"], where["cache_position"]))
        reason = absorb_layer(program, i, f, rope_dims[i], *sites)
        if reason is None:
            result.ranks[i] = f.rank
        else:
            _skip(result, i, reason)
    if result.ranks:
        _finish(decode)
        program.decode_gm = decode
    _finish(program.gm)
    return result


def _holders(graph: Graph) -> dict[str, Node]:
    return {str(n.target): n for n in graph.nodes if n.op == "placeholder"}


def _skipped(program: CachedProgram, factors: dict[int, JointFactors]) -> MLAResult:
    """A result listing the layers factorization left out, and why they keep a full cache."""
    result = MLAResult()
    for i, attn in enumerate(program.matches.attention):
        reason = unsupported_reason(attn)
        if i not in factors and reason is not None:
            result.skipped[i] = reason
    return result


def _skip(result: MLAResult, i: int, reason: str) -> None:
    result.skipped[i] = reason
    log.warning("mla: layer %d left with a full KV cache: %s", i, reason)


def _finish(gm: GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _cache_stores(program: CachedProgram, i: int, holders: dict[str, Node]) -> tuple[Node, Node] | str:
    """The writes of this step's K and V into layer ``i``'s caches, checked to come from the matched projections."""
    attn = program.matches.attention[i]
    k_cache, v_cache = holders[f"k_cache_{i}"], holders[f"v_cache_{i}"]
    stores = [n for n in program.gm.graph.nodes if n.target is _INDEX_COPY and n.args[0] in (k_cache, v_cache)]
    if len(stores) != 2:
        return "the layer's cache writes were not found"
    k_store, v_store = sorted(stores, key=lambda n: n.args[0] is v_cache)
    if not (reaches(k_store.args[3], attn.k.node, None) and reaches(v_store.args[3], attn.v.node, None)):
        return "keys or values do not come from the matched projections"
    return k_store, v_store


def _rewrite_layer(program: CachedProgram, i: int, f: JointFactors, holders: dict[str, Node],
                   stores: tuple[Node, Node], slot_positions: Node, seq: object) -> None:
    attn = program.matches.attention[i]
    graph = program.gm.graph
    k_cache, v_cache = holders[f"k_cache_{i}"], holders[f"v_cache_{i}"]
    k_store, v_store = stores
    gm = program.gm
    names = register_factors(gm, f"mla_{i}", f)
    with graph.inserting_before(k_cache):
        latent_cache = graph.placeholder(f"latent_cache_{i}")
    with graph.inserting_before(k_store):
        down, up_k, up_v = (graph.get_attr(n) for n in names)
        latent = graph.call_function(torch.ops.aten.linear.default, (attn.k.input, down))
        latents = graph.call_function(_INDEX_COPY, (latent_cache, 1, holders["cache_position"], latent))
        capacity = graph.call_function(torch.ops.aten.sym_size.int, (latent_cache, 1))
        slots = graph.call_function(torch.ops.aten.arange.default, (capacity,),
                                    {"dtype": torch.long, "device": program.device})
        k_bias = bias_node(graph, attn.k.node)
        v_bias = bias_node(graph, attn.v.node)
        k_all = graph.call_function(torch.ops.aten.linear.default, (latents, up_k, k_bias))
        v_all = graph.call_function(torch.ops.aten.linear.default, (latents, up_v, v_bias))
        subs = {holders["position_ids"]: slot_positions, holders["cache_position"]: slots}
        subs |= {n: capacity for n in graph.nodes if same_size(n, seq)}
        keys = _replay(graph, k_store.args[3], {**subs, attn.k.node: k_all}, k_store)
        values = _replay(graph, v_store.args[3], {**subs, attn.v.node: v_all}, k_store)
    k_store.replace_all_uses_with(keys)
    v_store.replace_all_uses_with(values)
    graph.erase_node(k_store)
    graph.erase_node(v_store)
    graph.erase_node(k_cache)
    graph.erase_node(v_cache)
    old = program.layers[i]
    program.layers[i] = LayerCache(old.layer, old.n_kv_heads, old.head_dim, old.v_head_dim, old.window, f.rank)


def register_factors(gm: torch.nn.Module, prefix: str, f: JointFactors) -> list[str]:
    """Register ``f``'s down and up projections on ``gm`` as ``{prefix}_down``, ``_up_k``, ``_up_v``. Parameters
    are shared, not copied (an :class:`~dscompile.passes.mla_plan.MLAPlan`'s factors serve every program, so
    healing one heals all); plain tensors are copied into new parameters."""
    names = []
    for part, tensor in (("down", f.down), ("up_k", f.ups[0]), ("up_v", f.ups[1])):
        param = tensor if isinstance(tensor, torch.nn.Parameter) else \
            torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)
        gm.register_parameter(f"{prefix}_{part}", param)
        names.append(f"{prefix}_{part}")
    return names


def bias_node(graph: Graph, linear: Node) -> Node | None:
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return bias if isinstance(bias, Node) else None


def _replay(graph: Graph, target: Node, subs: dict[Node, Node], before: Node) -> Node:
    """Copies, inserted before ``before``, of the nodes between ``subs``' keys and ``target``, with the keys
    replaced; returns the copy of ``target`` (which :func:`.mla_rope.reaches` has checked depends on a key)."""
    order = {n: idx for idx, n in enumerate(graph.nodes)}
    needed: set[Node] = set()
    stack = [target]
    while stack:
        node = stack.pop()
        if node in needed or node in subs:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    mapping: dict[Node, Node] = dict(subs)
    with graph.inserting_before(before):
        for node in sorted(needed, key=order.__getitem__):
            if any(a in mapping for a in node.all_input_nodes):
                mapping[node] = graph.node_copy(node, lambda a: mapping.get(a, a))
    return mapping[target]
