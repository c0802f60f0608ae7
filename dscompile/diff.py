"""Graph diff: what a compile changed, as numbers tests can assert on and a table people can read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from .accounting import kv_bytes_per_token
from .capture import CapturedGraph, from_fx
from .patterns import MatchSet, match_all, ops

PATTERNS = ("attention", "ffn", "lm_head")


def op_counts(captured: CapturedGraph) -> Counter[str]:
    """Calls in the graph by op class (unclassified ops by name)."""
    counts: Counter[str] = Counter()
    for node in captured.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            counts[ops.op_class(node) or ops.op_label(node)] += 1
    return counts


def _signatures(matches: MatchSet) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Per pattern, layer -> what identifies its subgraph (weights read and ops used)."""
    out: dict[str, dict[str, tuple[Any, ...]]] = {p: {} for p in PATTERNS}
    for pattern in PATTERNS:
        for m in getattr(matches, pattern):
            ops_used = sorted(ops.op_class(n) or ops.op_label(n) for n in m.nodes)
            out[pattern][m.layer] = (_weights_of(m), *ops_used)
    return out


def _weights_of(m: Any) -> str:
    lins = [getattr(m, k, None) for k in ("q", "k", "v", "o", "up", "gate", "down", "linear")]
    return "|".join(sorted(f"{x.weight.name}{x.weight.shape}" for x in lins if x is not None))


@dataclass
class GraphDiff:
    """Before/after: op counts by class, matched and rewritten subgraphs by pattern and layer, bytes."""

    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]
    matched_before: dict[str, list[str]]
    matched_after: dict[str, list[str]]
    rewritten: dict[str, list[str]]
    added: dict[str, list[str]]
    param_bytes_before: int
    param_bytes_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    notes: list[str] = field(default_factory=list)

    @property
    def op_changes(self) -> dict[str, int]:
        keys = sorted(set(self.op_counts_before) | set(self.op_counts_after))
        delta = {k: self.op_counts_after.get(k, 0) - self.op_counts_before.get(k, 0) for k in keys}
        return {k: v for k, v in delta.items() if v}

    @property
    def unchanged(self) -> bool:
        return (not self.op_changes and not any(self.rewritten.values()) and not any(self.added.values())
                and self.param_bytes_before == self.param_bytes_after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op_counts_before": dict(self.op_counts_before),
            "op_counts_after": dict(self.op_counts_after),
            "op_changes": self.op_changes,
            "matched_before": self.matched_before,
            "matched_after": self.matched_after,
            "rewritten": self.rewritten,
            "added": self.added,
            "param_bytes_before": self.param_bytes_before,
            "param_bytes_after": self.param_bytes_after,
            "kv_bytes_per_token_before": self.kv_bytes_per_token_before,
            "kv_bytes_per_token_after": self.kv_bytes_per_token_after,
            "unchanged": self.unchanged,
        }

    def __str__(self) -> str:
        lines = ["graph diff" + (" (no changes)" if self.unchanged else "")]
        for p in PATTERNS:
            lines.append(
                f"  {p:<9} matched {len(self.matched_before[p])} -> {len(self.matched_after[p])}, "
                f"rewritten {len(self.rewritten[p])}, added {len(self.added[p])}"
            )
            for layer in self.rewritten[p]:
                lines.append(f"    rewritten: {layer}")
        for op, d in self.op_changes.items():
            b, a = self.op_counts_before.get(op, 0), self.op_counts_after.get(op, 0)
            lines.append(f"  op {op:<16} {b} -> {a} ({d:+d})")
        lines.append(f"  parameter bytes      {self.param_bytes_before:,} -> {self.param_bytes_after:,}")
        lines.append(f"  KV bytes per token   {self.kv_bytes_per_token_before:,} -> {self.kv_bytes_per_token_after:,}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _as_captured(graph: CapturedGraph | GraphModule) -> CapturedGraph:
    if isinstance(graph, CapturedGraph):
        return graph
    if isinstance(graph, GraphModule):
        return from_fx(graph, [])
    raise TypeError(f"diff takes CapturedGraph or GraphModule objects, not {type(graph).__name__}")


def diff(
    before: CapturedGraph | GraphModule,
    after: CapturedGraph | GraphModule,
    *,
    matches_before: MatchSet | None = None,
    matches_after: MatchSet | None = None,
) -> GraphDiff:
    """Compare two graphs of the same model; matches are computed unless given."""
    b, a = _as_captured(before), _as_captured(after)
    mb = matches_before if matches_before is not None else match_all(b)
    ma = matches_after if matches_after is not None else match_all(a)
    sb, sa = _signatures(mb), _signatures(ma)
    return GraphDiff(
        op_counts_before=dict(op_counts(b)),
        op_counts_after=dict(op_counts(a)),
        matched_before={p: list(sb[p]) for p in PATTERNS},
        matched_after={p: list(sa[p]) for p in PATTERNS},
        rewritten={p: [layer for layer, sig in sb[p].items() if sa[p].get(layer) != sig] for p in PATTERNS},
        added={p: [layer for layer in sa[p] if layer not in sb[p]] for p in PATTERNS},
        param_bytes_before=b.param_bytes(),
        param_bytes_after=a.param_bytes(),
        kv_bytes_per_token_before=kv_bytes_per_token(mb),
        kv_bytes_per_token_after=kv_bytes_per_token(ma),
    )


def merge(diffs: list[GraphDiff]) -> GraphDiff:
    """One diff for a model that Dynamo split into several graphs."""
    if len(diffs) == 1:
        return diffs[0]

    def add_counts(key: str) -> dict[str, int]:
        total: Counter[str] = Counter()
        for d in diffs:
            total.update(getattr(d, key))
        return dict(total)

    def join(key: str) -> dict[str, list[str]]:
        return {p: [x for d in diffs for x in getattr(d, key)[p]] for p in PATTERNS}

    return GraphDiff(
        op_counts_before=add_counts("op_counts_before"), op_counts_after=add_counts("op_counts_after"),
        matched_before=join("matched_before"), matched_after=join("matched_after"),
        rewritten=join("rewritten"), added=join("added"),
        param_bytes_before=sum(d.param_bytes_before for d in diffs),
        param_bytes_after=sum(d.param_bytes_after for d in diffs),
        kv_bytes_per_token_before=sum(d.kv_bytes_per_token_before for d in diffs),
        kv_bytes_per_token_after=sum(d.kv_bytes_per_token_after for d in diffs),
        notes=[f"{len(diffs)} graphs (graph breaks) merged"],
    )
