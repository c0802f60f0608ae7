"""Calibration statistics by interpretation: run a graph on real inputs and accumulate second moments at nodes.

DESIGN decision 4: lossy rewrites (MLA's factorization, MoE's carving) are fitted to what the model actually sees.
An FX interpreter runs the graph unchanged and, at each node of interest, adds ``X^T X`` of the node's value
(flattened to ``[tokens, width]``, in float64) to a running :class:`Gram`. Nothing in the graph changes, so the
statistics are the original model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from .capture import node_value


@dataclass
class Gram:
    """The running ``sum x x^T`` over every token seen at one node, and how many tokens that was."""

    matrix: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, width: int) -> Gram:
        return cls(torch.zeros(width, width, dtype=torch.float64))

    def add(self, value: torch.Tensor) -> None:
        rows = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)
        self.matrix += rows.T @ rows
        self.tokens += rows.shape[0]

    def covariance(self) -> torch.Tensor:
        """The second moment ``E[x x^T]`` (not centred: projections act on x itself, biases aside)."""
        if self.tokens == 0:
            raise ValueError("no tokens were recorded for this node")
        return self.matrix / self.tokens


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, sinks: dict[str, Callable[[torch.Tensor], None]]):
        super().__init__(gm, garbage_collect_values=True)
        self.sinks = sinks

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        sink = self.sinks.get(n.name)
        if sink is not None and isinstance(value, torch.Tensor):
            sink(value)
        return value


def _widths(nodes: Sequence[Node]) -> dict[str, int]:
    out = {}
    for node in nodes:
        val = node_value(node)
        if not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
            raise ValueError(f"{node.name} has no static last dimension to collect statistics over")
        out[node.name] = int(val.shape[-1])
    return out


@contextlib.contextmanager
def _recording(gm: GraphModule, sinks: dict[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    def interpreted(*args: Any) -> Any:
        with torch.no_grad():
            return _Recorder(gm, sinks).run(*args)

    gm.forward = interpreted  # type: ignore[method-assign]
    try:
        yield
    finally:
        del gm.forward  # the class's forward again


@contextlib.contextmanager
def record_grams(gm: GraphModule, nodes: Sequence[Node]) -> Iterator[dict[str, Gram]]:
    """While active, every call of ``gm`` runs through an interpreter that adds the values of ``nodes`` to the
    yielded ``{node name: Gram}``. Use it around whatever calls the graph (a prefill, a forward)."""
    grams = {name: Gram.empty(width) for name, width in _widths(nodes).items()}
    with _recording(gm, {name: gram.add for name, gram in grams.items()}):
        yield grams


@contextlib.contextmanager
def record_rows(gm: GraphModule, nodes: Sequence[Node], stride: int = 1) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Like :func:`record_grams`, but keeps every ``stride``-th row (token) of each node's value itself, in float32
    (statistics that are not second moments: which neurons fire together, what a router should predict)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in _widths(nodes)}

    def sink(name: str) -> Callable[[torch.Tensor], None]:
        return lambda value: rows[name].append(value.detach().reshape(-1, value.shape[-1])[::stride].float())

    with _recording(gm, {name: sink(name) for name in rows}):
        yield rows
