"""What one compile did, graph by graph: kept so reports and diffs can be read after ``torch.compile``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .capture import CapturedGraph
from .diff import GraphDiff, diff, merge
from .passes.base import PassResult
from .patterns import MatchSet


@dataclass
class CompiledGraph:
    """One graph the backend compiled: before and after the passes, with matches and pass results."""

    before: CapturedGraph
    after: CapturedGraph
    matches: MatchSet
    matches_after: MatchSet
    passes: list[PassResult]
    lower: str
    seconds: float

    def diff(self) -> GraphDiff:
        return diff(self.before, self.after, matches_before=self.matches, matches_after=self.matches_after)


@dataclass
class CompileSession:
    """Every graph compiled for one model (Dynamo splits a model into several at graph breaks)."""

    graphs: list[CompiledGraph] = field(default_factory=list)
    mla_plan: Any = None  # the MLAPlan the MLA pass used (made by optimize from calibration, or by the pass)
    moe_plan: Any = None  # the MoEPlan the MoE pass used (likewise)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, compiled: CompiledGraph) -> None:
        with self._lock:
            self.graphs.append(compiled)

    @property
    def empty(self) -> bool:
        return not self.graphs

    def matches(self) -> MatchSet:
        merged = MatchSet()
        for g in self._distinct():
            merged.extend(g.matches)
        return merged

    def diff(self) -> GraphDiff:
        return merge([g.diff() for g in self._distinct()])

    def _distinct(self) -> list[CompiledGraph]:
        """Recompiles (new shapes, new guards) repeat a graph; count each distinct graph once. A graph is known by the
        weights it reads (recompiles for new shapes change the code, not the weights), or by its code if it has none."""
        seen: set[object] = set()
        out: list[CompiledGraph] = []
        for g in self.graphs:
            names = tuple(sorted(w.name for w in g.before.weights.values()))
            key = names or g.before.gm.code
            if key not in seen:
                seen.add(key)
                out.append(g)
        return out


_last = CompileSession()


def last_session() -> CompileSession:
    """The session of the most recent ``torch.compile(..., backend="deepseek_opt")`` without its own session."""
    return _last
