"""Live performance figures of generation: time to first token, decode tokens/s, cache bytes, peak memory.

Every ``generate`` call of the runtime records one :class:`GenerationStats`; the latest is readable from the
runtime and the OptimizedModel, and the CLI prints it. Peak memory is the process's resident-set high-water mark on
CPU (reset before each call where Linux allows it) and the CUDA allocator's peak on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("dscompile")


@dataclass
class GenerationStats:
    """What one ``generate`` call did and how fast."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_s: float
    cache_bytes: int
    peak_memory_bytes: int
    device: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced per second after the first, over all rows of the batch."""
        steps = max(self.new_tokens - 1, 0)
        return self.batch * steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}

    def __str__(self) -> str:
        return (f"batch {self.batch}, prompt {self.prompt_tokens}, new {self.new_tokens}: first token "
                f"{self.time_to_first_token_s * 1000:.0f} ms, decode {self.decode_tokens_per_s:.1f} tok/s, "
                f"cache {self.cache_bytes / 2**20:.1f} MiB, peak memory {self.peak_memory_bytes / 2**20:.0f} MiB"
                + self._speculation() + self._experts())

    def _experts(self) -> str:
        maxvio = self.extra.get("moe_maxvio")
        if not maxvio:
            return ""
        worst = max(maxvio, key=maxvio.get)
        return f", MoE MaxVio {maxvio[worst]:.2f} (worst layer: {worst})"

    def _speculation(self) -> str:
        if "mtp_tokens_per_step" not in self.extra:
            return ""
        kept = ", ".join(f"{a:.2f}" for a in self.extra["mtp_acceptance"])
        plain = self.extra.get("mtp_plain_steps", 0)
        gated = f"; {plain} plain steps where drafting did not pay" if plain else ""
        nodes = self.extra.get("mtp_draft_nodes", 0)
        tree = f" of a {nodes}-node draft tree" if nodes > len(self.extra["mtp_acceptance"]) else ""
        return (f", MTP {self.extra['mtp_tokens_per_step']:.2f} tokens/step (drafts{tree} kept by depth: {kept}"
                f"{gated})")


class Monitor:
    """Keeps the stats of every generate call, newest last."""

    def __init__(self) -> None:
        self.history: list[GenerationStats] = []

    @property
    def last(self) -> GenerationStats | None:
        return self.history[-1] if self.history else None

    def record(self, stats: GenerationStats) -> None:
        self.history.append(stats)
        log.info("generate: %s", stats)


def _proc_status_bytes(key: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Measure peak memory over the block; the value lands in the yielded one-item list."""
    box = [0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        torch.cuda.synchronize(device)
        box[0] = torch.cuda.max_memory_allocated(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    yield box
    box[0] = _proc_status_bytes("VmHWM")


class Stopwatch:
    """Wall time with a device sync, so GPU work is counted where it happened."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        elapsed, self.start = now - self.start, now
        return elapsed
