"""Running a cached program the way the runtime does, in chunks, for tests that compare it with a full forward."""

from __future__ import annotations

import torch

from dscompile.runtime.generate import attention_bias

CHUNKS = ((0, 5), (5, 6), (6, 7), (7, 9))


def chunked_logits(program, x: torch.Tensor, capacity: int = 16) -> torch.Tensor:
    """Chunks of 5, 1, 1 and 2 tokens of ``x [batch, 9]`` through fresh caches: a prefill, then decode steps."""
    batch = x.shape[0]
    caches = program.new_caches(batch, capacity)
    valid = torch.zeros(batch, capacity, dtype=torch.bool)
    pieces = []
    with torch.no_grad():
        for start, end in CHUNKS:
            valid[:, start:end] = True
            slots = torch.arange(start, end)
            biases = [attention_bias(valid, slots, w, program.dtype) for w in program.windows]
            pieces.append(program.gm(x[:, start:end], slots.expand(batch, -1), slots, *biases, *caches)[0])
    return torch.cat(pieces, dim=1)
