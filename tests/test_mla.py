"""The MLA pass in reconstruct mode: a latent cache, exact at full rank, smaller and still close below it."""

from __future__ import annotations

import pytest
import torch
from chunked import chunked_logits
from tiny import ids, tiny_llama
from zoo import ZOO, built

from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.lowrank import joint_factorize
from dscompile.passes import mla
from dscompile.passes.kv_cache import build_cached_program
from dscompile.passes.mla_plan import make_plan, unfuse_program
from dscompile.profile import MLAConfig
from dscompile.runtime import Runtime


@pytest.mark.parametrize("name", list(ZOO))
def test_full_rank_latent_cache_equals_the_full_forward(name):
    model, _, expect = built(name)
    program = build_cached_program(model, logits="all")
    unfuse_program(program)  # GPT-2, Phi-3, nanoGPT, GPT-NeoX: the fused QKV projection becomes three
    widths = mla.kv_widths(program)
    result = mla.apply_latent_cache(program, mla.factorize(program, None, 1.0))
    x = torch.randint(0, expect.vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = logits_of(model(x))
    torch.testing.assert_close(chunked_logits(program, x), reference, atol=1e-4, rtol=0)
    assert not result.skipped and len(result.ranks) == expect.layers
    assert [layer.latent for layer in program.layers] == [min(w, r) for w, r in zip(widths, result.ranks.values())]


def test_half_budget_halves_the_cache_and_generation_runs_compiled():
    model, x = tiny_llama(), ids()
    base = build_cached_program(model)
    program = build_cached_program(model)
    factors = mla.factorize(program, mla.calibrate(program, [x]), 0.5)
    mla.apply_latent_cache(program, factors)
    assert sum(f.rank for f in factors.values()) == sum(mla.kv_widths(base)) // 2
    assert program.cache_bytes_per_token() == base.cache_bytes_per_token() // 2 + 8  # + one int64 position
    runtime = Runtime(program, lower="inductor")
    compiled = runtime.generate(x, max_new_tokens=8, eos_token_id=[])
    eager = Runtime(program, lower="eager").generate(x, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(compiled, eager)
    stats = runtime.monitor.last
    capacity = stats.extra["capacity"]
    assert stats.cache_bytes == program.cache_bytes_per_token() * capacity * x.shape[0]


def test_calibration_counts_every_prompt_token_and_whitening_fits_better():
    model = tiny_llama()
    torch.manual_seed(0)
    x = torch.randint(0, 128, (2, 9))
    batches = [torch.randint(0, 128, (2, 24)) for _ in range(3)]
    program = build_cached_program(model, logits="all")
    grams = mla.calibrate(program, batches)
    assert sorted(grams) == [0, 1] and all(g.tokens == 3 * 2 * 24 for g in grams.values())
    with torch.no_grad():
        reference = logits_of(model(x))

    def error(with_grams):
        p = build_cached_program(model, logits="all")
        mla.apply_latent_cache(p, mla.factorize(p, grams if with_grams else None, 0.25))
        return float((chunked_logits(p, x) - reference).pow(2).mean())

    assert error(True) < error(False)


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_the_profiles_shrinkage_is_the_one_the_plan_whitens_with(shrinkage):
    model = tiny_llama()
    batches = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    program = build_cached_program(model)
    attentions = unfuse_program(program)
    grams = mla.calibrate(program, batches)
    plan = make_plan(MLAConfig(kv_ratio=0.25, shrinkage=shrinkage), attentions, grams, 144, warn=False)
    attn, layer = attentions[0], next(iter(plan.factors.values()))
    direct = joint_factorize([attn.k.weight.tensor, attn.v.weight.tensor], layer.rank, grams[0].covariance(),
                             shrinkage=shrinkage)
    torch.testing.assert_close(layer.down.detach(), direct.down)
    other = joint_factorize([attn.k.weight.tensor, attn.v.weight.tensor], layer.rank, grams[0].covariance(),
                            shrinkage=0.5 - shrinkage)
    assert not torch.allclose(layer.down.detach(), other.down, atol=1e-3)


def test_ranks_given_per_layer_and_bad_requests():
    program = build_cached_program(tiny_llama())
    factors = mla.factorize(program, None, 0.5, ranks=[8, 40])
    assert [f.rank for f in factors.values()] == [8, 40]
    with pytest.raises(ConfigError, match="one entry per factorable layer"):
        mla.factorize(program, None, 0.5, ranks=[8])
    with pytest.raises(ConfigError, match="outside"):
        mla.factorize(program, None, 0.5, ranks=[8, 65])
    with pytest.raises(ConfigError, match="kv_ratio"):
        mla.factorize(program, None, 0.0)
