"""The user-facing entry points: ``optimize`` (compile a model per profile) and ``inspect`` (what would match)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .backend import deepseek_opt
from .capture import capture_dynamo, capture_export, check_model, split_inputs
from .data import token_batches, token_count
from .errors import CaptureError, ConfigError, MatchError
from .lower import TARGETS
from .monitor import Monitor
from .passes.kv_cache import CachedProgram, build_cached_program
from .passes.manager import check_supported
from .passes.mla_plan import plan_program
from .passes.mla_refine import refine_plan
from .passes.moe_plan import plan_program as plan_moe
from .passes.mtp_heads import MTPHeads, build_heads
from .passes.mtp_program import expose_hidden
from .patterns import MatchSet, match_all
from .profile import Profile, resolve_profile
from .report import Report
from .runtime import Runtime
from .session import CompileSession

if TYPE_CHECKING:
    from .passes.moe_offload import ExpertStore

log = logging.getLogger("dscompile")

MIN_CALIBRATION_TOKENS = 2048


class OptimizedModel(torch.nn.Module):
    """An ``nn.Module`` whose forward runs the compiled, rewritten program and returns what the original returns.

    The program is frozen to the weights it saw when it was compiled (DESIGN decision 3): after changing the
    original's weights, call :func:`optimize` again.
    """

    def __init__(self, model: torch.nn.Module, profile: Profile, *, lower: str = "inductor",
                 fallback: bool = False, dynamic: bool | None = None):
        super().__init__()
        self.original = model
        self.profile = profile
        self.lower = lower
        self.session = CompileSession()
        self._options = {"profile": profile, "lower": lower, "fallback": fallback, "session": self.session}
        self._dynamic = dynamic
        self._compiled = self._compile()
        self._runtime: Runtime | None = None
        self._program: CachedProgram | None = None  # built early when calibration needs it, else by runtime()
        self._heads: MTPHeads | None = None
        self._expert_folder: Any = None  # the temporary folder of offloaded experts, removed with this model

    def _compile(self) -> Any:
        backend = functools.partial(deepseek_opt, options=self._options)
        return torch.compile(self.original, backend=backend, dynamic=self._dynamic)

    def refresh(self) -> None:
        """Recompile the forward and the decode step on next use (after healing changed the factors)."""
        self._compiled = self._compile()
        if self._runtime is not None:
            self._runtime.reset_compiled()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled(*args, **kwargs)

    @property
    def config(self) -> Any:
        """The original model's config (Hugging Face models), so code that reads ``model.config`` keeps working."""
        return getattr(self.original, "config", None)

    def runtime(self) -> Runtime:
        """The generation runtime that owns the KV cache; built (exported and rewritten) on first use."""
        if self._runtime is None:
            program = self._program if self._program is not None else build_cached_program(self.original)
            self._program = None
            self.apply_plans(program)
            drafter = None
            if self.profile.mtp is not None:
                expose_hidden(program)
                drafter = self.mtp_heads(program)
                if not drafter.trained:
                    log.warning("MTP heads are untrained: drafts will rarely be accepted until dscompile.train_mtp "
                                "trains them (or profile mtp.heads names a trained file)")
            config = getattr(self.original, "generation_config", None)
            self._runtime = Runtime(
                program, lower="eager" if self.lower == "eager" else "inductor", max_positions=program.max_positions,
                pad_token_id=getattr(config, "pad_token_id", None), eos_token_id=getattr(config, "eos_token_id", None),
                drafter=drafter, speculation=self.profile.mtp.speculation if self.profile.mtp else "adaptive",
            )
        return self._runtime

    def apply_plans(self, program: CachedProgram) -> None:
        """Rewrite a runtime program with the profile's calibrated MLA and MoE plans (the runtime's, healing's and
        MTP training's programs all compute what the compiled forward computes)."""
        for rewrite, plan in (("mla", self.session.mla_plan), ("moe", self.session.moe_plan)):
            if getattr(self.profile, rewrite) is not None and plan is not None:
                plan.apply(program)

    def mtp_heads(self, program: CachedProgram | None = None) -> MTPHeads:
        """The MTP heads of this model (built on first use from ``program``, or from a fresh runtime program):
        initialised from the model's last FFN, or loaded from ``profile.mtp.heads``; trained by
        :func:`dscompile.train_mtp`."""
        if self.profile.mtp is None:
            raise ConfigError(f"profile {self.profile.name!r} has no MTP: optimize with profile 'mtp' or "
                              "{'mtp': {'depth': 3}}")
        if self._heads is None:
            self._heads = build_heads(program if program is not None else build_cached_program(self.original),
                                      self.profile.mtp)
        return self._heads

    def save_mtp(self, path: str) -> None:
        """Save the trained MTP heads (safetensors); load them with profile ``{"mtp": {"heads": path}}``."""
        self.mtp_heads().save(path)

    def save(self, path: str, *, source: str | None = None) -> None:
        """Save the profile, the rewrites (MLA factors, MoE experts, healed or not) and trained MTP heads to the
        folder ``path``; :func:`dscompile.load_optimized` rebuilds the model from it without calibrating.
        ``source`` names the model to load when none is passed then (an embedded name or a checkpoint folder)."""
        from .saved import save_optimized

        save_optimized(self, path, source=source)

    def offload_experts(self, cache_experts: int, folder: str | Path | None = None, *,
                        page_out_dense: bool = True) -> list[ExpertStore]:
        """Keep the routed MoE experts in files and only ``cache_experts`` of them per FFN in memory (the most
        recently used), so a model bigger than memory runs: a token reads its ``top_k`` experts through the cache.

        ``folder`` receives the expert files (a temporary folder, removed with this model, by default). With
        ``page_out_dense`` the source model's dense FFN weights, which the carved programs no longer read, move to
        a file there too and are mapped back copy-on-write: the source model keeps its values and still runs, and
        their memory is given back. Heal and save before offloading: both refuse offloaded experts. Returns the
        stores (``stats()``: hits, misses, bytes read).
        """
        from .passes.moe_offload import (
            drop_paged_out,
            expert_folder,
            offload_plan,
            owning_parameters,
            point_at_stores,
            release_heap,
        )
        from .passes.moe_offload import page_out_dense as page_out
        from .passes.moe_plan import ffn_key

        plan = self.session.moe_plan
        if self.profile.moe is None or plan is None or not plan.layers:
            raise ConfigError("nothing to offload: this model has no carved FFNs (optimize it with a MoE profile "
                              "such as 'moe' first)")
        if self.profile.moe.router != "linear":
            raise ConfigError(f"cannot offload experts routed by {self.profile.moe.router!r}: every routed neuron's "
                              "gate and up rows are read for every token, so they must stay in memory; offload "
                              "needs moe.router='linear'")
        program = self.runtime().program  # exported before the experts leave memory
        path, handle = expert_folder(folder)
        if handle is not None:
            self._expert_folder = handle
        stores = offload_plan(plan, cache_experts, path)
        for gm in (program.gm, program.decode_gm):
            if gm is not None:
                point_at_stores(gm, plan)
        if page_out_dense:
            carved = [f for f in program.matches.ffn if plan.carved(f) is not None]
            before = [ffn_key(f) for f in carved]
            moved = page_out(owning_parameters(self.original, [lin.weight.tensor for f in carved
                                                               for lin in (f.up, f.gate, f.down) if lin is not None]),
                             path)
            plan.rekey(dict(zip(before, (ffn_key(f) for f in carved))))
            log.info("moe: %.0f MiB of dense FFN weights paged out to %s", moved / 2**20, path)
        self._runtime.reset_compiled()
        self.refresh()
        drop_paged_out()
        release_heap()
        return stores

    @property
    def monitor(self) -> Monitor:
        """Time to first token, decode tokens/s, cache bytes and peak memory of every ``generate`` call."""
        return self.runtime().monitor

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Prompt plus new tokens, with Hugging Face ``generate`` semantics, in dscompile's own runtime.

        Keyword arguments: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``max_length``,
        ``streamer`` (a callable, or an object with ``put``/``end`` like HF streamers) and ``generator``.
        """
        return self.runtime().generate(input_ids, attention_mask, max_new_tokens, **kwargs)

    def report(self) -> Report:
        """What the compile matched and rewrote; available after the first call (``optimize`` makes one)."""
        report = Report.from_session(self.session, self.profile)
        last = self._runtime.monitor.last if self._runtime is not None else None
        if last is not None and "mtp_tokens_per_step" in last.extra:  # MTP: the latest generate call's acceptance
            report.extra.update(mtp_acceptance=last.extra["mtp_acceptance"],
                                mtp_tokens_per_step=last.extra["mtp_tokens_per_step"])
        return report

    def matches(self) -> MatchSet:
        return self.session.matches()

    def plan(self, batches: list[torch.Tensor]) -> None:
        """Calibrate the profile's lossy rewrites (MLA factors, MoE experts) on ``batches`` of token ids, before the
        first compile (``optimize`` does it)."""
        self._program = build_cached_program(self.original)
        if self.profile.mla is not None:
            self.session.mla_plan = plan_program(self._program, self.profile.mla, batches, self.original)
            if self.profile.mla.refine:
                refine_plan(self.session.mla_plan, self.original, self._program, batches,
                            max_minutes=self.profile.mla.refine_minutes)
        if self.profile.moe is not None:
            self.session.moe_plan = plan_moe(self._program, self.profile.moe, batches)


def optimize(
    model: torch.nn.Module,
    profile: Profile | str | dict[str, Any] | None = "none",
    calibration: Any = None,
    example_inputs: Any = None,
    *,
    tokenizer: Any = None,
    lower: str = "inductor",
    fallback: bool = False,
    dynamic: bool | None = None,
) -> OptimizedModel:
    """Compile ``model`` with the ``deepseek_opt`` backend under ``profile`` and run it once on the example inputs.

    ``calibration`` is token data (a LongTensor, a list of them, or texts with ``tokenizer=``); when
    ``example_inputs`` is missing its first rows serve as the example. Everything is validated before any work.
    """
    check_model(model)
    resolved = resolve_profile(profile)
    check_supported(resolved)
    if lower not in TARGETS:
        raise ConfigError(f"unknown lower={lower!r}; valid targets: {', '.join(TARGETS)}")
    batches = token_batches(calibration, tokenizer) if calibration is not None else None
    if batches is not None and resolved.rewrites and token_count(batches) < MIN_CALIBRATION_TOKENS:
        log.warning("calibration holds %d tokens; lossy rewrites want at least %d for stable statistics",
                    token_count(batches), MIN_CALIBRATION_TOKENS)
    if example_inputs is None and batches is not None:
        example_inputs = batches[0][:1, :128]
    split_inputs(example_inputs)  # bad example inputs fail before calibration
    optimized = OptimizedModel(model, resolved, lower=lower, fallback=fallback, dynamic=dynamic)
    if (resolved.mla is not None or resolved.moe is not None) and batches is not None:
        optimized.plan(batches)
    compile_once(optimized, example_inputs)
    log.info("optimize: profile %s, %s", resolved.name, optimized.matches())
    return optimized


def compile_once(optimized: OptimizedModel, example_inputs: Any) -> None:
    """Run ``optimized`` once on ``example_inputs`` so the backend compiles it, and check what it found."""
    args, kwargs = split_inputs(example_inputs)
    with torch.no_grad():
        optimized(*args, **kwargs)
    model = optimized.original
    if optimized.session.empty:
        raise CaptureError(
            f"torch.compile ran {type(model).__name__} without calling the deepseek_opt backend (Dynamo's recompile "
            "limit for this model class is probably reached); call torch._dynamo.reset() or raise "
            "torch._dynamo.config.recompile_limit, then optimize again"
        )
    check_causal_lm(model, optimized.matches())


def check_causal_lm(model: torch.nn.Module, matches: MatchSet) -> None:
    """``optimize`` is for causal language models: say plainly when the model is something else."""
    name = type(model).__name__
    if not matches.attention:
        misses = "; ".join(f"{m.node}: {m.reason}" for m in matches.near_misses if m.kind == "attention")
        raise MatchError(
            f"no attention was found in {name}, so it is not a transformer language model dscompile can optimize"
            + (f" (near-misses: {misses})" if misses else "")
            + "; run dscompile.inspect(model, example_inputs) to see what the matchers saw"
        )
    if not matches.lm_head:
        raise MatchError(f"{name} has attention but no LM head (a projection onto the vocabulary): dscompile "
                         "optimizes causal language models whose forward returns logits")
    bidirectional = [a.layer for a in matches.attention if a.causal is False]
    if bidirectional:
        raise MatchError(f"{name} is not a causal language model: attention in {', '.join(bidirectional[:3])} "
                         "sees future tokens (no causal mask)")


def inspect(model: torch.nn.Module, example_inputs: Any, *, path: str = "export", dynamic: bool = False) -> MatchSet:
    """What the matchers find in ``model``: ``.attention``, ``.ffn``, ``.lm_head`` and ``.near_misses``.

    ``path`` is ``"export"`` (``torch.export``, ATen IR) or ``"dynamo"`` (the graphs ``torch.compile`` sees).
    """
    if path == "export":
        return match_all(capture_export(model, example_inputs, dynamic=dynamic))
    if path == "dynamo":
        merged = MatchSet()
        for graph in capture_dynamo(model, example_inputs, dynamic=dynamic):
            merged.extend(match_all(graph))
        return merged
    raise ConfigError(f"unknown capture path {path!r}; valid paths: export, dynamo")
