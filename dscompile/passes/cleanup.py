"""Cleanup that every pipeline ends with: dead code out, order and well-formedness checked, code regenerated."""

from __future__ import annotations

from torch.fx import GraphModule

from .base import PassContext, PassResult


def cleanup(gm: GraphModule, ctx: PassContext | None = None) -> PassResult:
    """Remove dead nodes, lint the graph (topological order, valid references) and recompile its code."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    removed = before - len(gm.graph.nodes)
    notes = [f"removed {removed} dead node(s)"] if removed else []
    return PassResult("cleanup", gm, rewrites=removed, notes=notes)
