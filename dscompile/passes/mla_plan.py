"""An MLA plan: the latent factors of every attention layer of one model, computed once and shared.

The same factors serve three places: the forward graphs ``torch.compile`` hands the backend (K and V computed
through the latent), the runtime's cached program (which stores the latent instead of K and V) and healing (which
trains them). Layers are keyed by their K and V weight tensors, which are the same objects in a Dynamo graph, in
an exported program and in the model, so a plan made from one graph applies to the others. The factors are
``nn.Parameter`` objects registered as they are (never copied) wherever the plan is applied: healing one program
updates every program built from the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..calibrate import Gram, record_grams
from ..capture import CapturedGraph
from ..errors import ConfigError
from ..lowrank import JointFactors
from ..patterns import AttentionMatch
from ..profile import MLAConfig
from . import mla
from .mla_rope import choose_rope_dims, default_rope_dims, rope_reason
from .unfuse_qkv import source_ptr, split_fused_qkv

log = logging.getLogger("dscompile")

MIN_TOKENS_PER_WIDTH = 4
"""Calibration tokens wanted per input feature: fewer leave the whitening covariance poorly estimated."""

CALIBRATION_WINDOW = 512
"""Calibration text is cut into windows of this many tokens (one prefill each, four rows at a time)."""

Key = tuple[int, tuple[int, ...], int, tuple[int, ...]]


def layer_key(attn: AttentionMatch) -> Key | None:
    """Identity of a layer across graphs: where its K and V weights live, and their shapes."""
    k, v = attn.k.weight.tensor, attn.v.weight.tensor
    if k is None or v is None:
        return None
    return source_ptr(k), tuple(k.shape), source_ptr(v), tuple(v.shape)


@dataclass
class MLAPlan:
    """Factors by layer, what calibration saw, and the layers left with a full cache (name -> reason)."""

    config: MLAConfig
    factors: dict[Key, JointFactors] = field(default_factory=dict)
    layers: dict[Key, str] = field(default_factory=dict)  # key -> layer name, for reports
    calibration_tokens: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    rope_dims: dict[Key, tuple[int, ...]] = field(default_factory=dict)  # absorb mode: rotary dims kept per layer

    @property
    def absorb(self) -> bool:
        return self.config.rope_mode == "absorb"

    def reason(self, attn: AttentionMatch) -> str | None:
        """Why ``attn`` cannot take a latent under this plan's mode, or None."""
        return mla.unsupported_reason(attn) or (rope_reason(attn, self.config.rope_dims) if self.absorb else None)

    def rope_for_attentions(self, attentions: Sequence[AttentionMatch]) -> dict[int, tuple[int, ...]] | None:
        """Absorb mode: the rotary dims kept by each of ``attentions`` the plan covers (None in reconstruct mode)."""
        if not self.absorb:
            return None
        return {i: self.rope_dims[layer_key(a)] for i, a in enumerate(attentions) if layer_key(a) in self.rope_dims}

    def apply(self, program: mla.CachedProgram) -> mla.MLAResult:
        """Give ``program`` the latent cache of this plan's layers."""
        attentions = unfuse_program(program)
        return mla.apply_latent_cache(program, self.for_attentions(attentions), self.rope_for_attentions(attentions))

    def for_attentions(self, attentions: Sequence[AttentionMatch]) -> dict[int, JointFactors]:
        """The factors of ``attentions`` (by index) that this plan covers."""
        out = {}
        for i, attn in enumerate(attentions):
            key = layer_key(attn)
            if key is not None and key in self.factors:
                out[i] = self.factors[key]
        return out

    def covers(self, attentions: Sequence[AttentionMatch]) -> bool:
        """True when every layer of ``attentions`` that can take a latent has factors here."""
        ready = [a for a in attentions if self.reason(a) is None]
        return bool(ready) and all(layer_key(a) in self.factors for a in ready)

    def merged(self, other: MLAPlan) -> MLAPlan:
        """This plan plus the layers only ``other`` covers (a model that Dynamo split into several graphs)."""
        for key, f in other.factors.items():
            self.factors.setdefault(key, f)
            self.layers.setdefault(key, other.layers[key])
        self.skipped.update(other.skipped)
        self.rope_dims.update({k: v for k, v in other.rope_dims.items() if k not in self.rope_dims})
        self.calibration_tokens = max(self.calibration_tokens, other.calibration_tokens)
        return self

    def sync(self) -> None:
        """After healing: nothing to do (every program reads the same factors)."""

    def ranks(self) -> dict[str, int]:
        return {self.layers[k]: f.rank for k, f in self.factors.items()}

    def truncated(self, ranks: Sequence[int]) -> MLAPlan:
        """This plan's layers at ``ranks`` (one per layer, in the order of its factors): each layer's leading latent
        dimensions, which are the rank-``r`` factorization, for a plan made at full rank."""
        if len(ranks) != len(self.factors):
            raise ConfigError(f"ranks needs one entry per factored layer ({len(self.factors)}), got {len(ranks)}")
        plan = MLAPlan(self.config, layers=dict(self.layers), calibration_tokens=self.calibration_tokens,
                       skipped=dict(self.skipped), rope_dims=dict(self.rope_dims))
        for (key, f), r in zip(self.factors.items(), ranks):
            if not 1 <= r <= f.rank:
                raise ConfigError(f"rank {r} for {self.layers[key]} is outside [1, {f.rank}]")
            plan.factors[key] = JointFactors(_parameter(f.down[:r].clone()), [_parameter(u[:, :r]) for u in f.ups],
                                             f.spectrum)
        return plan


