"""Healing trains only what the passes created, and lowers the distance to the original."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama

from dscompile import ConfigError
from dscompile.heal import created_parameters, heal_program
from dscompile.passes import mla
from dscompile.passes.kv_cache import build_cached_program


def _mla_program(model, logits="all"):
    program = build_cached_program(model, logits=logits)
    mla.apply_latent_cache(program, mla.factorize(program, None, 0.25))
    return program


def test_healing_lowers_the_kl_and_touches_only_created_parameters():
    model = tiny_llama()
    torch.manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    program = _mla_program(model)
    created = created_parameters(program)
    assert sorted(created) == [f"mla_{i}_{p}" for i in range(2) for p in ("down", "up_k", "up_v")]
    before = {n: p.detach().clone() for n, p in program.gm.named_parameters()}
    grad_flags = {n: p.requires_grad for n, p in program.gm.named_parameters()}
    report = heal_program(program, model, batches, max_steps=30, lr=3e-3, progress=True)
    assert report.steps == 30 and report.trained_parameters == sum(p.numel() for p in created.values())
    assert sum(report.losses[-2:]) < 0.7 * sum(report.losses[:2])
    for name, p in program.gm.named_parameters():
        assert torch.equal(p, before[name]) != (name in created), name
        assert p.requires_grad == grad_flags[name] and p.grad is None or name in created


def test_bad_healing_requests():
    model = tiny_llama()
    x = [torch.randint(0, 128, (1, 8))]
    with pytest.raises(ConfigError, match="nothing to heal"):
        heal_program(build_cached_program(model, logits="all"), model, x, max_steps=1)
    with pytest.raises(ConfigError, match="at least one batch"):
        heal_program(_mla_program(model), model, [], max_steps=1)
    with pytest.raises(ConfigError, match="positive"):
        heal_program(_mla_program(model), model, x, max_minutes=0)
    with pytest.raises(ConfigError, match="logits='all'"):
        heal_program(_mla_program(model, logits="last"), model, x, max_steps=1)
