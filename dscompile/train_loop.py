"""A time-boxed Adam loop over some of a graph module's parameters, the rest frozen while it runs: what healing and
MLA refinement share (they differ only in the loss of a step)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .log import progress_bar


@dataclass
class TrainRun:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def train_parameters(gm: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                     loss_of_step: Callable[[int], torch.Tensor], *, max_minutes: float, max_steps: int | None,
                     lr: float, progress: bool, desc: str, metric: str) -> TrainRun:
    """Minimise ``loss_of_step(step)`` over ``params`` (named parameters of ``gm``) with Adam until ``max_minutes``
    or ``max_steps``; every parameter's ``requires_grad`` is as it was afterwards."""
    was = {name: p.requires_grad for name, p in gm.named_parameters()}
    for name, p in gm.named_parameters():
        p.requires_grad_(name in params)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    run = TrainRun()
    bar = progress_bar(progress, max_steps, desc)
    start = time.perf_counter()
    try:
        while (time.perf_counter() - start) < max_minutes * 60 and (max_steps is None or run.steps < max_steps):
            loss = loss_of_step(run.steps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.steps += 1
            run.losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix({metric: f"{run.losses[-1]:.4f}"})
    finally:
        for name, p in gm.named_parameters():
            p.requires_grad_(was[name])
        if bar is not None:
            bar.close()
    run.seconds = time.perf_counter() - start
    return run
