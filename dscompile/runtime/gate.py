"""Adaptive speculation: draft only while drafting pays.

A speculative step costs more than a plain one (the heads draft, then the model verifies ``depth + 1`` tokens). It
pays only while the tokens it keeps per row (tau) exceed that cost ratio. Untrained heads, text unlike the heads'
training data, or a verification that is compute-bound make it a loss: SmolLM2 with untrained heads decoded at 21
tokens/s speculating against 49 plainly. The gate measures both kinds of step (wall time, which includes the
per-step synchronisation the acceptance test needs anyway) and the recent tau, speculates while
``tau x plain > speculative``, and otherwise decodes plainly, probing with one speculative step now and then
(ever more rarely while probes keep failing) so that it notices when drafts become good again.
"""

from __future__ import annotations

from typing import Any

from ..profile import SPECULATION_MODES as MODES

SMOOTHING = 0.25  # weight of the newest measurement in the running averages
PROBE_EVERY = 8  # plain steps before the first probe; doubled after every failed probe
MAX_PROBE_EVERY = 128
OUTLIER = 4.0  # a step this many times slower than its kind's average is a recompile or a hiccup: not measured


class SpeculationGate:
    """Per batch size: running step costs of both kinds, running tau, and the decision for the next step."""

    def __init__(self, mode: str = "adaptive"):
        if mode not in MODES:
            raise ValueError(f"speculation mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.seconds: dict[bool, float | None] = {True: None, False: None}  # running step seconds by kind
        self.seen = {True: 0, False: 0}
        self.tau: float | None = None
        self.probe_every = PROBE_EVERY
        self.plain_run = 0  # plain steps since the last speculative one

    def speculate(self) -> bool:
        """Whether the next step drafts and verifies."""
        if self.mode == "always":
            return True
        spec, plain = self.seconds[True], self.seconds[False]
        if spec is None or self.tau is None:
            return True  # measure speculation first (the first step of each kind is not measured: it may compile)
        if plain is None:
            return False
        if self.pays():
            return True
        return self.plain_run >= self.probe_every

    def pays(self) -> bool:
        """Whether, by the running averages, a speculative step yields more tokens per second than a plain one."""
        spec, plain = self.seconds[True], self.seconds[False]
        return self.tau is not None and spec is not None and plain is not None and self.tau * plain > spec

    def observe(self, speculated: bool, seconds: float, tau: float | None = None) -> None:
        """Record a step: its wall time, and for a speculative step the mean tokens its active rows kept."""
        self.seen[speculated] += 1
        old = self.seconds[speculated]
        if self.seen[speculated] > 1 and (old is None or seconds <= OUTLIER * old):
            self.seconds[speculated] = seconds if old is None else old + SMOOTHING * (seconds - old)
        if not speculated:
            self.plain_run += 1
            return
        if tau is not None:
            self.tau = tau if self.tau is None else self.tau + SMOOTHING * (tau - self.tau)
        if self.plain_run:  # a probe: back off while it keeps failing
            self.probe_every = PROBE_EVERY if self.pays() else min(2 * self.probe_every, MAX_PROBE_EVERY)
        self.plain_run = 0

    def describe(self) -> dict[str, Any]:
        """The running figures, for the monitor."""
        spec, plain = self.seconds[True], self.seconds[False]
        return {"mode": self.mode, "tau": None if self.tau is None else round(self.tau, 3),
                "cost_ratio": None if spec is None or plain is None else round(spec / plain, 3)}
