"""Live MoE expert load: how many tokens chose each routed expert during one ``generate`` call.

A runtime program's carved FFNs add every token's choice to a per-layer counter buffer (``moe_<i>_counts``, see
:func:`..passes.moe_plan.rewrite_ffn`) inside the compiled steps, so the load is measured on the text actually
generated, not on calibration text, at the cost of one small scatter-add per layer and step. Prompt tokens and
tokens a speculative verification scores are counted too: they all go through the experts.
"""

from __future__ import annotations

import re

import torch

from ..passes.kv_cache import CachedProgram
from ..passes.moe_plan import COUNTS

_NAME = re.compile(rf"moe_(\d+)_{COUNTS}")


def expert_counters(program: CachedProgram) -> dict[str, torch.Tensor]:
    """The live counter of each carved FFN of ``program``, by layer name (empty without MoE)."""
    out = {}
    for name, buffer in program.gm.named_buffers():
        found = _NAME.fullmatch(name)
        if found is not None:
            out[program.matches.ffn[int(found.group(1))].layer] = buffer
    return out


def reset(counters: dict[str, torch.Tensor]) -> None:
    for counts in counters.values():
        counts.zero_()


def loads(counters: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Tokens per expert over the layer's mean (1.0 is an even share), for layers that saw tokens."""
    out = {}
    for layer, counts in counters.items():
        total = int(counts.sum())
        if total:
            out[layer] = [round(x, 4) for x in (counts.double() * counts.numel() / total).tolist()]
    return out


def maxvio(layer_loads: dict[str, list[float]]) -> dict[str, float]:
    """MaxVio = (max load - mean load) / mean load per layer, from :func:`loads`."""
    return {layer: round(max(v) - 1.0, 4) for layer, v in layer_loads.items()}
