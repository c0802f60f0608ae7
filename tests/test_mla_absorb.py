"""MLA ``absorb`` mode: the runtime attends in the latent space (no keys or values rebuilt), models without RoPE
stay exact, RoPE models keep a few rotary dims per head (decoupled RoPE) in the forward and the runtime alike."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tiny import greedy_by_forward, ids, tiny_llama
from torch import nn
from zoo import ZOO, built

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.passes.mla_rope import pair_dims
from dscompile.runtime.generate import prefill_logits

ROPE_FREE = {"opt", "gpt2", "nanogpt"}  # learned positions: absorbing is exact
NOT_ABSORBED = {"qwen3": "normalised",
                "gemma3": "normalised", "meta_llama": "complex RoPE"}


def _absorb(kv_ratio=0.999, **extra):
    return {"mla": {"kv_ratio": kv_ratio, "rope_mode": "absorb", **extra}}


class LearnedPositionAttention(nn.Module):
    """Written by hand: separate biased projections, eager ``softmax(q k^T / sqrt(d))`` under a ``tril`` mask."""

    def __init__(self, width: int = 48, heads: int = 3):
        super().__init__()
        self.heads, self.dim = heads, width // heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.register_buffer("causal", torch.tril(torch.ones(64, 64, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.dim).transpose(1, 2) for p in (self.query, self.key, self.value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dim)
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        y = F.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class LearnedPositionLM(nn.Module):
    def __init__(self, vocab: int = 96, width: int = 48, attention: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(64, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.attns = nn.ModuleList((attention or LearnedPositionAttention)(width) for _ in range(2))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.head(x)


@pytest.mark.parametrize("name", list(ZOO))
def test_runtime_attends_in_the_latent_space_and_agrees_with_the_forward(name):
    model, x, expect = built(name)
    optimized = dscompile.optimize(model, _absorb(), example_inputs=x, lower="eager")
    with torch.no_grad():
        forward, original = logits_of(optimized(x)), logits_of(model(x))
    program = optimized.runtime().program
    torch.testing.assert_close(prefill_logits(program, x), forward[:, -1:], atol=1e-4, rtol=0)
    skipped = optimized.report().to_dict()["mla_skipped"]
    if name in NOT_ABSORBED:
        assert len(skipped) == expect.layers and all(NOT_ABSORBED[name] in why for why in skipped.values())
        return
    assert not skipped and all(layer.latent is not None for layer in program.layers)
    names = [str(n.target) for n in program.gm.graph.nodes if n.op == "placeholder"]
    assert not any(n.startswith(("k_cache", "v_cache")) for n in names)
    if name in ROPE_FREE:  # nothing to decouple: absorbing the latent is exact
        assert all(layer.rope_key == 0 for layer in program.layers)
        torch.testing.assert_close(forward, original, atol=1e-4, rtol=0)
    else:  # half the rotary dims stay rotary; the others lose their rotation in the forward and the runtime alike
        assert all(layer.rope_key == expect.rope_dim // 2 for layer in program.layers)
    # prefill rebuilds K/V for the model's attention; decoding attends in the latent space, in a graph of its own
    decode = [n.target for n in program.decode_gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default not in decode
    out = optimized.generate(x, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 4))


def test_a_hand_written_model_without_rope_absorbs_exactly_and_generates_its_own_greedy_tokens():
    torch.manual_seed(0)
    model = LearnedPositionLM().eval()
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    optimized = dscompile.optimize(model, _absorb(), example_inputs=x, lower="eager")
    program = optimized.runtime().program
    assert [(layer.latent, layer.rope_key) for layer in program.layers] == [(48, 0), (48, 0)]
    with torch.no_grad():
        torch.testing.assert_close(prefill_logits(program, x), model(x)[:, -1:], atol=1e-4, rtol=0)
    out = optimized.generate(x, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(model, x, 8))


def test_keeping_every_rotary_dim_is_exact_on_a_rope_model():
    model, x, _ = built("llama")
    optimized = dscompile.optimize(model, _absorb(rope_dims=16), example_inputs=x, lower="eager")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(optimized(x)), logits_of(model(x)), atol=1e-4, rtol=0)
    torch.testing.assert_close(prefill_logits(optimized.runtime().program, x), logits_of(model(x))[:, -1:],
                               atol=1e-4, rtol=0)


def test_decoupled_rope_generation_is_greedy_decoding_of_the_rewritten_forward_with_padding():
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, _absorb(0.5), calibration=calibration, lower="eager")
    program = optimized.runtime().program
    # 50% of K+V (2 KV heads x 16 dims x 2 = 64 values per token): 2 heads x 8 rotary dims, and a latent of 16
    assert [(layer.latent, layer.rope_key) for layer in program.layers] == [(16, 8), (16, 8)]
    assert program.cache_bytes_per_token() == 2 * 32 * 4
    assert optimized.report().to_dict()["kv_bytes_per_token_after"] < optimized.report().to_dict()[
        "kv_bytes_per_token_before"]
    x = ids(2, 12)
    out = optimized.generate(x, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 6))
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding: the padded row must decode as its unpadded self
    padded = optimized.generate(x, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    alone = optimized.generate(x[:1, 4:], max_new_tokens=4, eos_token_id=[])
    assert torch.equal(padded[0, 4:], alone[0])


def test_the_pairs_kept_rotary_are_those_carrying_the_largest_scores():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    d = attn.head_dim
    loud = pair_dims("rotate_half", d, 5)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            rows = proj.weight.view(-1, d, proj.weight.shape[1])
            rows[:, list(loud)] *= 20.0
    optimized = dscompile.optimize(model, _absorb(0.5, rope_dims=2), example_inputs=ids(2, 16), lower="eager")
    chosen = list(optimized.session.mla_plan.rope_dims.values())
    assert chosen[0] == loud and chosen[1] != loud


def test_healing_in_absorb_mode_trains_the_latent_seen_by_both_paths():
    model = tiny_llama()
    data = torch.randint(0, 128, (2, 2048), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, _absorb(0.5), calibration=data, lower="eager")
    report = dscompile.heal(optimized, data, max_steps=10, lr=3e-3, progress=False)
    assert report.losses[-1] < report.losses[0]
    x = ids(1, 10)
    with torch.no_grad():
        forward = logits_of(optimized(x))
    torch.testing.assert_close(prefill_logits(optimized.runtime().program, x), forward[:, -1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mla, message", [
    ({"rope_mode": "absorb", "rope_dims": 3}, "even"),
    ({"rope_mode": "absorb", "rope_dims": 16, "kv_ratio": 0.2}, "no room for a latent"),
])
def test_bad_absorb_settings_are_refused(mla, message):
    with pytest.raises(ConfigError, match=message):
        dscompile.optimize(tiny_llama(), {"mla": mla}, calibration=ids(2, 64), lower="eager")
