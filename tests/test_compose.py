"""MLA, MoE and MTP composed on one model: exact when every rewrite is exact, lossless speculation over the lossy
rewrites, and the presets that ask for all three."""

from __future__ import annotations

import pytest
import torch
from test_mtp import noisy, varied_llama
from tiny import assert_same_or_near_tie, greedy_by_forward, ids, tiny_llama
from zoo import built

import dscompile
from dscompile.evaluate import logits_of

# Full K/V rank, every routed expert active: each rewrite computes what the original does.
MTP = {"depth": 2, "speculation": "always"}  # drafts at every step, so the tests see speculation take effect
EXACT = {"mla": {"kv_ratio": 0.999}, "moe": {"n_experts": 8, "n_shared": 2, "top_k": 6}, "mtp": MTP}
LOSSY = {"mla": {"kv_ratio": 0.5}, "moe": {"n_experts": 8, "n_shared": 2, "top_k": 2}, "mtp": MTP}


def calibration(vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, vocab, (4, 600), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama", "opt", "sdpa_lm"])
def test_all_three_exact_rewrites_compose_to_the_original(name):
    model, example, expect = built(name)
    opt = dscompile.optimize(model, EXACT, calibration(expect.vocab), example_inputs=example[:1], lower="eager")
    assert {p.name for p in opt.report().passes if p.rewrites} >= {"mla", "moe"}
    with torch.no_grad():
        assert torch.allclose(logits_of(opt(example)), logits_of(model(example)), atol=1e-4)
    noisy(opt.mtp_heads())
    x = torch.randint(1, expect.vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    got = opt.generate(x, max_new_tokens=24, eos_token_id=[])
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 24))
    assert opt.monitor.last.extra["mtp_tokens_per_step"] >= 1.0


def test_speculation_is_lossless_over_lossy_mla_and_moe():
    """Drafts verified by the rewritten model give exactly what the rewritten model decodes without them."""
    model = varied_llama()
    opt = dscompile.optimize(model, LOSSY, calibration(128), example_inputs=ids(), lower="eager")
    noisy(opt.mtp_heads())
    report = opt.report().to_dict()
    assert report["kv_bytes_per_token_after"] <= report["kv_bytes_per_token_before"] // 2
    assert set(report["moe_maxvio"]) and set(report["mla_ranks"])
    x = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    runtime = opt.runtime()
    got = opt.generate(x, attention_mask=mask, max_new_tokens=32, eos_token_id=[])
    assert opt.monitor.last.extra["mtp_tokens_per_step"] > 1.0  # drafts were kept: speculation took effect
    drafter, runtime.drafter = runtime.drafter, None
    try:
        plain = opt.generate(x, attention_mask=mask, max_new_tokens=32, eos_token_id=[])
    finally:
        runtime.drafter = drafter
    assert torch.equal(got, plain)
    with torch.no_grad():
        assert not torch.equal(logits_of(opt(x)), logits_of(model(x)))  # the rewrites really are lossy


@pytest.mark.parametrize("preset", ["balanced"])  # aggressive differs only in numbers
def test_presets_compose_all_three_rewrites(preset):
    opt = dscompile.optimize(tiny_llama(), preset, calibration(128), lower="eager")
    report = opt.report().to_dict()
    assert report["profile"]["name"] == preset
    assert [p["name"] for p in report["passes"]] == ["mla", "moe", "mtp", "cleanup"]
    ratio = dscompile.PRESETS[preset].mla.kv_ratio
    assert report["kv_bytes_per_token_after"] <= ratio * report["kv_bytes_per_token_before"] + 1e-9
    assert report["active_params_per_token"] < report["params_before"]
    out = opt.generate(ids(), max_new_tokens=6)
    assert out.shape == (1, 14)
    program = opt.runtime().program  # the runtime also keeps each slot's position id (int64) for rotary keys
    assert program.cache_bytes_per_token() - 8 * program.slot_positions == report["kv_bytes_per_token_after"]
