"""MLA reached from profiles: the backend pass on forward graphs, optimize's calibrated plan, the runtime's latent
cache built from the same factors, and healing through the public ``dscompile.heal``."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import compile_with_session, greedy_by_forward, ids, tiny_llama
from zoo import ZOO, built, example_ids

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.heal import HEAL_LR
from dscompile.runtime.generate import prefill_logits

NEAR_FULL = {"mla": {"kv_ratio": 0.999}}  # a budget that rounds to every layer's full K/V rank


@pytest.mark.parametrize("name", list(ZOO))
def test_backend_at_full_rank_equals_the_original(name):
    model, x, expect = built(name)
    compiled, session = compile_with_session(model, NEAR_FULL)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(compiled(x)), logits_of(model(x)), atol=1e-4, rtol=0)
    result = next(p for p in session.graphs[0].passes if p.name == "mla")
    assert result.rewrites == expect.layers and not result.skipped  # fused QKV (GPT-2, Phi-3, GPT-NeoX) split first
    diff = session.diff()
    assert diff.kv_bytes_per_token_after <= diff.kv_bytes_per_token_before


def test_backend_halves_the_kv_bytes_and_warns_about_its_few_tokens(caplog):
    model, x = tiny_llama(), ids(2, 8)
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        compiled, session = compile_with_session(model, "mla", lower="inductor")
        with torch.no_grad():
            out = logits_of(compiled(x))
    assert "calibrated on 16 tokens" in caplog.text
    diff = session.diff()
    assert diff.kv_bytes_per_token_after == diff.kv_bytes_per_token_before // 2
    assert diff.rewritten["attention"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert session.mla_plan.calibration_tokens == 16
    with torch.no_grad():
        reference = logits_of(model(x))
    assert 1e-4 < float((out - reference).abs().max()) < 1.0  # shrinkage (0.2) no longer fits these tokens alone
    # 16 calibration tokens span fewer than 32 latent dimensions: fully whitened, the rewrite is exact on them
    exact, _ = compile_with_session(model, {"mla": {"kv_ratio": 0.5, "shrinkage": 0.0}})
    with torch.no_grad():
        torch.testing.assert_close(logits_of(exact(x)), reference, atol=1e-4, rtol=0)


def test_optimize_calibrates_once_and_the_runtime_caches_the_same_latent():
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, "mla", calibration=calibration, lower="eager")
    report = optimized.report().to_dict()
    assert report["mla_ranks"] == {"model.layers.0.self_attn": 32, "model.layers.1.self_attn": 32}
    assert report["mla_calibration_tokens"] == 1200
    assert report["kv_bytes_per_token_after"] == report["kv_bytes_per_token_before"] // 2
    x = ids(2, 12)
    with torch.no_grad():
        forward = logits_of(optimized(x))
        original = logits_of(model(x))
    assert (forward - original).abs().max() > 1e-3  # lossy below full rank...
    runtime = optimized.runtime()
    assert [layer.latent for layer in runtime.program.layers] == [32, 32]
    torch.testing.assert_close(prefill_logits(runtime.program, x), forward[:, -1:], atol=1e-5, rtol=0)
    # ...and generation from the latent cache is greedy decoding of the rewritten forward
    out = optimized.generate(x, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 6))


def test_heal_trains_the_shared_factors_and_both_paths_see_them():
    model = tiny_llama()
    data = torch.randint(0, 128, (2, 2048), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, {"mla": {"kv_ratio": 0.25}}, calibration=data, lower="eager")
    x = ids(1, 10)
    with torch.no_grad():
        before = logits_of(optimized(x))
    base = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    report = dscompile.heal(optimized, data, max_steps=12, lr=3e-3, progress=False)
    assert report.steps == 12 and report.losses[-1] < report.losses[0]
    assert all(torch.equal(p, base[n][0]) and p.requires_grad == base[n][1] for n, p in model.named_parameters())
    with torch.no_grad():
        after = logits_of(optimized(x))
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(prefill_logits(optimized.runtime().program, x), after[:, -1:], atol=1e-5, rtol=0)


def test_heal_needs_a_rewritten_model_and_warns_on_little_text(caplog):
    model = tiny_llama()
    plain = dscompile.optimize(model, "none", example_inputs=ids(), lower="eager")
    with pytest.raises(ConfigError, match="nothing to heal"):
        dscompile.heal(plain, ids(1, 64))
    optimized = dscompile.optimize(model, "mla", example_inputs=ids(1, 16), lower="eager")
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        report = dscompile.heal(optimized, ids(1, 64), max_steps=1, progress=False)
    assert "healing on 64 tokens" in caplog.text
    assert report.lr == HEAL_LR  # unrefined factors: the default rate


def test_generation_matches_the_forward_on_a_zoo_model_with_sliding_windows():
    model, _, expect = built("mistral")
    x = example_ids(expect.vocab, batch=2, seq=12)
    optimized = dscompile.optimize(model, "mla", example_inputs=x, lower="eager")
    out = optimized.generate(x, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 4))
