"""The pass contract (DESIGN decision 6): ``pass_(gm, ctx) -> PassResult``, small, idempotent and honest."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from ..capture import CapturedGraph
from ..patterns import MatchSet
from ..profile import Profile


@dataclass
class PassContext:
    """What every pass may read: the captured graph it rewrites, the matches, the profile."""

    captured: CapturedGraph
    matches: MatchSet
    profile: Profile
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    """A pass's rewritten graph, how many subgraphs it rewrote, and what it left alone and why."""

    name: str
    gm: GraphModule
    rewrites: int = 0
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rewrites": self.rewrites, "notes": list(self.notes),
                "skipped": list(self.skipped)}


PassFn = Callable[[GraphModule, PassContext], PassResult]


def session_plan(ctx: PassContext, key: str, matched: Any, plan_graph: Callable[..., Any], config: Any) -> Any:
    """The plan in ``ctx.options[key]`` (made by ``optimize`` from calibration, or by an earlier graph of this
    compile), extended by one calibrated on this graph's example inputs when it does not cover ``matched``. The
    backend keeps it in the session, so the runtime uses the same factors or experts."""
    plan = ctx.options.get(key)
    if plan is None or not plan.covers(matched):
        own = plan_graph(ctx.captured, matched, config)
        plan = own if plan is None else plan.merged(own)
        ctx.options[key] = plan
    return plan


def pass_uuid(fn: PassFn) -> str:
    """A stable id that changes when the pass's source changes, so compiled-graph caches invalidate."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(source.encode()).hexdigest()[:16]