def make_plan(config: MLAConfig, attentions: Sequence[AttentionMatch], grams: dict[int, Gram] | None,
              tokens: int, *, ranks: Sequence[int] | None = None, full_rank: bool = False,
              warn: bool = True) -> MLAPlan:
    """Factor ``attentions`` under ``config``'s KV budget split evenly, or at ``ranks`` (one per layer that takes a
    latent), or at every layer's full rank; with ``warn``, warn when ``tokens`` of calibration is too little."""
    plan = MLAPlan(config, calibration_tokens=tokens)
    if warn:
        _warn_if_thin(attentions, tokens)
    rope: dict[int, tuple[int, ...]] | None = None
    if plan.absorb:
        rope = {i: choose_rope_dims(a, mla.layer_covariance(grams, i), default_rope_dims(a, config.kv_ratio)
                                    if config.rope_dims is None else config.rope_dims)
                for i, a in enumerate(attentions) if plan.reason(a) is None}
    factors = mla.factorize_attention(attentions, grams, 1.0 if full_rank else config.kv_ratio,
                                      v_weight=config.v_weight, ranks=ranks, rope_dims=rope,
                                      shrinkage=config.shrinkage)
    for i, attn in enumerate(attentions):
        reason = plan.reason(attn)
        if reason is not None:
            plan.skipped[attn.layer] = reason
            continue
        key = layer_key(attn)
        f = factors[i]
        plan.factors[key] = JointFactors(_parameter(f.down), [_parameter(u) for u in f.ups], f.spectrum)
        plan.layers[key] = attn.layer
        if rope is not None:
            plan.rope_dims[key] = rope[i]
    log.info("mla plan (%s): %d layers, ranks %s, %d calibration tokens%s", config.rope_mode, len(plan.factors),
             sorted(set(plan.ranks().values())), tokens,
             "".join(f"; {name} skipped: {why}" for name, why in plan.skipped.items()))
    return plan


def plan_program(program: mla.CachedProgram, config: MLAConfig, batches: Sequence[torch.Tensor],
                 model: torch.nn.Module | None = None, progress: bool = True) -> MLAPlan:
    """Calibrate on ``batches`` of token ids through the runtime's program (before any latent rewrite) and plan.
    ``config.ranks == "sensitivity"`` measures each layer against ``program`` with ``model``'s latent program."""
    attentions = unfuse_program(program)
    windows = calibration_windows(batches, fitting_window(program))
    grams = mla.calibrate(program, windows)
    tokens = sum(w.numel() for w in windows)
    if config.ranks != "sensitivity":
        return make_plan(config, attentions, grams, tokens)
    if model is None:
        raise ConfigError("mla.ranks='sensitivity' measures the model's layers: plan_program needs the model")
    from .mla_ranks import sensitive_plan

    return sensitive_plan(config, attentions, grams, tokens, model, program, batches, progress)


def unfuse_program(program: mla.CachedProgram) -> list[AttentionMatch]:
    """Split the program's fused QKV projections (see :mod:`.unfuse_qkv`) so their K and V can take a latent."""
    program.matches.attention = split_fused_qkv(program.gm, program.matches.attention)
    return program.matches.attention


def plan_graph(captured: CapturedGraph, attentions: Sequence[AttentionMatch], config: MLAConfig) -> MLAPlan:
    """Calibrate on the graph's own example inputs (what ``torch.compile`` gives a backend) and plan."""
    if config.refine:
        log.warning("mla.refine: refinement fits the factors on calibration text, which a bare torch.compile does "
                    "not have; these factors are not refined (use dscompile.optimize(model, profile, "
                    "calibration=...))")
    if config.ranks == "sensitivity":
        log.warning("mla.ranks='sensitivity' measures each layer on calibration text, which a bare torch.compile "
                    "does not have; the budget is split evenly (use dscompile.optimize(model, profile, "
                    "calibration=...))")
    inputs = list(dict.fromkeys(a.k.input for a in attentions if mla.unsupported_reason(a) is None))
    if not inputs:
        return make_plan(config, attentions, None, 0)
    with record_grams(captured.gm, inputs) as grams:
        captured.gm(*captured.inputs)
    by_layer = {i: grams[a.k.input.name] for i, a in enumerate(attentions) if a.k.input.name in grams}
    tokens = max(g.tokens for g in grams.values())
    return make_plan(config, attentions, by_layer, tokens)


def fitting_window(program: mla.CachedProgram, window: int = CALIBRATION_WINDOW) -> int:
    """``window``, or fewer tokens when the model has fewer positions (a learned position table)."""
    return min(window, program.max_positions or window)


def calibration_windows(batches: Sequence[torch.Tensor], window: int = CALIBRATION_WINDOW,
                        rows: int = 4) -> list[torch.Tensor]:
    """Token batches cut into ``[rows, window]`` prefills (long texts would exceed positions and memory)."""
    pieces = [row[i:i + window] for batch in batches for row in batch for i in range(0, row.numel(), window)]
    out = []
    for length in sorted({p.numel() for p in pieces}, reverse=True):
        same = [p for p in pieces if p.numel() == length]
        out += [torch.stack(same[i:i + rows]) for i in range(0, len(same), rows)]
    return out


def _warn_if_thin(attentions: Sequence[AttentionMatch], tokens: int) -> None:
    widths = [a.k.in_features for a in attentions if mla.unsupported_reason(a) is None]
    wanted = MIN_TOKENS_PER_WIDTH * max(widths, default=0)
    if tokens < wanted:
        log.warning("mla: calibrated on %d tokens, fewer than the %d that a %d-wide projection input wants "
                    "(%d per feature); the factors will fit these tokens and generalise poorly: pass more text as "
                    "calibration=", tokens, wanted, max(widths), MIN_TOKENS_PER_WIDTH)


def _parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor.detach().contiguous(), requires_grad=False)
