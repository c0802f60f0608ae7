"""The ``deepseek_opt`` torch.compile backend: options -> Profile -> matches -> passes -> lowering."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch.fx import GraphModule

from .capture import from_dynamo
from .debug_dump import dump_compiled
from .errors import ConfigError
from .lower import TARGETS, lower_graph
from .passes.base import PassContext
from .passes.cleanup import cleanup
from .passes.manager import check_supported, run_passes
from .patterns import match_all
from .profile import Profile, resolve_profile
from .session import CompiledGraph, CompileSession, last_session

log = logging.getLogger("dscompile")


@dataclass
class BackendOptions:
    """Options of ``torch.compile(model, backend="deepseek_opt", options={...})``.

    profile: a preset name, a Profile, a mapping or a profile file path (default ``"none"``);
    lower: ``"inductor"`` (default), ``"eager"`` or ``"tensorrt"``;
    fallback: run in PyTorch with a warning when TensorRT is missing or its build fails;
    session: a CompileSession that records what was compiled (default: the module-wide last session).
    """

    profile: Any = "none"
    lower: str = "inductor"
    fallback: bool = False
    session: CompileSession | None = None

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown deepseek_opt option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
        parsed = cls(**options)
        if parsed.lower not in TARGETS:
            raise ConfigError(f"unknown lower={parsed.lower!r}; valid targets: {', '.join(TARGETS)}")
        if not isinstance(parsed.fallback, bool):
            raise ConfigError(f"fallback must be True or False, got {parsed.fallback!r}")
        return parsed


def deepseek_opt(
    gm: GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Match, rewrite per profile, and lower one Dynamo graph."""
    opts = BackendOptions.parse(options)
    profile: Profile = resolve_profile(opts.profile)
    check_supported(profile)
    session = opts.session if opts.session is not None else last_session()
    start = time.perf_counter()
    cleanup(gm)  # dead nodes out first, so the diff shows what the passes did and nothing else
    captured = from_dynamo(gm, example_inputs)
    before = captured.snapshot()
    matches = match_all(captured)
    if matches.empty:
        log.info("deepseek_opt: no attention, FFN or LM head matched in this graph (%d nodes); compiled unchanged%s",
                 len(gm.graph.nodes), _miss_summary(matches))
    else:
        log.info("deepseek_opt: matched %s", matches.counts())
    ctx = PassContext(captured, matches, profile, options={"mla_plan": session.mla_plan, "moe_plan": session.moe_plan})
    results = run_passes(gm, ctx)
    session.mla_plan, session.moe_plan = ctx.options["mla_plan"], ctx.options["moe_plan"]
    if profile.rewrites:
        captured = from_dynamo(gm, example_inputs)  # the weights the passes added are known from here on
    matches_after = match_all(captured) if profile.rewrites else matches
    compiled = lower_graph(gm, example_inputs, opts.lower, mode=mode, fallback=opts.fallback)
    seconds = time.perf_counter() - start
    record = CompiledGraph(before, captured, matches, matches_after, results, opts.lower, seconds)
    session.record(record)
    dump_compiled(record)
    log.info("deepseek_opt: graph compiled with %s in %.2f s", opts.lower, seconds)
    return compiled


def _miss_summary(matches: Any) -> str:
    if not matches.near_misses:
        return ""
    return "; near-misses: " + "; ".join(f"{m.node}: {m.reason}" for m in matches.near_misses[:5])
