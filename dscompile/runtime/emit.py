"""What happens to chosen tokens: streaming to the caller, and end-of-sequence detection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def is_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device))


def stream(streamer: Any, tokens: torch.Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(tokens.cpu())
    else:
        streamer(tokens.cpu())


def stream_stats(streamer: Any, stats: Callable[[], dict[str, Any]]) -> None:
    """Hand decoding statistics so far to a streamer that asks for them (a live monitor defines ``put_stats``);
    ``stats`` is called only then, so plain streamers cost nothing."""
    if streamer is not None and hasattr(streamer, "put_stats"):
        streamer.put_stats(stats())


def stream_end(streamer: Any) -> None:
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
