"""The report of a compile: matches, passes, parameters and KV bytes before and after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .accounting import active_params_per_token
from .capture import count_params
from .diff import GraphDiff
from .passes.base import PassResult
from .patterns import MatchSet
from .profile import Profile
from .session import CompileSession


def _distinct_params(graphs: list[Any], attr: str) -> int:
    return count_params(ref for g in graphs for ref in getattr(g, attr).read_weights())


def _plan_extra(session: CompileSession) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plan = session.mla_plan
    if plan is not None:
        out.update(mla_ranks=plan.ranks(), mla_calibration_tokens=plan.calibration_tokens,
                   mla_skipped=dict(plan.skipped))
    plan = session.moe_plan
    if plan is not None:
        out.update(moe_expert_load=plan.loads(), moe_maxvio=plan.maxvio(),
                   moe_calibration_tokens=plan.calibration_tokens, moe_skipped=dict(plan.skipped))
        cache = plan.cache_stats()
        if cache:
            out.update(moe_expert_cache=cache)
    return out


@dataclass
class Report:
    """What a compile found and did; ``to_dict()`` is the stable, JSON-ready form."""

    profile: Profile
    matches: MatchSet
    diff: GraphDiff
    passes: list[PassResult]
    params_before: int
    params_after: int
    active_params_per_token: int
    graphs: int
    compile_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_session(cls, session: CompileSession, profile: Profile) -> Report:
        graphs = session._distinct()
        if not graphs:
            raise ValueError("nothing was compiled yet: call the model once before asking for a report")
        before = _distinct_params(graphs, "before")
        after = _distinct_params(graphs, "after")
        first = graphs[0]
        active = active_params_per_token(first.after, first.matches_after) + (after - first.after.param_count())
        if session.moe_plan is not None:  # offloaded experts are parameters too, outside the graphs
            offloaded = session.moe_plan.offloaded_params()
            after += offloaded
            active += offloaded - session.moe_plan.inactive_params()
        return cls(
            profile=profile, matches=session.matches(), diff=session.diff(),
            passes=[p for g in graphs for p in g.passes], params_before=before, params_after=after,
            active_params_per_token=active, graphs=len(graphs),
            compile_seconds=sum(g.seconds for g in graphs), extra=_plan_extra(session),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_dict(),
            "kv_bytes_per_token_before": self.diff.kv_bytes_per_token_before,
            "kv_bytes_per_token_after": self.diff.kv_bytes_per_token_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "active_params_per_token": self.active_params_per_token,
            "matches": self.matches.to_dict(),
            "passes": [p.to_dict() for p in self.passes],
            "graphs": self.graphs,
            "compile_seconds": round(self.compile_seconds, 3),
            "diff": self.diff.to_dict(),
            **self.extra,
        }

    def __str__(self) -> str:
        c = self.matches.counts()
        return "\n".join([
            f"dscompile report (profile {self.profile.name})",
            f"  graphs compiled      {self.graphs} in {self.compile_seconds:.2f} s",
            f"  matched              attention {c['attention']}, ffn {c['ffn']}, lm_head {c['lm_head']}, "
            f"near-misses {len(self.matches.near_misses)}",
            f"  parameters           {self.params_before:,} -> {self.params_after:,}",
            f"  active per token     {self.active_params_per_token:,}",
            f"  KV bytes per token   {self.diff.kv_bytes_per_token_before:,} -> {self.diff.kv_bytes_per_token_after:,}",
        ])
