"""Where the original model's loss is sensitive: the squared gradient of its next-token loss at each attention
output (the empirical Fisher's diagonal).

An attention output error of the same size costs the loss more in some layers and channels than in others. To
second order, the loss increase from a small error ``e`` at a node is ``sum(F * e^2) / 2`` with ``F`` the Fisher
diagonal there, so weighting errors by it ranks them by what they cost the model. The rank measure reads the
weights per element of each window; refinement, which cycles over many windows, reads them per channel (averaged
over tokens and windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Interpreter, Node

from ..runtime.generate import prefill_arguments
from .kv_cache import CachedProgram

FISHER_WINDOWS = 8
"""Windows (two rows of 256 tokens each) the per-channel weights average over: 4,096 tokens."""


def fisher_weights(program: CachedProgram, outputs: Sequence[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per node named in ``outputs``: the squared gradient of the next-token loss (summed) on ``ids`` with respect
    to it, ``program`` being a ``logits="all"`` program that computes the original model."""
    runner = _Keeping(program.gm, outputs)
    with torch.enable_grad():
        logits = runner.run(*prefill_arguments(program, ids))[0]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, [runner.kept[o] for o in outputs])
    return {o: g.detach().pow(2) for o, g in zip(outputs, grads)}


def channel_weights(program: CachedProgram, outputs: Sequence[str],
                    windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per node named in ``outputs``: :func:`fisher_weights` averaged over every token of ``windows`` (at most
    ``FISHER_WINDOWS`` of them), one weight per channel of its last dimension."""
    total: dict[str, torch.Tensor] = {}
    used = windows[:FISHER_WINDOWS]
    for ids in used:
        for name, w in fisher_weights(program, outputs, ids).items():
            channel = w.flatten(0, -2).sum(0)
            total[name] = total[name] + channel if name in total else channel
    tokens = sum(ids.numel() for ids in used)
    return {name: w / tokens for name, w in total.items()}


class _Keeping(Interpreter):
    """Runs a graph keeping the values of ``names`` in the autograd graph (a leaf where nothing above needs a
    gradient), so the loss can be differentiated with respect to them."""

    def __init__(self, gm: GraphModule, names: Sequence[str]):
        super().__init__(gm, garbage_collect_values=True)
        self.names, self.kept = set(names), {}

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            if not value.requires_grad:
                value = value.detach().requires_grad_()
            self.kept[n.name] = value
        return value
