"""Live MoE expert load: the runtime counts, inside its compiled steps, which experts each token chose, and reports
load and MaxVio per layer for every generate call (monitor, stats line, live status line)."""

from __future__ import annotations

import io

import pytest
import torch
from tiny import ids, tiny_llama

import dscompile
from dscompile.live import LiveMonitor
from dscompile.passes.moe_ops import moe_ffn
from dscompile.passes.moe_plan import without_counters
from dscompile.runtime import expert_load
from dscompile.runtime.generate import Runtime, prefill_logits

HALF = {"moe": {"n_experts": 16, "n_shared": 2, "top_k": 6}}
LAYERS = ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.fixture(scope="module")
def optimized():
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    return dscompile.optimize(tiny_llama(), HALF, calibration=calibration, lower="eager")


def _counts(counters):
    return {layer: c.clone() for layer, c in counters.items()}


@pytest.mark.parametrize("lower", ["eager", "inductor"])
def test_generate_counts_every_routed_token_exactly(optimized, lower):
    program = optimized.runtime().program
    runtime = Runtime(program, lower=lower)
    x = ids(2, 9)
    out = runtime.generate(x, max_new_tokens=5, eos_token_id=[])
    counters = expert_load.expert_counters(program)
    assert sorted(counters) == LAYERS
    live = _counts(counters)
    # every token the experts saw: the prompt, then each new token but the last is fed back once
    for counts in live.values():
        assert counts.shape == (14,) and int(counts.sum()) == 2 * (9 + 4) * 6
    # the same tokens through the prefill graph, counted afresh, choose the same experts
    expert_load.reset(counters)
    prefill_logits(program, out[:, :-1])
    for layer, counts in counters.items():
        assert torch.equal(counts, live[layer]), layer
    stats = runtime.monitor.last.extra
    assert sorted(stats["moe_expert_load"]) == LAYERS
    for layer, load in stats["moe_expert_load"].items():
        assert sum(load) == pytest.approx(14, abs=1e-3)
        assert load == pytest.approx((live[layer] * 14 / live[layer].sum()).tolist(), abs=1e-4)
        assert stats["moe_maxvio"][layer] == pytest.approx(max(load) - 1, abs=1e-4)
    worst = max(stats["moe_maxvio"], key=stats["moe_maxvio"].get)
    assert f"MoE MaxVio {stats['moe_maxvio'][worst]:.2f} (worst layer: {worst})" in str(runtime.monitor.last)


def test_each_call_counts_only_its_own_tokens(optimized):
    runtime = optimized.runtime()
    runtime.generate(ids(1, 20), max_new_tokens=3, eos_token_id=[])
    runtime.generate(ids(1, 4), max_new_tokens=2, eos_token_id=[])
    for counts in expert_load.expert_counters(runtime.program).values():
        assert int(counts.sum()) == (4 + 1) * 6


def test_loads_skip_layers_that_saw_nothing_and_maxvio_is_max_over_mean():
    counters = {"a": torch.tensor([3, 1, 0, 0]), "b": torch.zeros(4, dtype=torch.long)}
    loads = expert_load.loads(counters)
    assert loads == {"a": [3.0, 1.0, 0.0, 0.0]}
    assert expert_load.maxvio(loads) == {"a": 2.0}


def test_without_counters_computes_the_same_and_counts_nothing(optimized):
    program = optimized.runtime().program
    pure = without_counters(program.decode_gm)
    assert pure is not program.decode_gm and without_counters(pure) is pure
    calls = [n for n in pure.graph.nodes if n.target is moe_ffn]
    assert calls and all(n.args[10] is None for n in calls)
    counters = expert_load.expert_counters(program)
    expert_load.reset(counters)
    inputs = _inputs(program, ids(1, 6))
    torch.testing.assert_close(pure(*inputs)[0], program.decode_gm(*_inputs(program, ids(1, 6)))[0])
    assert all(int(c.sum()) == 6 * 6 for c in counters.values())  # the counting graph's tokens only


def _inputs(program, x):
    from dscompile.runtime.generate import attention_bias

    caches = program.new_caches(x.shape[0], 16, x.device)
    valid = torch.zeros(x.shape[0], 16, dtype=torch.bool)
    valid[:, :x.shape[1]] = True
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    cache_position = torch.arange(x.shape[1])
    biases = [attention_bias(valid, cache_position, w, program.dtype) for w in program.windows]
    return (x, positions, cache_position, *biases, *caches)


def test_the_live_line_shows_the_counted_load(optimized):
    stream = io.StringIO()
    monitor = LiveMonitor.for_model(optimized, stream, interval=0.0)
    expert_load.reset(monitor.expert_counters)
    assert "(calibrated)" in monitor.status(0.0)  # no token routed yet
    optimized.generate(ids(1, 8), max_new_tokens=4, eos_token_id=[], streamer=monitor)
    last = monitor.lines[-1]
    peak = max(max(v) for v in optimized.runtime().monitor.last.extra["moe_expert_load"].values())
    assert f"expert load max/mean {peak:.2f} (live)" in last
