"""Adaptive speculation: the gate drafts only while drafting pays, and mixing plain and speculative steps keeps the
output the model's own."""

from __future__ import annotations

import pytest
import torch
from test_mtp import mtp_model, noisy, varied_llama
from tiny import assert_same_or_near_tie, greedy_by_forward, ids
from zoo import built

import dscompile
from dscompile import ConfigError
from dscompile.runtime import gate as gate_module
from dscompile.runtime.gate import PROBE_EVERY, SpeculationGate


def feed(gate: SpeculationGate, spec_s: float, plain_s: float, tau: float, steps: int) -> list[bool]:
    """Run the gate for ``steps`` steps whose costs and tau are fixed; returns its decisions."""
    decisions = []
    for _ in range(steps):
        speculate = gate.speculate()
        decisions.append(speculate)
        gate.observe(speculate, spec_s if speculate else plain_s, tau if speculate else None)
    return decisions


def test_always_speculates_in_always_mode():
    assert feed(SpeculationGate("always"), 5.0, 1.0, 1.0, 30) == [True] * 30


def test_measures_both_kinds_then_keeps_speculating_when_it_pays():
    gate = SpeculationGate()
    decisions = feed(gate, 1.5, 1.0, 2.0, 40)
    # two speculative steps (the first is not timed), two plain ones (likewise), then speculation pays: 2 > 1.5
    assert decisions[:4] == [True, True, False, False]
    assert all(decisions[4:])
    assert gate.describe() == {"mode": "adaptive", "tau": 2.0, "cost_ratio": 1.5}


def test_decodes_plainly_when_drafts_are_rejected_and_probes_ever_more_rarely():
    gate = SpeculationGate()
    decisions = feed(gate, 1.8, 1.0, 1.0, 400)
    probes = [i for i, d in enumerate(decisions) if d and i >= 4]
    gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]
    assert probes[0] == 2 + PROBE_EVERY  # the first probe after PROBE_EVERY plain steps (two measured ones too)
    assert gaps[:4] == [2 * PROBE_EVERY, 4 * PROBE_EVERY, 8 * PROBE_EVERY, gate_module.MAX_PROBE_EVERY]
    assert sum(decisions) < 10  # out of 400 steps


def test_a_good_probe_brings_speculation_back():
    gate = SpeculationGate()
    decisions = feed(gate, 1.5, 1.0, 1.0, 3 + PROBE_EVERY)  # drafts rejected: plain, then a probe that fails
    assert decisions[-1] and not gate.speculate() and gate.probe_every == 2 * PROBE_EVERY
    decisions = feed(gate, 1.5, 1.0, 4.0, 2 * PROBE_EVERY + 2)  # the drafts became good: the next probe finds out
    assert decisions[-1] and gate.pays() and gate.probe_every == PROBE_EVERY


def test_a_slow_outlier_step_is_not_measured():
    gate = SpeculationGate()
    feed(gate, 1.5, 1.0, 2.0, 6)
    gate.observe(True, 100.0, 2.0)  # a recompile
    assert gate.describe()["cost_ratio"] == 1.5


def test_bad_modes_are_refused():
    with pytest.raises(ConfigError, match="mtp.speculation must be 'adaptive' or 'always'"):
        dscompile.Profile.from_dict({"mtp": {"speculation": "sometimes"}})
    with pytest.raises(ValueError, match="speculation mode"):
        SpeculationGate("never")


def test_untrained_heads_stop_drafting_and_the_output_stays_exact(monkeypatch):
    """Untrained heads are almost never right: after measuring, the gate decodes plainly (SmolLM2's balanced preset
    decoded at 21 tokens/s with untrained heads against 49 plainly). Step costs are fixed so the test is exact."""
    real = SpeculationGate.observe
    monkeypatch.setattr(SpeculationGate, "observe",
                        lambda self, spec, seconds, tau=None: real(self, spec, 1.8 if spec else 1.0, tau))
    model = varied_llama()
    x = ids(2, 8, seed=21)
    opt = mtp_model(model, x[:1], depth=3, speculation="adaptive")
    assert not opt.mtp_heads().trained
    got = opt.generate(x, max_new_tokens=60)
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 60))
    stats = opt.monitor.last.extra
    assert stats["mtp_plain_steps"] > 3 * stats["mtp_steps"] / 2  # mtp_steps counts row-steps: 2 rows
    assert stats["mtp_gate"]["mode"] == "adaptive" and stats["mtp_gate"]["cost_ratio"] == 1.8
    assert "plain steps where drafting did not pay" in str(opt.monitor.last)
    gate = opt.runtime().gate(2)  # the gate remembers between calls: 7 steps after a probe hold no probe
    assert gate.probe_every > PROBE_EVERY and gate.describe()["tau"] < 1.8  # keeps fewer tokens than a step costs
    gate.plain_run = 0
    again = opt.generate(x, max_new_tokens=8, eos_token_id=[])
    assert_same_or_near_tie(model, again, greedy_by_forward(model, x, 8))
    stats = opt.monitor.last.extra
    assert stats["mtp_steps"] == 0 and stats["mtp_plain_steps"] == 7 and stats["mtp_tokens_per_step"] == 1.0


@pytest.mark.parametrize("name", ["llama", "sdpa_lm"])
@pytest.mark.parametrize("sample", [False, True])
def test_alternating_plain_and_speculative_steps_is_exact(monkeypatch, name, sample):
    """Any mix of plain and speculative steps decodes the model's own tokens, with holes in the cache (HF model),
    without (a hand-written model whose positions are its slots), greedy or sampling (top_k=1 makes sampling
    deterministic, so the sampled path must give the greedy tokens)."""
    pattern = torch.Generator().manual_seed(4)
    monkeypatch.setattr(SpeculationGate, "speculate",
                        lambda self: bool(torch.rand((), generator=pattern) < 0.5))
    model, example, expect = built(name)
    opt = mtp_model(model, example[:1], depth=3, speculation="adaptive")
    if not sample:  # noise would break speculative sampling's premise: drafts drawn from the heads' distribution
        noisy(opt.mtp_heads(), rate=0.3)
    x = torch.randint(1, expect.vocab, (3, 6), generator=torch.Generator().manual_seed(8))
    got = opt.generate(x, max_new_tokens=40, eos_token_id=[], do_sample=sample, top_k=1 if sample else None,
                       generator=torch.Generator().manual_seed(0))
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 40))
    stats = opt.monitor.last.extra
    assert stats["mtp_plain_steps"] > 0 and stats["mtp_steps"] > 0
