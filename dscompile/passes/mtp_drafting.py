"""MTP drafting with weights stored in bfloat16: half the bytes a greedy draft reads every step.

A CPU decode step is bound by the bytes it reads, and drafting reads every head's weights and the draft projection
once a depth (SmolLM2, depth 4: 91 MB, 3.5 ms a step against 28 ms for the verification). A draft only needs a good
argmax: verification by the full model keeps the output exact whatever the draft, so drafting may read weights
rounded to bfloat16. Products still run in float32 (``dscompile::thin_linear`` widens each weight as it loads
it); the trained heads stay float32, and training, sampling and ``measure_mtp`` use them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import native

if TYPE_CHECKING:
    from .mtp_heads import MTPHeads

DRAFT_DTYPE = torch.bfloat16


def stored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in ``x``'s dtype, whatever the dtype ``weight`` is stored in: the native kernel reads a
    bfloat16 weight as it is (float32 CPU inputs), anything else widens it first."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if weight.dtype == DRAFT_DTYPE and x.dtype == torch.float32 and x.device.type == "cpu" and native.load():
        rows = torch.ops.dscompile.thin_linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return rows.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight.to(x.dtype), bias)


class StoredLinear(nn.Module):
    """An ``nn.Linear`` whose weight is kept in another dtype than it computes in (see :func:`stored_linear`)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stored_linear(x, self.weight, self.bias)


def can_draft_in_bfloat16(device: torch.device) -> bool:
    """Where bfloat16 weights are read for free: CPUs with the native kernels (elsewhere widening them each step
    would cost what the bytes save)."""
    return device.type == "cpu" and native.load()


def drafting_copy(heads: MTPHeads, dtype: torch.dtype = DRAFT_DTYPE) -> MTPHeads:
    """A copy of ``heads`` for greedy drafting, its heads' linear weights and draft projection stored in ``dtype``.
    It shares the model's embedding and LM head with ``heads``; it is a snapshot (copy again after training)."""
    twin = copy.copy(heads)
    twin._parameters, twin._buffers, twin._modules = dict(heads._parameters), dict(heads._buffers), \
        dict(heads._modules)
    twin.heads = copy.deepcopy(heads.heads)
    for module in list(twin.heads.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, StoredLinear(child, dtype))
    twin.draft_weight = heads.draft_weight.to(dtype)
    return twin
