"""The ``kv_cache`` pass: a cache-free causal forward becomes one program with explicit, static KV-cache state.

DESIGN decision 5: HF's ``generate`` keeps K/V outside any graph, so a latent cache (MLA) can only pay off where we
own the cache. The pass exports the model's forward (``torch.export``, batch and sequence dynamic), and for every
matched attention writes the step's keys and values into a per-layer static buffer ``[batch, kv_heads, capacity,
head_dim]`` at ``cache_position`` and attends over the whole buffer under a bias the runtime builds (causal,
sliding window, left padding). Positions become inputs: ``position_ids`` for models that take them; for
hand-written models the ``arange`` over the sequence and the slices of position tables are re-indexed by
``cache_position``. One program serves prefill (many tokens) and decode (one token); the runtime compiles the
decode shape once.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..capture import CapturedGraph, check_model, forward_accepts, from_fx
from ..errors import CaptureError, ConfigError, MatchError, UnsupportedError
from ..patterns import AttentionMatch, MatchSet, match_all, ops
from ..patterns.attention import eager_anchor
from ..patterns.lm_head import token_embedding
from ..patterns.walk import shape

log = logging.getLogger("dscompile")

_ARANGE = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}
_SLICE = torch.ops.aten.slice.Tensor
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class LayerCache:
    """What one attention layer keeps per token: its KV heads and head sizes, and its sliding window."""

    layer: str
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    window: int | None
    latent: int | None = None  # MLA: the width of the one latent per token that replaces K and V
    rope_key: int = 0  # MLA absorb mode: rotary key dimensions per KV head cached beside the latent

    @property
    def kv_values(self) -> int:
        """Values per token for full keys and values (what the layer caches without MLA)."""
        return self.n_kv_heads * (self.head_dim + self.v_head_dim)

    @property
    def values_per_token(self) -> int:
        if self.latent is None:
            return self.kv_values
        return self.latent + self.n_kv_heads * self.rope_key


@dataclass
class CachedProgram:
    """``program(input_ids, position_ids, cache_position, *biases, *caches) -> logits``, caches updated in place.

    ``biases`` holds one additive attention bias ``[batch, 1, tokens, capacity]`` per distinct window in
    ``windows`` (``None`` = full causal); ``caches`` holds K then V for each layer in ``layers`` (one latent
    ``[batch, capacity, width]`` for an MLA layer, followed in absorb mode by its rotary key dimensions
    ``[batch, kv_heads, capacity, rope_key]``), then, when ``slot_positions`` is set, the position id of every
    cache slot ``[batch, capacity]`` (MLA rebuilds rotated keys from it).
    """

    gm: GraphModule
    layers: list[LayerCache]
    windows: list[int | None]
    dtype: torch.dtype
    takes_attention_mask: bool  # the original reads padding (HF); hand-written models attend to every token
    matches: MatchSet
    notes: list[str] = field(default_factory=list)
    max_positions: int | None = None  # rows of the position tables, or the config's max_position_embeddings
    slot_positions: bool = False
    decode_gm: GraphModule | None = None  # MLA absorb mode: the graph decode steps run (same inputs as gm)
    hidden: str | None = None  # the node that feeds the LM head (what MTP heads draft from), by name
    embedding: torch.Tensor | None = None  # the token embedding table (MTP heads embed drafted tokens with it)
    slot_is_position: bool = False  # positions come from cache_position (hand-written models), not position_ids

    @property
    def device(self) -> torch.device:
        """Where the program's weights live (CPU for a program without any)."""
        param = next(iter(self.gm.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    def cache_bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        positions = torch.empty((), dtype=torch.long).element_size() if self.slot_positions else 0
        return sum(layer.values_per_token for layer in self.layers) * itemsize + positions

    def new_caches(self, batch: int, capacity: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Zeroed cache buffers for every layer (K and V, or one latent), in program order."""
        caches: list[torch.Tensor] = []
        for layer in self.layers:
            if layer.latent is not None:
                caches.append(torch.zeros(batch, capacity, layer.latent, dtype=self.dtype, device=device))
                if layer.rope_key:
                    caches.append(torch.zeros(batch, layer.n_kv_heads, capacity, layer.rope_key, dtype=self.dtype,
                                              device=device))
                continue
            caches.append(torch.zeros(batch, layer.n_kv_heads, capacity, layer.head_dim, dtype=self.dtype,
                                      device=device))
            caches.append(torch.zeros(batch, layer.n_kv_heads, capacity, layer.v_head_dim, dtype=self.dtype,
                                      device=device))
        if self.slot_positions:
            caches.append(torch.zeros(batch, capacity, dtype=torch.long, device=device))
        return caches


def build_cached_program(model: torch.nn.Module, *, example_length: int = 8, logits: str = "last") -> CachedProgram:
    """Export ``model``'s cache-free forward and give every matched attention a static KV cache.

    ``logits="last"`` projects only the last position onto the vocabulary (a long prefill would otherwise hold
    ``tokens x vocab`` floats); ``"all"`` keeps every position, as verification of drafted tokens needs.
    """
    if logits not in ("last", "all"):
        raise ConfigError(f"logits must be 'last' or 'all', got {logits!r}")
    check_model(model)
    takes_positions = forward_accepts(model, "position_ids")
    config = getattr(model, "config", None)
    length = max(example_length, _longest_window(config) + 1)
    vocab = _vocab_size(model)
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    ids_name = "input_ids" if forward_accepts(model, "input_ids") else _first_parameter(model)
    kwargs: dict[str, Any] = {ids_name: ids}
    if takes_positions:
        kwargs["position_ids"] = torch.arange(length).expand(2, -1)
    if config is not None and forward_accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    gm, inputs = _export(model, kwargs)
    captured = from_fx(gm, inputs)
    matches = match_all(captured)
    if not matches.attention:
        raise MatchError(f"no attention matched in {type(model).__name__}: there is no KV cache to own")
    dtype = _cache_dtype(matches)
    takes_mask = takes_positions and forward_accepts(model, "attention_mask")
    program = _rewrite(captured, matches, config, takes_positions, takes_mask, dtype, ids_name)
    table = token_embedding(captured)
    program.embedding = table.tensor if table is not None else None
    if matches.lm_head:
        program.hidden = matches.lm_head[0].linear.input.name
    if logits == "last":
        _last_position_only(program)
    log.info("kv_cache: %d layers cached, %d bytes per token%s", len(program.layers),
             program.cache_bytes_per_token(), "".join(f"; {n}" for n in program.notes))
    return program


def _first_parameter(model: torch.nn.Module) -> str:
    params = list(inspect.signature(model.forward).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise CaptureError(f"{type(model).__name__}.forward takes no token-id argument")
    return params[0].name


def _vocab_size(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if not embeddings:
        raise CaptureError(f"{type(model).__name__} has no token embedding, so it cannot take token ids")
    return max(e.num_embeddings for e in embeddings)


def _longest_window(config: Any) -> int:
    window = getattr(config, "sliding_window", None) if config is not None else None
    return int(window) if isinstance(window, int) and window < 4096 else 0


def layer_windows(config: Any, count: int) -> list[int | None] | None:
    """Sliding windows per layer from a Hugging Face config (``layer_types``), or None when it does not say."""
    window = getattr(config, "sliding_window", None) if config is not None else None
    if not isinstance(window, int):
        return None
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == count:
        return [window if t == "sliding_attention" else None for t in types]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * count
    return [window] * count


def _export(model: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[GraphModule, list[Any]]:
    from torch.export import Dim

    shapes = {k: ({0: Dim.AUTO, 1: Dim.AUTO} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # the exporter's errors vary by model; say where it broke
        raise CaptureError(f"torch.export could not capture {type(model).__name__} for the runtime: {exc}") from exc
    unlifted = ep.module()
    unlifted.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs instead of pytree specs
    gm = GraphModule(unlifted, unlifted.graph)  # a plain module: no input-spec hooks, weights as attributes
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [kwargs[n.target] if n.target in kwargs else None for n in holders]
    gm.recompile()
    return gm, inputs


def _cache_dtype(matches: MatchSet) -> torch.dtype:
    tensor = matches.attention[0].k.weight.tensor
    return tensor.dtype if tensor is not None else torch.float32


def _rewrite(captured: CapturedGraph, matches: MatchSet, config: Any, takes_positions: bool, takes_mask: bool,
             dtype: torch.dtype, ids_name: str) -> CachedProgram:
    gm = captured.gm
    graph = gm.graph
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {str(n.target): n for n in holders}
    ids_node = by_name[ids_name]
    hf_windows = layer_windows(config, len(matches.attention))
    layers: list[LayerCache] = []
    for i, attn in enumerate(matches.attention):
        if attn.causal is False:
            raise MatchError(f"{attn.layer} attends to future tokens: only causal models can decode with a cache")
        window = hf_windows[i] if hf_windows is not None else attn.window
        layers.append(LayerCache(attn.layer, attn.n_kv_heads, attn.head_dim, attn.v_head_dim, window))
    windows = list(dict.fromkeys(layer.window for layer in layers))

    last = holders[-1]
    with graph.inserting_after(last):
        position_ids = by_name.get("position_ids")
        if position_ids is None:
            position_ids = graph.placeholder("position_ids")
            last = position_ids
    with graph.inserting_after(last):
        cache_position = graph.placeholder("cache_position")
    last = cache_position
    biases: dict[int | None, Node] = {}
    for w in windows:
        with graph.inserting_after(last):
            last = biases[w] = graph.placeholder("bias_full" if w is None else f"bias_window_{w}")
    caches: list[tuple[Node, Node]] = []
    for i in range(len(layers)):
        with graph.inserting_after(last):
            k_cache = graph.placeholder(f"k_cache_{i}")
        with graph.inserting_after(k_cache):
            v_cache = graph.placeholder(f"v_cache_{i}")
        last = v_cache
        caches.append((k_cache, v_cache))

    for attn, layer, (k_cache, v_cache) in zip(matches.attention, layers, caches):
        _attend_over_cache(graph, captured, attn, layer, k_cache, v_cache, cache_position, biases[layer.window])
    notes: list[str] = []
    limits: list[int] = []
    if not takes_positions:
        notes, limits = _reindex_positions(captured, ids_node, cache_position)
    configured = getattr(config, "max_position_embeddings", None) if config is not None else None
    if isinstance(configured, int):
        limits.append(configured)
    _drop_unused_inputs(graph, keep={ids_name, "position_ids"})
    _return_logits_only(graph)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return CachedProgram(gm, layers, windows, dtype, takes_mask, matches, notes, min(limits) if limits else None,
                         slot_is_position=not takes_positions)


def _cache_source(graph: torch.fx.Graph, node: Node, kv_heads: int, where: str) -> Node:
    """K or V as the projection made it, before GQA's ``repeat_kv``, in the cache's ``[batch, kv_heads, tokens,
    dim]`` layout (a transpose is inserted for models that keep ``[batch, tokens, heads, dim]`` until later)."""
    current = node
    for _ in range(12):
        layout = _kv_layout(current, kv_heads)
        if layout is not None:
            break
        if ops.op_class(current) not in _KV_PATH or not current.args or not isinstance(current.args[0], Node):
            raise UnsupportedError(f"{where}: cannot find keys/values with {kv_heads} heads before the attention")
        current = current.args[0]
    else:
        raise UnsupportedError(f"{where}: keys/values are too far from the attention to cache")
    if layout == 2:
        return current
    with graph.inserting_after(current):
        return graph.call_function(torch.ops.aten.transpose.int, (current, 1, 2))


_KV_PATH = frozenset({ops.VIEW, ops.EXPAND, ops.REPEAT, ops.SLICE, ops.CAST, ops.TRANSPOSE, ops.GETITEM})


def _kv_layout(node: Node, kv_heads: int) -> int | None:
    """2 for ``[batch, heads, tokens, dim]``, 1 for ``[batch, tokens, heads, dim]``, None otherwise; the tokens
    dim is the symbolic one (export traced batch and sequence as symbols)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    symbolic = [not isinstance(d, int) for d in val.shape]
    sizes = shape(node) or ()
    if symbolic[2] and not symbolic[1] and sizes[1] == kv_heads:
        return 2
    if symbolic[1] and not symbolic[2] and sizes[2] == kv_heads:
        return 1
    return None


def _attend_over_cache(graph: torch.fx.Graph, captured: CapturedGraph, attn: AttentionMatch, layer: LayerCache,
                       k_cache: Node, v_cache: Node, cache_position: Node, bias: Node) -> None:
    """Write this step's K and V into the layer's buffers and attend over all of them under the runtime's bias."""
    if attn.kind == "sdpa":
        _sdpa_over_cache(graph, attn, layer, k_cache, v_cache, cache_position, bias)
    else:
        _eager_over_cache(graph, captured, attn, layer, k_cache, v_cache, cache_position, bias)


def _store(graph: torch.fx.Graph, cache: Node, cache_position: Node, src: Node) -> Node:
    return graph.call_function(torch.ops.aten.index_copy_.default, (cache, 2, cache_position, src))


def _sdpa_over_cache(graph: torch.fx.Graph, attn: AttentionMatch, layer: LayerCache, k_cache: Node,
                     v_cache: Node, cache_position: Node, bias: Node) -> None:
    sdpa = attn.anchor
    q, k, v = sdpa.args[:3]
    k_src = _cache_source(graph, k, layer.n_kv_heads, attn.layer)  # type: ignore[arg-type]
    v_src = _cache_source(graph, v, layer.n_kv_heads, attn.layer)  # type: ignore[arg-type]
    with graph.inserting_before(sdpa):
        k_all = _store(graph, k_cache, cache_position, k_src)
        v_all = _store(graph, v_cache, cache_position, v_src)
        kwargs: dict[str, Any] = {"attn_mask": bias, "dropout_p": 0.0, "is_causal": False}
        if attn.scale is not None:
            kwargs["scale"] = attn.scale
        elif shape(q):
            kwargs["scale"] = shape(q)[-1] ** -0.5  # type: ignore[index]
        if layer.n_kv_heads != attn.n_heads:
            kwargs["enable_gqa"] = True
        new = graph.call_function(_SDPA, (q, k_all, v_all), kwargs)
    new.meta = dict(sdpa.meta)
    sdpa.replace_all_uses_with(new)
    graph.erase_node(sdpa)


def _eager_over_cache(graph: torch.fx.Graph, captured: CapturedGraph, attn: AttentionMatch, layer: LayerCache,
                      k_cache: Node, v_cache: Node, cache_position: Node, bias: Node) -> None:
    """``q @ k^T -> [scale, mask, softcap] -> softmax -> @ v``: K and V come from the cache, the mask from ``bias``."""
    softmax = next(n for n in attn.nodes if ops.op_class(n) == ops.SOFTMAX)
    anchor = eager_anchor(captured, softmax)
    if isinstance(anchor, str):
        raise UnsupportedError(f"{attn.layer}: {anchor}")
    scores, out = anchor.chain[0], anchor.out
    if ops.op_class(scores.args[1]) != ops.TRANSPOSE:  # type: ignore[arg-type]
        raise UnsupportedError(f"{attn.layer}: keys reach Q @ K^T without a transpose the runtime can redirect")
    repeats = attn.n_heads // layer.n_kv_heads
    k_src = _cache_source(graph, anchor.k, layer.n_kv_heads, attn.layer)  # type: ignore[arg-type]
    v_src = _cache_source(graph, anchor.v, layer.n_kv_heads, attn.layer)  # type: ignore[arg-type]
    with graph.inserting_before(scores):
        k_all = _repeat_heads(graph, _store(graph, k_cache, cache_position, k_src), repeats)
        k_t = graph.call_function(torch.ops.aten.transpose.int, (k_all, -2, -1))
    scores.args = (scores.args[0], k_t, *scores.args[2:])
    with graph.inserting_before(out):
        v_all = _repeat_heads(graph, _store(graph, v_cache, cache_position, v_src), repeats)
    out.args = (out.args[0], v_all, *out.args[2:])
    _mask_with_bias(graph, anchor, bias, attn.layer)


def _repeat_heads(graph: torch.fx.Graph, node: Node, repeats: int) -> Node:
    """GQA's ``repeat_kv``: each KV head serves ``repeats`` consecutive query heads."""
    if repeats == 1:
        return node
    return graph.call_function(torch.ops.aten.repeat_interleave.self_int, (node, repeats, 1))


def _mask_with_bias(graph: torch.fx.Graph, anchor: Any, bias: Node, layer: str) -> None:
    """The model's own ``[tokens, tokens]`` mask gives way to the runtime's ``[batch, 1, tokens, capacity]`` bias."""
    if anchor.mask is None:
        raise UnsupportedError(f"{layer}: no causal mask found on the attention scores")
    mask = anchor.mask.node
    chain = anchor.chain
    for node in chain:
        if mask not in node.args:
            continue
        cls = ops.op_class(node)
        if cls == ops.ADD:
            node.args = tuple(bias if a is mask else a for a in node.args)
            return
        if cls in (ops.MASKED_FILL, ops.WHERE):
            scores_in = next(a for a in node.args if isinstance(a, Node) and a is not mask and (a in chain))
            with graph.inserting_before(node):
                added = graph.call_function(torch.ops.aten.add.Tensor, (scores_in, bias))
            node.replace_all_uses_with(added)
            graph.erase_node(node)
            return
    raise UnsupportedError(f"{layer}: the attention mask is applied in a way the runtime cannot replace")


def _reindex_positions(captured: CapturedGraph, ids_node: Node, cache_position: Node) -> tuple[list[str], list[int]]:
    """Hand-written models: ``arange(seq)`` becomes ``cache_position``; ``table[:seq]`` becomes
    ``table[cache_position]``. Returns notes and the row counts of those tables (the model's position limit).
    """
    graph = captured.graph
    seq = seq_symbol(ids_node)
    notes: list[str] = []
    limits: list[int] = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ARANGE and _arange_is_sequence(node, seq):
            with graph.inserting_after(node):
                cast = graph.call_function(torch.ops.aten._to_copy.default, (cache_position,),
                                           {"dtype": node.kwargs.get("dtype") or torch.int64})
            node.replace_all_uses_with(cast)
            notes.append(f"{node.name}: arange over the sequence -> cache_position")
            limits += [captured.weight(u.args[0]).shape[0] for u in cast.users  # type: ignore[union-attr]
                       if ops.op_class(u) == ops.EMBEDDING and captured.weight(u.args[0]) is not None]
        elif node.target is _SLICE and _slices_table_to_sequence(captured, node, seq):
            with graph.inserting_after(node):
                picked = graph.call_function(torch.ops.aten.index_select.default, (node.args[0], 0, cache_position))
            node.replace_all_uses_with(picked)
            notes.append(f"{node.name}: position table sliced to the sequence -> rows at cache_position")
            limits.append(captured.weight(node.args[0]).shape[0])  # type: ignore[union-attr,arg-type]
    return notes, limits


def seq_symbol(ids_node: Node) -> object:
    """The symbolic sequence length export traced for the token ids."""
    val = ids_node.meta.get("val")
    return val.shape[1] if isinstance(val, torch.Tensor) else None


def same_size(value: object, seq: object) -> bool:
    """Whether ``value`` (a node or SymInt) is the symbolic size ``seq``."""
    if isinstance(value, Node):
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt) and isinstance(seq, torch.SymInt):
        return value.node.expr == seq.node.expr
    return False


def _arange_is_sequence(node: Node, seq: object) -> bool:
    args = list(node.args)
    if node.target is torch.ops.aten.arange.default:
        return same_size(args[0], seq)
    return len(args) >= 2 and args[0] == 0 and same_size(args[1], seq)


def _slices_table_to_sequence(captured: CapturedGraph, node: Node, seq: object) -> bool:
    args = list(node.args) + [None] * 4
    source, dim, start, end = args[:4]
    return (isinstance(source, Node) and captured.weight(source) is not None and dim == 0 and start in (0, None)
            and same_size(end, seq))


def _last_position_only(program: CachedProgram) -> None:
    """Feed the LM head the last position's hidden state only."""
    if not program.matches.lm_head:
        program.notes.append("no LM head matched: logits kept for every position")
        return
    head = program.matches.lm_head[0].linear
    graph = program.gm.graph
    with graph.inserting_before(head.node):
        last = graph.call_function(_SLICE, (head.input, 1, -1, 9223372036854775807))
    head.node.replace_input_with(head.input, last)
    program.hidden = last.name
    program.gm.recompile()


def _drop_unused_inputs(graph: torch.fx.Graph, keep: set[str]) -> None:
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and str(node.target) not in keep and not (
            str(node.target).startswith(("bias_", "k_cache_", "v_cache_", "cache_position"))
        ):
            graph.erase_node(node)


def _return_logits_only(graph: torch.fx.Graph) -> None:
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = [a for a in torch.fx.node.map_arg(output.args[0], lambda n: n) if isinstance(a, Node)] \
        if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    logits = next((leaf for leaf in leaves if isinstance(leaf, Node) and _is_float_3d(leaf)), None)
    if logits is None:
        raise CaptureError("the model's forward returns no [batch, tokens, vocab] logits tensor")
    output.args = ((logits,),)


def _is_float_3d(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 3 and val.is_floating_point()

