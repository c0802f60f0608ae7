"""A hand-written causal LM whose value heads are wider than its query/key heads (as MLA-style models have)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, HEADS, QK_DIM, V_DIM = 72, 64, 4, 16, 24


class WideValueLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.q = nn.Linear(HIDDEN, HEADS * QK_DIM, bias=False)
        self.k = nn.Linear(HIDDEN, HEADS * QK_DIM, bias=False)
        self.v = nn.Linear(HIDDEN, HEADS * V_DIM, bias=False)
        self.o = nn.Linear(HEADS * V_DIM, HIDDEN, bias=False)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, t, _ = x.shape
        q = self.q(x).view(b, t, HEADS, QK_DIM).transpose(1, 2)
        k = self.k(x).view(b, t, HEADS, QK_DIM).transpose(1, 2)
        v = self.v(x).view(b, t, HEADS, V_DIM).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, HEADS * V_DIM))
        x = x + self.down(F.relu(self.up(x)))
        return self.head(x)


def wide_value_lm() -> WideValueLM:
    torch.manual_seed(0)
    return WideValueLM().eval()
