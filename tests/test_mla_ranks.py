"""Latent ranks by measured sensitivity: the error curves are what real rank-r factors give, the allocation is the
optimum of those curves under the budget, and the plan it makes runs everywhere a uniform plan does."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from tiny import compile_with_session, greedy_by_forward, ids, tiny_llama

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.passes import mla
from dscompile.passes.kv_cache import build_cached_program
from dscompile.passes.mla_fisher import fisher_weights
from dscompile.passes.mla_plan import calibration_windows, make_plan, unfuse_program
from dscompile.passes.mla_ranks import (
    _lower_hull,
    allocate,
    even_ranks,
    measure_errors,
    rank_grid,
    weighted_errors,
)
from dscompile.passes.mla_refine import forced_sites
from dscompile.runtime.generate import prefill_logits


def _hull_error(points, r):
    """The lower hull of ``points`` interpolated at ``r`` (what allocate minimises)."""
    hull = _lower_hull(points)
    for (r0, e0), (r1, e1) in zip(hull, hull[1:]):
        if r0 <= r <= r1:
            return e0 + (e1 - e0) * (r - r0) / (r1 - r0)
    raise AssertionError(r)


def test_allocation_is_the_optimum_of_the_hulls_under_the_budget():
    grid = [[1, 2, 4, 8], [1, 2, 4, 8], [2, 3, 6, 8]]
    errors = [[1.0, 0.3, 0.1, 0.0],  # falls fast, then little left to gain
              [1.0, 0.9, 0.7, 0.1],  # gains late: its hull skips the flat start
              [0.5, 0.45, 0.2, 0.15]]
    for budget in (4, 9, 14, 20, 24):
        ranks = allocate(errors, grid, budget)
        assert sum(ranks) == budget
        total = sum(_hull_error(list(zip(g, e)), r) for g, e, r in zip(grid, errors, ranks))
        best = min(sum(_hull_error(list(zip(g, e)), r) for g, e, r in zip(grid, errors, split))
                   for split in itertools.product(range(1, 9), range(1, 9), range(2, 9)) if sum(split) == budget)
        assert total <= best + 1e-9, (budget, ranks)
    assert _lower_hull([(1, 1.0), (2, 0.9), (4, 0.7), (8, 0.1)]) == [(1, 1.0), (8, 0.1)]
    with pytest.raises(ValueError, match="budget"):
        allocate(errors, grid, 3)


def test_measured_errors_are_those_of_real_rank_r_factors():
    model = tiny_llama(layers=3)
    batches = [torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    teacher = build_cached_program(model)
    attentions = unfuse_program(teacher)
    grams = mla.calibrate(teacher, batches)
    config = dscompile.MLAConfig(kv_ratio=0.25)
    uniform = make_plan(config, attentions, grams, 192)
    full = make_plan(config, attentions, grams, 192, full_rank=True)
    assert [f.rank for f in full.factors.values()] == [64, 64, 64]
    grid = rank_grid([f.rank for f in uniform.factors.values()], [64, 64, 64])
    assert grid[0] == [4, 8, 12, 16, 20, 24, 32, 48, 64]  # GRID x the uniform rank 16, and the full rank
    windows = calibration_windows(batches, 32, rows=2)
    before = [f.down.detach().clone() for f in full.factors.values()]
    errors = measure_errors(full, model, teacher, windows, grid)
    assert all(torch.equal(f.down, b) for f, b in zip(full.factors.values(), before))  # left as they were
    assert all(e[-1] < 1e-8 for e in errors)  # full rank: exact
    assert all(e[0] > e[3] > e[-1] for e in errors)  # more rank, less error
    ranks = [grid[0][1], grid[1][4], grid[2][6]]  # one grid point per layer: a real plan at those ranks
    student = build_cached_program(model)
    make_plan(config, attentions, grams, 192, ranks=ranks).apply(student)
    sites = forced_sites(student, teacher)
    exact = build_cached_program(model, logits="all")  # the original, every position's logits
    per_window = [weighted_errors(student, teacher, w, sites, fisher_weights(exact, sites[1], w)) for w in windows]
    real = [sum(e[i] for e in per_window) / len(windows) for i in range(3)]
    torch.testing.assert_close(torch.tensor(real), torch.tensor([errors[0][1], errors[1][4], errors[2][6]]),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["reconstruct", "absorb"])
def test_one_full_rank_factorization_gives_the_even_ranks_and_every_rank_r_plan(mode):
    model = tiny_llama(layers=3)
    teacher = build_cached_program(model)
    attentions = unfuse_program(teacher)
    grams = mla.calibrate(teacher, [torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))])
    config = dscompile.MLAConfig(kv_ratio=0.3, rope_mode=mode)
    full = make_plan(config, attentions, grams, 96, full_rank=True, warn=False)
    even = make_plan(config, attentions, grams, 96, warn=False)
    assert even_ranks(full, attentions) == [f.rank for f in even.factors.values()]
    ranks = [3, 11, 7]
    direct, cut = make_plan(config, attentions, grams, 96, ranks=ranks, warn=False), full.truncated(ranks)
    assert cut.ranks() == direct.ranks() and cut.rope_dims == direct.rope_dims
    for a, b in zip(direct.factors.values(), cut.factors.values()):
        torch.testing.assert_close(b.down, a.down)
        for ua, ub in zip(a.ups, b.ups):
            torch.testing.assert_close(ub, ua)
    assert full.factors[next(iter(full.factors))].rank > 11  # the full plan is left whole
    with pytest.raises(ConfigError, match="one entry per"):
        full.truncated([3, 4])
    with pytest.raises(ConfigError, match="outside"):
        full.truncated([0, 4, 4])


def test_optimize_by_sensitivity_keeps_the_budget_and_runs_everywhere(tmp_path, caplog):
    model = tiny_llama(layers=4)
    first = model.model.layers[0].self_attn
    with torch.no_grad():  # layer 0's K and V read a 4-dimensional subspace: 4 latent dims reproduce it exactly
        basis = torch.randn(4, 64)
        first.k_proj.weight.copy_(torch.randn(32, 4) @ basis / 8)
        first.v_proj.weight.copy_(torch.randn(32, 4) @ basis / 8)
    data = torch.randint(0, 128, (2, 2048), generator=torch.Generator().manual_seed(0))
    config = {"kv_ratio": 0.25}
    uniform = dscompile.optimize(model, {"mla": config}, calibration=data, lower="eager")
    sensitive = dscompile.optimize(model, {"mla": {**config, "ranks": "sensitivity"}}, calibration=data,
                                   lower="eager")
    even, measured = uniform.session.mla_plan.ranks(), sensitive.session.mla_plan.ranks()
    assert set(even.values()) == {16} and sum(measured.values()) == sum(even.values())
    first_rank, *rest = measured.values()
    assert first_rank == 4 and sum(rest) == 60, measured  # layer 0 needs 4 dims; the 12 it leaves go elsewhere
    x = ids(2, 24, seed=9)
    with torch.no_grad():
        forward = logits_of(sensitive(x))
    torch.testing.assert_close(prefill_logits(sensitive.runtime().program, x), forward[:, -1:], atol=1e-5, rtol=0)
    assert [layer.latent for layer in sensitive.runtime().program.layers] == list(measured.values())
    prompt = ids(1, 10)
    assert torch.equal(sensitive.generate(prompt, max_new_tokens=5, eos_token_id=[]),
                       greedy_by_forward(sensitive, prompt, 5))
    sensitive.save(str(tmp_path / "ranked"))
    loaded = dscompile.load_optimized(tmp_path / "ranked", model, lower="eager")
    assert loaded.session.mla_plan.ranks() == measured
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        compiled, session = compile_with_session(model, {"mla": {**config, "ranks": "sensitivity"}})
        compiled(ids(1, 64))
    assert "split evenly" in caplog.text and set(session.mla_plan.ranks().values()) == {16}
    with pytest.raises(ConfigError, match="ranks"):
        dscompile.MLAConfig(ranks="energy")
