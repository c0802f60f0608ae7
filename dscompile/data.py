"""Token data in the forms users have it: a LongTensor, a list of them, or texts with a tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError


def token_batches(data: Any, tokenizer: Any = None) -> list[torch.Tensor]:
    """Normalise calibration or training data to a list of 2-D LongTensors (rows of equal length each)."""
    if data is None:
        raise ConfigError("no token data given: pass a LongTensor of token ids, a list of them, or texts")
    if isinstance(data, torch.Tensor):
        return [_as_rows(data, "data")]
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, Sequence) or len(data) == 0:
        raise ConfigError(f"token data must be a LongTensor, a list of LongTensors or a list of texts, got {data!r}")
    if all(isinstance(x, str) for x in data):
        if tokenizer is None:
            raise ConfigError("texts were given without a tokenizer: pass tokenizer=... (for example the one "
                              "dscompile.models.load returns), or pass token ids instead")
        batches = [_as_rows(torch.tensor([tokenizer(t)["input_ids"]], dtype=torch.long), f"text {i}")
                   for i, t in enumerate(data)]
        return batches
    if all(isinstance(x, torch.Tensor) for x in data):
        return [_as_rows(x, f"item {i}") for i, x in enumerate(data)]
    raise ConfigError("token data must be all tensors or all texts, not a mix")


def _as_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"{what}: token ids must be an integer tensor, got {t.dtype}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ConfigError(f"{what}: token ids must be 1-D or 2-D [batch, seq], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ConfigError(f"{what}: token ids are empty")
    return t.long()


def token_count(batches: list[torch.Tensor]) -> int:
    return sum(b.numel() for b in batches)
