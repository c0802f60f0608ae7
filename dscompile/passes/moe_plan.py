"""A MoE plan: every FFN of one model carved into experts, computed once and shared like an MLA plan.

Layers are keyed by their down projection's weight tensor (the same object in a Dynamo graph, an exported program
and the model), so the experts carved from one graph's calibration apply to the others. The experts are
``nn.Parameter`` objects registered as they are wherever the plan is applied: the compiled forward, the runtime's
prefill (the ``masked`` formulation of :mod:`.moe_ops`) and its decode step (``gathered``) read the same tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from ..calibrate import record_rows
from ..capture import CapturedGraph, node_value
from ..patterns import FFNMatch
from ..profile import MoEConfig
from .kv_cache import CachedProgram
from .moe_carve import CarvedFFN, DenseRows, carve, check_split, dense_rows, group, unsupported_reason
from .moe_ops import moe_ffn

log = logging.getLogger("dscompile")

MAX_ROWS = 4096
"""Calibration tokens kept per FFN (evenly strided over the text): enough for the clustering and the router's
regression, small enough to hold ``tokens x neurons`` activations for every layer at once."""

MIN_ROWS_PER_WIDTH = 4
"""Calibration tokens wanted per hidden feature, for the router's regression."""

Key = tuple[int, tuple[int, ...]]

COUNTS = "counts"
"""The suffix of a runtime program's live expert-load buffers (``moe_3_counts``: layer 3's tokens per expert)."""


def ffn_key(ffn: FFNMatch) -> Key | None:
    w = ffn.down.weight.tensor
    return None if w is None else (w.data_ptr(), tuple(w.shape))


