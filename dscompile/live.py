"""A live, one-line status of a running ``generate`` call: tokens, tokens/s, KV cache bytes, MTP acceptance, and
expert load.

:class:`LiveMonitor` is a streamer (``opt.generate(..., streamer=LiveMonitor.for_model(opt, sys.stderr))``): the
runtime hands it each step's tokens, and it rewrites one line on its stream with ``\\r``, at most ``1 / interval``
times a second, so a fast decode loop is not slowed by terminal output. It writes only to the stream it is given
(the library itself never prints). Figures it cannot see per step come from elsewhere: the KV bytes are the
program's bytes per token times the tokens held; MTP acceptance arrives through the runtime's ``put_stats`` hook
after each verification; MoE expert load is read from the runtime's live counters (tokens per expert so far, see
:mod:`.runtime.expert_load`), or, before any token was routed, is the calibrated load from the plan, labelled so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import torch

from .runtime.expert_load import expert_counters


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _load_peak(loads: Mapping[str, Sequence[float]]) -> float | None:
    """The busiest expert's load over its layer's mean, across layers (1.00 is perfectly even)."""
    peaks = [max(v) / (sum(v) / len(v)) for v in loads.values() if v and sum(v) > 0]
    return max(peaks) if peaks else None


class LiveMonitor:
    """A streamer that shows generation progress on one refreshing line of ``stream`` (``sys.stderr`` if None).

    ``cache_bytes_per_token`` (per row) and ``prompt_tokens`` give the cache bytes held so far; ``expert_load`` is a
    MoE plan's calibrated load (``Report.to_dict()["moe_expert_load"]``) and ``expert_counters`` the runtime's live
    counters by layer (shown instead once they hold tokens). ``clock`` is injectable for tests. After
    ``end()`` the monitor is ready for the next call; ``lines`` keeps every line written and ``updates`` counts them.
    """

    def __init__(self, stream: TextIO | None = None, *, cache_bytes_per_token: int = 0, prompt_tokens: int = 0,
                 expert_load: Mapping[str, Sequence[float]] | None = None,
                 expert_counters: Mapping[str, torch.Tensor] | None = None, interval: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter):
        self.stream = stream if stream is not None else sys.stderr
        self.cache_bytes_per_token = cache_bytes_per_token
        self.prompt_tokens = prompt_tokens
        self.expert_peak = _load_peak(expert_load) if expert_load else None
        self.expert_counters = dict(expert_counters or {})
        self.interval = interval
        self.clock = clock
        self.lines: list[str] = []
        self.updates = 0
        self._reset()

    @classmethod
    def for_model(cls, optimized: Any, stream: TextIO | None = None, *, prompt_tokens: int = 0,
                  **kwargs: Any) -> LiveMonitor:
        """A monitor for ``optimized`` (an :class:`OptimizedModel`): cache bytes per token from its runtime's
        program, calibrated expert load from its MoE plan and the live counters of its program."""
        runtime = optimized.runtime()
        plan = optimized.session.moe_plan
        kwargs.setdefault("cache_bytes_per_token", runtime.program.cache_bytes_per_token())
        kwargs.setdefault("expert_load", plan.loads() if plan is not None else None)
        kwargs.setdefault("expert_counters", expert_counters(runtime.program))
        return cls(stream, prompt_tokens=prompt_tokens, **kwargs)

    def _reset(self) -> None:
        self.steps = 0  # streamer calls: one token per row each
        self.rows = 0
        self.started: float | None = None
        self.last_update: float | None = None
        self.mtp: dict[str, Any] = {}
        self._width = 0

    # --- the streamer protocol ---------------------------------------------------------------------------------

    def put(self, tokens: torch.Tensor) -> None:
        """One token per row (the runtime's ``[batch]`` tensor); refresh the line if ``interval`` has passed."""
        now = self.clock()
        if self.started is None:
            self.started = now  # the first token comes right after the prefill: rates below are decode rates
        self.rows = max(self.rows, int(tokens.numel()) if tokens.dim() <= 1 else int(tokens.shape[0]))
        self.steps += 1
        if self.last_update is None or now - self.last_update >= self.interval:
            self._write(now)

    __call__ = put

    def put_stats(self, stats: Mapping[str, Any]) -> None:
        """Speculative decoding's statistics so far (``mtp_acceptance``, ``mtp_tokens_per_step``), after a step."""
        self.mtp = dict(stats)

    def end(self) -> None:
        """Write the final figures and end the line; the monitor is then ready for another call."""
        if self.steps:
            self._write(self.clock())
            self.stream.write("\n")
            self.stream.flush()
        self._reset()

    # --- the line ----------------------------------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        """New tokens generated so far, over all rows."""
        return self.steps * self.rows

    def tokens_per_s(self, now: float) -> float:
        """Tokens after the first per second, over all rows (what ``GenerationStats.decode_tokens_per_s`` counts)."""
        elapsed = now - self.started if self.started is not None else 0.0
        return self.rows * (self.steps - 1) / elapsed if elapsed > 0 and self.steps > 1 else 0.0

    def cache_bytes(self) -> int:
        """KV cache bytes holding the prompt and the tokens so far (the runtime's buffers are allocated to capacity
        up front; this is what they hold)."""
        return self.cache_bytes_per_token * self.rows * (self.prompt_tokens + self.steps)

    def status(self, now: float) -> str:
        parts = [f"{self.tokens} tokens", f"{self.tokens_per_s(now):.1f} tok/s"]
        if self.cache_bytes_per_token:
            parts.append(f"KV cache {_mib(self.cache_bytes())} in use")
        if "mtp_tokens_per_step" in self.mtp:
            kept = "/".join(f"{a:.2f}" for a in self.mtp.get("mtp_acceptance", []))
            parts.append(f"MTP {self.mtp['mtp_tokens_per_step']:.2f} tokens/step (kept {kept})")
        live = _load_peak({k: v.tolist() for k, v in self.expert_counters.items()})
        if live is not None:
            parts.append(f"expert load max/mean {live:.2f} (live)")
        elif self.expert_peak is not None:
            parts.append(f"expert load max/mean {self.expert_peak:.2f} (calibrated)")
        return "generating: " + ", ".join(parts)

    def _write(self, now: float) -> None:
        line = self.status(now)
        pad = " " * max(0, self._width - len(line))  # blank out what a longer previous line left
        self._width = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self.lines.append(line)
        self.updates += 1
        self.last_update = now
