"""RoPE detection on the path from a query projection to its attention.

Styles: ``rotate_half`` (HF: ``x*cos + rotate_half(x)*sin``), ``interleaved`` (GPT-J: pairs stacked), and
``complex`` (Meta's ``view_as_complex(x) * freqs_cis``). The rotary width comes from the rotated tensor's last
dim (partial rotary when it is below the head size). The base comes from the tensor the angles derive from:
an ``inv_freq`` buffer, a complex ``freqs_cis`` table, or precomputed cos/sin tables.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from ..capture import CapturedGraph
from . import ops
from .match import RopeInfo
from .walk import shape, walk_back

# Ops between a cos/sin table and the multiplication that applies it (HF unsqueezes, scales and casts it).
_TRIG_PATH = frozenset({*ops.SHAPE_ONLY, ops.MUL})


def find_rope(cg: CapturedGraph, path: list[Node], head_dim: int) -> RopeInfo | None:
    """Look for a rotary embedding among the nodes of a query's path."""
    for node in path:
        if ops.op_label(node) == "view_as_complex":
            return _complex_rope(cg, node)
    for node in path:
        if ops.op_class(node) != ops.ADD:
            continue
        terms = [a for a in node.args[:2] if ops.is_op(a, ops.MUL)]
        if len(terms) != 2:
            continue
        sources = [_trig_of_mul(cg, t) for t in terms]
        if not all(sources):
            continue
        rotary = (shape(node) or (head_dim,))[-1]
        style = "interleaved" if any(_uses_stack(t) for t in terms) else "rotate_half"
        return RopeInfo(style, rotary, _base_from_sources(cg, [s for s in sources if s is not None], rotary))
    return None


def _complex_rope(cg: CapturedGraph, node: Node) -> RopeInfo:
    """``view_as_complex`` takes (..., d/2, 2) and gives (..., d/2); the multiplier beside it holds the angles."""
    src = node.args[0] if node.args and isinstance(node.args[0], Node) else node
    dims = shape(src) or ()
    rotary = 2 * dims[-2] if len(dims) >= 2 and dims[-1] == 2 else 2 * (shape(node) or (0,))[-1]
    freqs = [a for user in node.users if ops.op_class(user) == ops.MUL
             for a in user.args[:2] if isinstance(a, Node) and a is not node]
    return RopeInfo("complex", rotary, _base_from_sources(cg, freqs, rotary))


def _is_table(cg: CapturedGraph, node: Node) -> bool:
    """A precomputed cos/sin or complex table (2-D or more; a 1-D ``inv_freq`` is never multiplied in directly)."""
    ref = cg.weight(node)
    return ref is not None and ref.tensor is not None and ref.tensor.dim() >= 2 and _thetas(ref.tensor) is not None


def _trig_of_mul(cg: CapturedGraph, mul: Node) -> Node | None:
    """The cos/sin node or the precomputed table that one operand of ``mul`` derives from."""
    for operand in mul.args[:2]:
        if not isinstance(operand, Node):
            continue
        walk = walk_back(operand, stop=lambda n: ops.is_op(n, ops.COS, ops.SIN) or _is_table(cg, n),
                         through=lambda n: ops.op_class(n) in _TRIG_PATH, limit=32)
        if walk.found:
            return walk.found[0]
    return None


def _uses_stack(mul: Node) -> bool:
    return any(ops.is_op(a, ops.STACK) or (ops.is_op(a, ops.VIEW) and ops.is_op(a.args[0], ops.STACK))
               for a in mul.args[:2] if isinstance(a, Node))


def _base_from_sources(cg: CapturedGraph, sources: list[Node], rotary: int) -> float | None:
    """Walk from the angle-carrying nodes back to the weights they are computed from, and read the base."""
    walk = walk_back(sources, stop=lambda n: cg.weight(n) is not None,
                     through=lambda n: n.op in ("call_function", "call_method"), limit=64)
    for node in walk.found:
        ref = cg.weight(node)
        base = base_from_tensor(ref.tensor if ref is not None else None, rotary)
        if base is not None:
            return base
    return None


def _thetas(t: torch.Tensor | None) -> torch.Tensor | None:
    """The per-pair angles at position 1 (``base ** (-2i / rotary)``), from whichever form ``t`` has:
    ``inv_freq`` (1-D), a complex ``freqs_cis`` table, or a cos (row 0 all ones) or sin (row 0 all zeros) table."""
    if t is None or t.dim() == 0:
        return None
    t = t.detach()
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    if t.is_complex():
        return torch.angle(t[1]).double() if t.dim() == 2 and t.shape[0] > 1 else None
    if not t.is_floating_point() or t.numel() < 2:
        return None
    if t.dim() == 1:  # inv_freq falls strictly from 1 (a norm's weight of ones does not)
        t = t.double()
        return t if bool((t > 0).all()) and bool((t[1:] < t[:-1]).all()) else None
    if t.dim() != 2 or t.shape[0] < 2:
        return None
    first, row = t[0].double(), t[1].double()
    if torch.allclose(first, torch.ones_like(first)):
        return torch.acos(row.clamp(-1, 1))
    if torch.allclose(first, torch.zeros_like(first)):
        return torch.asin(row.clamp(-1, 1))
    return None


def base_from_tensor(t: torch.Tensor | None, rotary: int) -> float | None:
    """Recover ``base`` from the angles ``theta_k = base ** (-2k / rotary)`` that ``t`` holds, or None when ``t``
    is not a frequency table of that width."""
    thetas = _thetas(t)
    if thetas is None or rotary < 4 or abs(float(thetas.max()) - 1.0) > 1e-4:
        return None
    if t is not None and t.dim() == 1 and t.numel() == rotary // 2:
        # inv_freq lists every angle in order: fit all of them, so a half-precision buffer still gives the base
        # to a fraction of a percent (theta_1 alone would be off by rotary/2 times its rounding error).
        k = torch.arange(thetas.numel(), dtype=torch.float64)
        log_base = -(rotary / 2.0) * float((k * thetas.log()).sum() / (k * k).sum())
        return float(f"{math.exp(log_base):.5g}")
    below = thetas[thetas < 1.0 - 1e-6]
    if below.numel() == 0:
        return None
    theta = float(below.max())  # theta_1: tables repeat or interleave angles, so only its value is certain
    if not 0 < theta < math.pi:
        return None
    return float(f"{theta ** (-rotary / 2.0):.5g}")
