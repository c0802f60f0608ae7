"""What happens to chosen tokens: streaming to the caller, and end-of-sequence detection."""

from __future__ import annotations

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


def stream_end(streamer: Any) -> None:
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
