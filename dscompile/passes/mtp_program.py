"""The MTP rewrite of the LM-head subgraph in the runtime program: both graphs also return the hidden state that
feeds the LM head (the MTP heads draft from it), and the decode graph projects every position it is given, not
just the last, so one call verifies a drafted chain (``depth + 1`` tokens) and returns a prediction for each.

Plain decoding (one token) costs the same as before: the last position is the only position.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..errors import MatchError
from .kv_cache import CachedProgram
from .moe_plan import copy_module


def expose_hidden(program: CachedProgram) -> None:
    """Make ``program.gm`` return ``(logits, hidden)`` at the positions it projects, and ``program.decode_gm`` (made
    from the graph when absent) ``(logits, hidden)`` at every position. Idempotent."""
    if program.hidden is None or not program.matches.lm_head:
        raise MatchError("MTP needs the LM head: no projection onto the vocabulary was matched in this model")
    if program.decode_gm is None:
        program.decode_gm = copy_module(program.gm)
    _return_hidden(program.gm, program.hidden)
    _return_hidden(program.decode_gm, _every_position(program.decode_gm, program.hidden))


def _node(gm: GraphModule, name: str) -> Node:
    found = next((n for n in gm.graph.nodes if n.name == name), None)
    if found is None:
        raise MatchError(f"the runtime graph lost the LM head's input {name!r}; rebuild the program")
    return found


def _every_position(gm: GraphModule, name: str) -> str:
    """Undo the last-position slice before the LM head (see ``kv_cache._last_position_only``), if there is one."""
    node = _node(gm, name)
    if node.target is not torch.ops.aten.slice.Tensor:
        return name
    source = node.args[0]
    assert isinstance(source, Node)
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)
    gm.recompile()
    return source.name


def _return_hidden(gm: GraphModule, name: str) -> None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    leaves = list(values) if isinstance(values, (tuple, list)) else [values]
    if len(leaves) >= 2:
        return
    output.args = ((leaves[0], _node(gm, name)),)
    gm.recompile()
