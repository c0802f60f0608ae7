"""Quality and speed measurements shared by the CLI and the benchmarks: perplexity and forward throughput."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a forward's output: a tensor, a Hugging Face output with ``.logits``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"cannot find logits in a model output of type {type(output).__name__}")


def windows(ids: torch.Tensor, window: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``window`` tokens (rows of a [1, n] tensor); the ragged tail is dropped."""
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}")
    flat = ids.reshape(-1)
    count = flat.numel() // window
    if count == 0:
        raise ConfigError(f"the text has {flat.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        count = min(count, max_windows)
    return [flat[i * window:(i + 1) * window].unsqueeze(0) for i in range(count)]


@torch.no_grad()
def perplexity(
    model: Callable[..., Any], batches: Iterable[torch.Tensor], *, progress: Callable[[int], None] | None = None
) -> float:
    """exp(mean next-token negative log-likelihood) over every window; the same windows for every model."""
    total, count = 0.0, 0
    for batch in batches:
        logits = logits_of(model(batch)).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
        if progress is not None:
            progress(1)
    if count == 0:
        raise ConfigError("perplexity needs at least one window of tokens")
    return math.exp(total / count)


@torch.no_grad()
def tokens_per_second(model: Callable[..., Any], batch: torch.Tensor, *, repeats: int = 3) -> float:
    """Forward (prefill) throughput: tokens in ``batch`` over the best of ``repeats`` timed calls, after a warm-up."""
    model(batch)
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        model(batch)
        best = min(best, time.perf_counter() - start)
    return batch.numel() / best
