"""Healing: distil the original model's next-token distributions into a rewritten program, training only the
parameters the passes created (MLA factors, MoE experts and routers), so a lossy rewrite recovers quality in minutes.

The loss is ``KL(original || rewritten)`` over every position of calibration windows, the teacher's logits computed
once up front. The program is run as a prefill with fresh caches (its in-place cache writes are part of the
autograd graph, which is fine: caches are not parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .data import token_batches, token_count
from .errors import ConfigError
from .evaluate import logits_of
from .passes.kv_cache import CachedProgram, build_cached_program
from .passes.mla_plan import calibration_windows, fitting_window
from .runtime.generate import prefill_logits
from .train_loop import train_parameters

if TYPE_CHECKING:
    from .api import OptimizedModel

log = logging.getLogger("dscompile")

CREATED_PREFIXES = ("mla_", "moe_")
HEAL_WINDOW = 256
MIN_HEAL_TOKENS = 4096
HEAL_LR = 3e-4
"""Healing's learning rate for factors straight from calibration."""
HEAL_LR_REFINED = 1e-4
"""Healing's learning rate after MLA refinement: its factors start close, and 3e-4 undid part of refinement (at a 50%
KV cut on SmolLM2 the KL rose 0.041 -> 0.060 at 3e-4; at 1e-4 held-out perplexity fell further, docs -1.2% -> -1.6%,
code +6.6% -> +5.1%)."""
HEAL_LR_MOE = 3e-5
"""Healing's learning rate when the profile carves MoE experts: every expert row of the FFN trains, and 1e-4 raised
the KL of SmolLM2 at 50% active (0.88 -> 1.64 in 8 minutes), while 3e-5 healed experts routed by activation at 25%
active from +34.4% / +34.8% to +4.2% / +16.9% perplexity (docs / code) in 10 minutes."""


@dataclass
class HealReport:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    trained_parameters: int = 0
    lr: float = 0.0


def heal(optimized: OptimizedModel, data: Any, tokenizer: Any = None, max_minutes: float = 30.0, *,
         lr: float | None = None, max_steps: int | None = None, progress: bool = True) -> HealReport:
    """Distil the original model into ``optimized``'s rewritten one, training only what the passes created.

    ``data`` is token ids (a LongTensor or a list) or texts with ``tokenizer``; it is cut into windows of
    256 tokens, two per step. Training stops after ``max_minutes`` (or ``max_steps``). ``lr`` defaults to
    ``HEAL_LR`` (3e-4), ``HEAL_LR_REFINED`` (1e-4) when the profile refined its MLA factors, or ``HEAL_LR_MOE``
    (3e-5) when it carves MoE experts. The healed factors
    are shared by the compiled forward and the generation runtime, which are recompiled on next use.
    """
    plans = [p for p in (optimized.session.mla_plan, optimized.session.moe_plan) if p is not None and p.layers]
    if not plans:
        raise ConfigError("nothing to heal: this model has no rewritten layers (optimize it with a lossy profile "
                          "such as 'mla' or 'moe' first)")
    for carved in optimized.session.moe_plan.layers.values() if optimized.session.moe_plan is not None else ():
        carved.in_memory("heal")
    batches = token_batches(data, tokenizer)
    if token_count(batches) < MIN_HEAL_TOKENS:
        log.warning("healing on %d tokens: with fewer than %d the factors fit this text rather than the model; "
                    "pass more text", token_count(batches), MIN_HEAL_TOKENS)
    program = build_cached_program(optimized.original, logits="all")
    windows = calibration_windows(batches, fitting_window(program, HEAL_WINDOW), rows=2)
    optimized.apply_plans(program)
    if lr is None:
        refined = optimized.profile.mla is not None and optimized.profile.mla.refine
        carved = optimized.profile.moe is not None
        lr = HEAL_LR_MOE if carved else HEAL_LR_REFINED if refined else HEAL_LR
        log.info("healing at lr %g%s", lr, " (MoE experts)" if carved else
                 " (the MLA factors were refined)" if refined else "")
    report = heal_program(program, optimized.original, windows, max_minutes=max_minutes, max_steps=max_steps, lr=lr,
                          progress=progress)
    for plan in plans:
        plan.sync()  # MoE: decode's gathered expert rows take the trained weights
    optimized.refresh()
    return report


def created_parameters(program: CachedProgram) -> dict[str, torch.nn.Parameter]:
    """The parameters a pass added to the program (by name prefix), the only ones healing trains."""
    return {name: p for name, p in program.gm.named_parameters() if name.startswith(CREATED_PREFIXES)}


def heal_program(program: CachedProgram, original: torch.nn.Module, batches: Sequence[torch.Tensor], *,
                 max_minutes: float = 30.0, max_steps: int | None = None, lr: float = 1e-4,
                 progress: bool = False) -> HealReport:
    """Train the program's created parameters to match ``original``'s logits on ``batches`` (token ids
    ``[batch, tokens]``), cycling through them until ``max_minutes`` or ``max_steps``."""
    params = created_parameters(program)
    if not params:
        raise ConfigError("nothing to heal: the program has no parameters created by a pass")
    if not batches:
        raise ConfigError("healing needs at least one batch of token ids")
    if max_minutes <= 0 or lr <= 0:
        raise ConfigError(f"max_minutes and lr must be positive, got {max_minutes} and {lr}")
    with torch.no_grad():
        teachers = [torch.log_softmax(logits_of(original(x)).float(), -1) for x in batches]

    def loss_of_step(step: int) -> torch.Tensor:
        i = step % len(batches)
        logits = prefill_logits(program, batches[i])
        if logits.shape[1] != batches[i].shape[1]:
            raise ConfigError("healing needs the program's logits at every position: build it with logits='all'")
        student = torch.log_softmax(logits.float(), -1)
        return (teachers[i].exp() * (teachers[i] - student)).sum(-1).mean()  # KL per token

    run = train_parameters(program.gm, params, loss_of_step, max_minutes=max_minutes, max_steps=max_steps, lr=lr,
                           progress=progress, desc="healing", metric="kl")
    report = HealReport(run.steps, run.seconds, run.losses, sum(p.numel() for p in params.values()), lr)
    log.info("healed %d parameters in %d steps (%.0f s): KL %.4f -> %.4f", report.trained_parameters, report.steps,
             report.seconds, report.losses[0], report.losses[-1])
    return report
