"""Latent ranks per layer by measured sensitivity: the global KV budget goes where it costs the loss least.

One rank everywhere ignores that some layers' K/V compress better than others, and that some layers' errors
matter more. Ranking layers by their spectra's energy, by their relative attention-output error, or by the
perplexity cost of compressing one layer alone all did worse than uniform ranks on SmolLM2 (the first two ignore
how errors reach the output, the last that layers interact). This measures each layer's attention-output error,
its input forced to the original model's value, weighted per element by the squared gradient of the original
model's next-token loss there (the empirical Fisher's diagonal): to second order, that layer's share of the loss
increase. Forcing makes every layer's error independent of the other layers' ranks, so one pass of the program
measures all layers at once, and a rank-``r`` truncation is the full-rank factorization with its latent dimensions
past ``r`` zeroed: one program serves every grid point. The budget is then handed out, a dimension at a time, to
the layer whose error curve (its lower convex hull, interpolated between grid points) falls fastest there.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import torch

from ..calibrate import Gram
from ..log import progress_bar
from ..patterns import AttentionMatch
from ..profile import MLAConfig
from . import mla
from .kv_cache import CachedProgram, build_cached_program
from .mla_fisher import fisher_weights
from .mla_plan import MLAPlan, calibration_windows, fitting_window, layer_key, make_plan
from .mla_refine import forced_outputs, forced_sites

log = logging.getLogger("dscompile")

GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
"""Ranks measured per layer, as multiples of the uniform rank (clipped to the layer's full rank, which is measured
too: its error is the float rounding)."""

SENSITIVITY_WINDOWS = 4
"""Calibration windows per grid point (two rows of ``SENSITIVITY_WINDOW`` tokens each)."""
SENSITIVITY_WINDOW = 256


def weighted_errors(student: CachedProgram, teacher: CachedProgram, ids: torch.Tensor,
                    sites: tuple[list[str], list[str]], weights: dict[str, torch.Tensor]) -> list[float]:
    """Per layer, ``sum(weights * (student - teacher)^2)`` over its attention output on ``ids``, each layer's input
    forced to the teacher's: with Fisher weights, the layer's second-order share of the loss increase."""
    with torch.no_grad():
        got, want = forced_outputs(student, teacher, ids, sites)
    return [float((weights[o] * (got[o] - want[o]).pow(2)).sum()) / ids.numel() for o in sites[1]]


def measure_errors(full: MLAPlan, model: torch.nn.Module, teacher: CachedProgram, windows: Sequence[torch.Tensor],
                   grid: Sequence[Sequence[int]], progress: bool = False) -> list[list[float]]:
    """``errors[layer][j]``: the Fisher-weighted attention-output error (:func:`weighted_errors`) of each of
    ``full``'s layers (in the order of its factors) truncated to rank ``grid[layer][j]``. ``full`` holds full-rank
    factors; they are left as they were."""
    student = build_cached_program(model, logits="all")
    full.apply(student)
    factors = list(full.factors.values())
    position = {layer_key(a): i for i, a in enumerate(teacher.matches.attention)}
    layers = [position[key] for key in full.factors]  # where each factored layer's error is in the program's list
    saved = [f.down.detach().clone() for f in factors]
    sites = forced_sites(student, teacher)
    weights = [fisher_weights(student, sites[1], ids) for ids in windows]  # at full rank: the original model
    points = len(grid[0])
    errors = [[0.0] * points for _ in factors]
    bar = progress_bar(progress, points, "measuring MLA rank sensitivity")
    try:
        with torch.no_grad():
            for j in range(points):
                for f, down, ranks in zip(factors, saved, grid):
                    f.down.copy_(down)
                    f.down[ranks[j]:] = 0  # rank r: the latent dimensions past r carry nothing
                per_layer = [weighted_errors(student, teacher, ids, sites, w) for ids, w in zip(windows, weights)]
                for i, at in enumerate(layers):
                    errors[i][j] = sum(e[at] for e in per_layer) / len(per_layer)
                if bar is not None:
                    bar.update(1)
    finally:
        with torch.no_grad():
            for f, down in zip(factors, saved):
                f.down.copy_(down)
        if bar is not None:
            bar.close()
    return errors


def rank_grid(uniform: Sequence[int], caps: Sequence[int]) -> list[list[int]]:
    """Per layer, the ranks to measure: ``GRID`` times its uniform rank, clipped to ``[1, cap]``, the cap last.
    Every layer gets the same number of points (repeats where clipping merges some)."""
    grid = []
    for u, cap in zip(uniform, caps):
        ranks = sorted({min(cap, max(1, round(g * u))) for g in GRID} | {cap})
        grid.append(ranks)
    points = max(len(r) for r in grid)
    return [r + [r[-1]] * (points - len(r)) for r in grid]


def allocate(errors: Sequence[Sequence[float]], grid: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Ranks per layer summing to ``budget`` (between the grid's smallest and largest totals) that minimise the sum
    of the layers' errors, each curve replaced by its lower convex hull and interpolated linearly between points."""
    hulls = [_lower_hull(list(zip(ranks, errs))) for ranks, errs in zip(grid, errors)]
    ranks = [h[0][0] for h in hulls]
    left = budget - sum(ranks)
    if left < 0 or budget > sum(h[-1][0] for h in hulls):
        raise ValueError(f"budget {budget} outside the grid's totals [{sum(ranks)}, {sum(h[-1][0] for h in hulls)}]")
    segment = [0] * len(hulls)
    heap = [(-_slope(h, 0), i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while left and heap:
        _, i = heapq.heappop(heap)
        h, s = hulls[i], segment[i]
        give = min(left, h[s + 1][0] - ranks[i])
        ranks[i] += give
        left -= give
        if ranks[i] == h[s + 1][0]:
            segment[i] = s + 1
            if s + 2 < len(h):
                heapq.heappush(heap, (-_slope(h, s + 1), i))
    return ranks


def _slope(hull: list[tuple[int, float]], s: int) -> float:
    """Error removed per latent dimension along the hull's segment ``s``."""
    (r0, e0), (r1, e1) = hull[s], hull[s + 1]
    return (e0 - e1) / (r1 - r0)


def _lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lower convex hull of ``(rank, error)`` points (distinct ranks, ascending), from the smallest rank."""
    hull: list[tuple[int, float]] = []
    for r, e in sorted(dict(points).items()):
        while len(hull) >= 2:
            (r0, e0), (r1, e1) = hull[-2], hull[-1]
            if (e1 - e0) * (r - r0) >= (e - e0) * (r1 - r0):  # the middle point is not below the chord
                hull.pop()
            else:
                break
        hull.append((r, e))
    return hull


def sensitivity_ranks(full: MLAPlan, given: Sequence[int], model: torch.nn.Module, teacher: CachedProgram,
                      windows: Sequence[torch.Tensor], progress: bool = False) -> list[int]:
    """Ranks for ``full``'s layers (in the order of its factors, at full rank there) with the same total as
    ``given``, by measured sensitivity."""
    grid = rank_grid(given, [f.rank for f in full.factors.values()])
    errors = measure_errors(full, model, teacher, windows[:SENSITIVITY_WINDOWS], grid, progress)
    ranks = allocate(errors, grid, sum(given))
    log.info("mla ranks by sensitivity (total %d): %s", sum(ranks), ranks)
    return ranks


def even_ranks(full: MLAPlan, attentions: Sequence[AttentionMatch]) -> list[int]:
    """The ranks :func:`.mla_plan.make_plan` gives ``full``'s layers (of ``attentions``) under its budget, split
    evenly."""
    covered = [a for a in attentions if layer_key(a) in full.factors]
    reserved = sum(a.n_kv_heads * len(full.rope_dims[layer_key(a)]) for a in covered) if full.absorb else 0
    return mla.budget_ranks([a.kv_width for a in covered], list(full.factors.values()), full.config.kv_ratio,
                            reserved)


def sensitive_plan(config: MLAConfig, attentions: Sequence[AttentionMatch], grams: dict[int, Gram] | None,
                   tokens: int, model: torch.nn.Module, teacher: CachedProgram, batches: Sequence[torch.Tensor],
                   progress: bool = True) -> MLAPlan:
    """The plan :func:`.mla_plan.make_plan` would make, its budget reallocated by measured sensitivity against
    ``teacher`` (``model``'s program before any rewrite, whose ``attentions`` were calibrated into ``grams``) on
    ``batches`` of token ids. One factorization, at full rank, serves the measure and the plan."""
    full = make_plan(config, attentions, grams, tokens, full_rank=True)
    if not full.factors:
        return full
    windows = calibration_windows(batches, fitting_window(teacher, SENSITIVITY_WINDOW), rows=2)
    ranks = sensitivity_ranks(full, even_ranks(full, attentions), model, teacher, windows, progress)
    return full.truncated(ranks)