@dataclass
class MoEPlan:
    """Carved FFNs by layer, the layers left dense (name -> reason), and how much calibration there was."""

    config: MoEConfig
    layers: dict[Key, CarvedFFN] = field(default_factory=dict)
    names: dict[Key, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_tokens: int = 0

    def carved(self, ffn: FFNMatch) -> CarvedFFN | None:
        key = ffn_key(ffn)
        return self.layers.get(key) if key is not None else None

    def covers(self, ffns: Sequence[FFNMatch]) -> bool:
        ready = [f for f in ffns if unsupported_reason(f) is None and f.layer not in self.skipped]
        return bool(ready) and all(self.carved(f) is not None for f in ready)

    def merged(self, other: MoEPlan) -> MoEPlan:
        for key, carved in other.layers.items():
            self.layers.setdefault(key, carved)
            self.names.setdefault(key, other.names[key])
        self.skipped.update(other.skipped)
        self.calibration_tokens = max(self.calibration_tokens, other.calibration_tokens)
        return self

    def apply(self, program: CachedProgram) -> int:
        """Carve ``program``'s FFNs: its graph (prefill) computes them masked, its decode graph gathered (a copy
        of the graph is made the decode graph when it has none). Returns how many FFNs were carved."""
        decode = program.decode_gm if program.decode_gm is not None else copy_module(program.gm)
        by_name = {n.name: n for n in decode.graph.nodes}
        done = 0
        for i, ffn in enumerate(program.matches.ffn):
            carved = self.carved(ffn)
            if carved is None or shape_reason(ffn) is not None:
                continue
            rewrite_ffn(program.gm, ffn.up.input, ffn.down.node, carved, f"moe_{i}", gathered=False, count=True)
            rewrite_ffn(decode, by_name[ffn.up.input.name], by_name[ffn.down.node.name], carved, f"moe_{i}",
                        gathered=True, count=True)
            done += 1
        if done:
            for gm in (program.gm, decode):
                gm.graph.eliminate_dead_code()
                gm.recompile()
            program.decode_gm = decode
        return done

    def rekey(self, keys: dict[Key, Key]) -> None:
        """Find layers under new keys (``old -> new``) after their down weights moved to other memory."""
        for old, new in keys.items():
            if old in self.layers and old != new:
                self.layers[new] = self.layers.pop(old)
                self.names[new] = self.names.pop(old)

    def loads(self) -> dict[str, list[float]]:
        return {self.names[k]: [round(x, 4) for x in c.load] for k, c in self.layers.items()}

    def cache_stats(self) -> dict[str, dict]:
        """Per offloaded FFN: its expert cache's capacity, hits, misses and bytes read (see ``offload_experts``)."""
        return {self.names[k]: c.store.stats() for k, c in self.layers.items() if c.store is not None}

    def maxvio(self) -> dict[str, float]:
        return {self.names[k]: round(c.maxvio, 4) for k, c in self.layers.items()}

    def sync(self) -> None:
        """After healing: the decode step's expert rows take the trained weights (see ``CarvedFFN.sync_rows``)."""
        for carved in self.layers.values():
            carved.sync_rows()

    def offloaded_params(self) -> int:
        """Parameters of the carved FFNs that live in files (see ``CarvedFFN.offloaded_params``)."""
        return sum(c.offloaded_params() for c in self.layers.values())

    def inactive_params(self) -> int:
        """Parameters the carved FFNs hold that a token does not read (the unchosen experts)."""
        return sum(held - active for active, held in (c.active_params() for c in self.layers.values()))


def shape_reason(ffn: FFNMatch) -> str | None:
    """Why the FFN's output cannot be computed row-wise from its input, or None."""
    x, y = node_value(ffn.up.input), node_value(ffn.down.node)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != y.dim():
        return "the FFN's input and output do not have the same rank"
    return None


def copy_module(gm: GraphModule) -> GraphModule:
    """A second graph module over the same parameters, node names kept."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return GraphModule(gm, graph)


def without_counters(gm: GraphModule) -> GraphModule:
    """``gm`` without the live expert counting (a copy over the same parameters, or ``gm`` itself when it counts
    nothing): an exported graph is a pure function of its inputs, with no state of its own to update."""
    counting = [n for n in gm.graph.nodes if n.target is moe_ffn and len(n.args) > 10 and n.args[10] is not None]
    if not counting:
        return gm
    copy = copy_module(gm)
    for node in copy.graph.nodes:
        if node.target is moe_ffn and len(node.args) > 10:
            node.args = (*node.args[:10], None, *node.args[11:])
    copy.graph.eliminate_dead_code()
    copy.recompile()
    return copy


def rewrite_ffn(gm: GraphModule, x: Node, down: Node, carved: CarvedFFN, prefix: str, *, gathered: bool,
                count: bool = False) -> None:
    """Replace the FFN ending at ``down`` by one call of :func:`.moe_ops.moe_ffn` on ``x``; with ``count`` the call
    also adds each token's choice to ``carved.counts`` (a runtime program's live expert load)."""
    graph = gm.graph
    with graph.inserting_before(down):
        attrs: dict[str, Node] = {}
        for name, tensor in carved.params().items():
            if tensor is None:
                continue
            if not hasattr(gm, f"{prefix}_{name}"):
                gm.register_parameter(f"{prefix}_{name}", tensor)
            attrs[name] = graph.get_attr(f"{prefix}_{name}")
            attrs[name].meta["val"] = tensor
        counts = None
        if count:
            if not hasattr(gm, f"{prefix}_{COUNTS}"):
                gm.register_buffer(f"{prefix}_{COUNTS}", carved.counts, persistent=False)
            counts = graph.get_attr(f"{prefix}_{COUNTS}")
            counts.meta["val"] = carved.counts
        node = graph.call_function(moe_ffn, (
            x, group(attrs, "shared") if carved.shared is not None else None, group(attrs, "experts"),
            attrs.get("down_t"), attrs["router"], attrs["router_bias"], attrs.get("down_bias"), carved.top_k,
            carved.activation, gathered, counts, carved.store.id if carved.store is not None else None,
            carved.routing))
    node.meta["val"] = node_value(down)
    down.replace_all_uses_with(node)


def make_plan(config: MoEConfig, ffns: Sequence[FFNMatch], rows: dict[str, list[torch.Tensor]],
              tokens: int) -> MoEPlan:
    """Carve every FFN in ``ffns`` from the recorded ``rows`` (inputs and activations by node name)."""
    plan = MoEPlan(config, calibration_tokens=tokens)
    for ffn in ffns:
        reason = unsupported_reason(ffn) or shape_reason(ffn)
        key = ffn_key(ffn)
        if reason is None and key is not None:
            x = torch.cat(rows[ffn.up.input.name])
            a = torch.cat(rows[ffn.down.input.name])
            dense = dense_rows(ffn, x, a)
            if isinstance(dense, DenseRows):
                plan.layers[key] = carve(dense, x, a, config)
                plan.names[key] = ffn.layer
                continue
            reason = dense
        plan.skipped[ffn.layer] = reason or "the FFN weights are not known at compile time"
        log.warning("moe: %s left dense: %s", ffn.layer, plan.skipped[ffn.layer])
    log.info("moe plan: %d FFNs carved into %d experts (%d shared, top %d), MaxVio on calibration %s",
             len(plan.layers), config.n_experts, config.n_shared, config.top_k,
             f"{max(plan.maxvio().values()):.3f}" if plan.layers else "-")
    return plan


def _check(config: MoEConfig, ffns: Sequence[FFNMatch]) -> list[FFNMatch]:
    """The FFNs that can be carved; refuse an expert count that does not divide one of them before any work."""
    ready = [f for f in ffns if unsupported_reason(f) is None and shape_reason(f) is None]
    for ffn in ready:
        check_split(ffn.intermediate_size, config)
    return ready


def _record(gm: GraphModule, ffns: Sequence[FFNMatch], tokens: int,
            run: Callable[[], object]) -> dict[str, list[torch.Tensor]]:
    nodes = list(dict.fromkeys(n for f in ffns for n in (f.up.input, f.down.input)))
    stride = max(1, -(-tokens // MAX_ROWS))
    with record_rows(gm, nodes, stride) as rows:
        run()
    return rows


def _warn_if_thin(ffns: Sequence[FFNMatch], tokens: int) -> None:
    wanted = MIN_ROWS_PER_WIDTH * max((f.hidden_size for f in ffns), default=0)
    if tokens < wanted:
        log.warning("moe: calibrated on %d tokens, fewer than the %d a %d-wide FFN input wants; the router will fit "
                    "these tokens and route other text poorly: pass more text as calibration=", tokens, wanted,
                    wanted // MIN_ROWS_PER_WIDTH)


def record_ffns(program: CachedProgram, batches: Sequence[torch.Tensor],
                ffns: Sequence[FFNMatch] | None = None) -> tuple[dict[str, list[torch.Tensor]], int]:
    """Inputs and activations of ``program``'s FFNs (by node name) over ``batches`` of token ids, cut into
    calibration windows and strided down to ``MAX_ROWS`` tokens; and how many tokens were seen."""
    from ..runtime.generate import prefill_logits
    from .mla_plan import calibration_windows, fitting_window

    windows = calibration_windows(batches, fitting_window(program))
    tokens = sum(w.numel() for w in windows)

    def run() -> None:
        with torch.no_grad():
            for ids in windows:
                prefill_logits(program, ids)

    return _record(program.gm, program.matches.ffn if ffns is None else ffns, tokens, run), tokens


def plan_program(program: CachedProgram, config: MoEConfig, batches: Sequence[torch.Tensor]) -> MoEPlan:
    """Calibrate on ``batches`` of token ids through the runtime's program (before any rewrite) and carve."""
    ffns = _check(config, program.matches.ffn)
    rows, tokens = record_ffns(program, batches, ffns)
    _warn_if_thin(ffns, tokens)
    return make_plan(config, program.matches.ffn, rows, tokens)


def plan_graph(captured: CapturedGraph, ffns: Sequence[FFNMatch], config: MoEConfig) -> MoEPlan:
    """Calibrate on the graph's own example inputs (what ``torch.compile`` gives a backend) and carve."""
    ready = _check(config, ffns)
    if not ready:
        return make_plan(config, ffns, {}, 0)
    val = node_value(ready[0].up.input)
    tokens = int(val.numel() // val.shape[-1]) if isinstance(val, torch.Tensor) else 0
    _warn_if_thin(ready, tokens)
    return make_plan(config, ffns, _record(captured.gm, ready, tokens, lambda: captured.gm(*captured.inputs)), tokens)
