"""Local refinement: each layer's factors fitted to its original attention output, its input forced to the
original's, training only the factors; reached from the profile through optimize."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import compile_with_session, ids, tiny_llama
from zoo import built, example_ids

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.heal import HEAL_LR_REFINED
from dscompile.passes import mla
from dscompile.passes.kv_cache import build_cached_program
from dscompile.passes.mla_plan import unfuse_program
from dscompile.passes.mla_refine import attention_sites, refine_program
from dscompile.runtime.generate import prefill_logits


def _pair(model, batches, kv_ratio):
    teacher, student = build_cached_program(model, logits="all"), build_cached_program(model, logits="all")
    unfuse_program(student)  # fused QKV (GPT-2) into views, as a plan does
    mla.apply_latent_cache(student, mla.factorize(student, mla.calibrate(student, batches), kv_ratio))
    return teacher, student


def _kl_of(teacher_logits, student_logits):
    t, s = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def _kl(teacher, student, x):
    with torch.no_grad():
        return _kl_of(prefill_logits(teacher, x), prefill_logits(student, x))


def _batches(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 32), generator=g) for _ in range(4)]


def test_refinement_fits_the_attention_outputs_and_brings_the_logits_closer():
    model, batches = tiny_llama(), _batches()
    teacher, student = _pair(model, batches, 0.25)
    held_out = ids(2, 32, seed=9)
    before_kl = _kl(teacher, student, held_out)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in student.gm.named_parameters()}
    report = refine_program(student, teacher, batches, max_steps=60, lr=1e-2)
    assert report.steps == 60 and sum(report.losses[-4:]) < 0.5 * sum(report.losses[:4])
    assert _kl(teacher, student, held_out) < 0.9 * before_kl
    for name, p in student.gm.named_parameters():
        assert torch.equal(p, before[name][0]) != name.startswith("mla_"), name
        assert p.requires_grad == before[name][1]  # as it was


@pytest.mark.parametrize("name", ["gpt2", "sdpa_lm"])
def test_at_full_rank_every_forced_layer_is_already_exact(name):
    model, _, expect = built(name)
    batches = [example_ids(expect.vocab, batch=2, seq=16, seed=s) for s in range(2)]
    teacher, student = _pair(model, batches, 0.999)
    assert len(attention_sites(student)) == expect.layers
    report = refine_program(student, teacher, batches, max_steps=1)
    assert report.losses[0] < 1e-9  # each layer's output at the original's input: nothing to fit


@pytest.mark.parametrize("mode", ["reconstruct", "absorb"])
def test_optimize_refines_the_plan_that_both_paths_and_a_saved_copy_read(tmp_path, mode):
    model = tiny_llama()
    data = torch.randint(0, 128, (2, 2048), generator=torch.Generator().manual_seed(0))
    config = {"kv_ratio": 0.25, "rope_mode": mode}
    plain = dscompile.optimize(model, {"mla": config}, calibration=data, lower="eager")
    refined = dscompile.optimize(model, {"mla": {**config, "refine": True, "refine_minutes": 0.05}},
                                 calibration=data, lower="eager")
    x = ids(2, 32, seed=9)
    with torch.no_grad():
        original, before, after = (logits_of(m(x)) for m in (model, plain, refined))
    assert _kl_of(original, after) < _kl_of(original, before)
    torch.testing.assert_close(prefill_logits(refined.runtime().program, x), after[:, -1:], atol=1e-5, rtol=0)
    refined.save(str(tmp_path / "refined"))
    loaded = dscompile.load_optimized(tmp_path / "refined", model, lower="eager")  # not refined again: as saved
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded(x)), after, atol=1e-5, rtol=0)
    # healing a refined model (here the saved copy) starts at the lower rate that keeps refinement's gains
    assert dscompile.heal(loaded, data, max_steps=1, progress=False).lr == HEAL_LR_REFINED


def test_refinement_needs_calibration_text_and_factors(caplog):
    with pytest.raises(ConfigError, match="refine_minutes"):
        dscompile.MLAConfig(refine=True, refine_minutes=0)
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        compiled, session = compile_with_session(model, {"mla": {"kv_ratio": 0.5, "refine": True}})
        compiled(ids())
    assert "not refined" in caplog.text
    teacher = build_cached_program(model)
    with pytest.raises(ConfigError, match="MLA factors"):
        refine_program(build_cached_program(model), teacher, _batches(), max_steps=1)
    _, student = _pair(model, _batches(), 0.5)
    with pytest.raises(ConfigError, match="at least one batch"):
        refine_program(student, teacher, [], max_steps=1)
