"""Causal and sliding-window detection by interpretation.

A mask's structure is rarely visible in the graph (HF builds it from ``arange`` comparisons, others from a
registered ``tril`` buffer), but its value on the example inputs is: we run the captured graph once, read each
mask, and classify it. A window is only visible when the example is longer than the window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.fx import Node

from ..capture import CapturedGraph

log = logging.getLogger("dscompile")


@dataclass
class MaskProbe:
    """How to read a mask value as "allowed" positions."""

    node: Node
    polarity: str  # "additive" (0 allowed, very negative masked), "allow" (True allowed), "block" (True masked)


def classify(allowed: torch.Tensor) -> tuple[bool, int | None]:
    """(causal, window) from an allowed[query, key] matrix; window None when every past key is visible."""
    allowed = allowed.bool()
    q, k = allowed.shape
    offset = k - q
    rows = torch.arange(q).unsqueeze(1) + offset
    cols = torch.arange(k).unsqueeze(0)
    causal = not bool((allowed & (cols > rows)).any())
    if not causal:
        return False, None
    visible = allowed.sum(dim=1)
    live = visible > 0
    if not bool(live.any()):
        return True, None
    first = torch.where(live, allowed.float().argmax(dim=1), torch.zeros_like(visible))[live]
    # A window slides: the first visible key moves forward with the query; a padding mask does not.
    if bool((first[1:] > first[:-1]).any()):
        return True, int(visible.max())
    return True, None


def read_masks(cg: CapturedGraph, probes: list[MaskProbe]) -> dict[str, tuple[bool, int | None]]:
    """Run the graph once and classify every probed mask; failures leave the entry out (logged)."""
    if not probes or not cg.runnable():
        return {}
    try:
        values = cg.run([p.node for p in probes])
    except Exception as exc:  # a graph we cannot interpret still matches; only causality stays unknown
        log.warning("could not interpret the graph to read attention masks: %s", exc)
        return {}
    out: dict[str, tuple[bool, int | None]] = {}
    for probe in probes:
        value = values.get(probe.node.name)
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        mat = value.reshape(-1, value.shape[-2], value.shape[-1])[0]
        if probe.polarity == "additive":
            allowed = mat.float() > -1e4
        elif probe.polarity == "allow":
            allowed = mat.bool()
        else:
            allowed = ~mat.bool()
        out[probe.node.name] = classify(allowed)
    return out
