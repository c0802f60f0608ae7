"""Fused QKV projections split into three (views of the fused weight), so MLA can give their K and V a latent."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_mla_absorb import LearnedPositionLM
from tiny import greedy_by_forward
from torch import nn
from zoo import built

import dscompile
from dscompile.evaluate import logits_of
from dscompile.passes.kv_cache import build_cached_program
from dscompile.passes.mla_plan import layer_key
from dscompile.passes.unfuse_qkv import source_ptr, split_fused_qkv
from dscompile.runtime.generate import prefill_outputs


class ChunkedQKV(nn.Module):
    """The way many people write it: one biased ``qkv`` Linear, ``chunk(3, dim=-1)``, SDPA with ``is_causal``."""

    def __init__(self, width: int = 48, heads: int = 4, also_read_fused: bool = False):
        super().__init__()
        self.heads, self.also_read_fused = heads, also_read_fused
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        fused = self.qkv(x)
        q, k, v = (p.view(b, t, self.heads, -1).transpose(1, 2) for p in fused.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        return self.out(y) + (fused.mean(-1, keepdim=True) if self.also_read_fused else 0)


def ChunkedLM(also_read_fused: bool = False) -> nn.Module:  # noqa: N802 - reads as the model class it builds
    """Two layers of :class:`ChunkedQKV` with learned positions."""
    return LearnedPositionLM(vocab=80, attention=lambda width: ChunkedQKV(width, also_read_fused=also_read_fused))


@pytest.mark.parametrize("name", ["gpt2", "phi3", "nanogpt"])
def test_split_is_exact_and_reads_the_fused_weight_in_place(name):
    """GPT-2's Conv1D (``addmm`` + ``split``), Phi-3's slices, nanoGPT's ``split``: three projections, no copies."""
    model, x, _ = built(name)
    program = build_cached_program(model)
    before = prefill_outputs(program, x)[0]
    fused = program.matches.attention[0].k.weight.tensor
    attentions = split_fused_qkv(program.gm, program.matches.attention)
    assert not any(a.fused_qkv for a in attentions)
    torch.testing.assert_close(prefill_outputs(program, x)[0], before, atol=1e-6, rtol=0)
    a = attentions[0]
    assert len({a.q.node, a.k.node, a.v.node}) == 3
    assert a.k.out_features == a.n_kv_heads * a.head_dim and a.k.weight_layout == "out_in"
    for info in (a.q, a.k, a.v):
        assert info.weight.tensor.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert info.node in a.nodes
    assert all(n.graph is program.gm.graph for n in a.nodes)  # the cut pieces left the graph and the match


def test_interleaved_heads_are_gathered_copies_that_remember_where_they_came_from():
    """GPT-NeoX views the fused output as ``[..., heads, 3 * head_dim]``, transposes and cuts each head's
    ``[q k v]``: each piece becomes a projection onto every head's rows (a copy) viewed and transposed as before."""
    model, x, _ = built("gpt_neox")
    program = build_cached_program(model)
    before = prefill_outputs(program, x)[0]
    attn = program.matches.attention[0]
    fused, fused_bias, heads, dim = attn.k.weight.tensor, attn.k.bias.tensor, attn.n_heads, attn.head_dim
    attentions = split_fused_qkv(program.gm, program.matches.attention)
    assert not any(a.fused_qkv for a in attentions)
    torch.testing.assert_close(prefill_outputs(program, x)[0], before, atol=1e-6, rtol=0)
    a = attentions[0]
    for part, info in enumerate((a.q, a.k, a.v)):
        rows = (torch.arange(heads)[:, None] * 3 * dim + part * dim + torch.arange(dim)).reshape(-1)
        assert torch.equal(info.weight.tensor, fused[rows])
        assert torch.equal(info.bias.tensor, fused_bias[rows])
        assert source_ptr(info.weight.tensor) == fused[part * dim].data_ptr() != info.weight.tensor.data_ptr()
    # another graph of the same model gathers its own copies, at the same source: one layer key for both
    again = build_cached_program(model)
    assert [layer_key(b) for b in split_fused_qkv(again.gm, again.matches.attention)] == \
        [layer_key(b) for b in attentions]


def test_a_fused_output_read_some_other_way_stays_fused():
    """A model that also reads the fused output elsewhere cannot lose it: left alone, and MLA says why."""
    other = build_cached_program(ChunkedLM(also_read_fused=True).eval())
    assert all(a.fused_qkv for a in split_fused_qkv(other.gm, other.matches.attention))
    x = torch.randint(0, 80, (1, 8))
    opt = dscompile.optimize(ChunkedLM(also_read_fused=True).eval(), {"mla": {"kv_ratio": 0.5}}, x, lower="eager")
    assert all("not cut into q, k, v" in why for why in opt.report().to_dict()["mla_skipped"].values())


def test_a_hand_written_chunked_qkv_model_gets_a_latent_cache():
    """Full rank reproduces the model; half the budget halves the cache, and generation is the rewritten model's
    own greedy decoding."""
    torch.manual_seed(0)
    model = ChunkedLM().eval()
    x = torch.randint(0, 80, (2, 10), generator=torch.Generator().manual_seed(1))
    calibration = torch.randint(0, 80, (4, 64), generator=torch.Generator().manual_seed(2))
    exact = dscompile.optimize(model, {"mla": {"kv_ratio": 0.999}}, calibration, example_inputs=x, lower="eager")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(exact(x)), logits_of(model(x)), atol=1e-4, rtol=0)
    half = dscompile.optimize(model, {"mla": {"kv_ratio": 0.5}}, calibration, example_inputs=x, lower="eager")
    report = half.report().to_dict()
    assert not report["mla_skipped"] and len(report["mla_ranks"]) == 2
    assert report["kv_bytes_per_token_after"] <= report["kv_bytes_per_token_before"] // 2 + 8
    out = half.generate(x, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(half, x, 6))


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox"])
def test_a_split_model_with_a_latent_cache_saves_and_loads(tmp_path, name):
    """GPT-2's split projections are views at offsets into ``c_attn.weight``, GPT-NeoX's gathered copies remember
    theirs: the saved layers find them again, in a copy of the model whose tensors live elsewhere."""
    model, x, expect = built(name)
    calibration = torch.randint(0, expect.vocab, (4, 64), generator=torch.Generator().manual_seed(3))
    opt = dscompile.optimize(model, {"mla": {"kv_ratio": 0.5}}, calibration, example_inputs=x, lower="eager")
    assert len(opt.report().to_dict()["mla_ranks"]) == expect.layers
    opt.save(tmp_path / name)
    loaded = dscompile.load_optimized(tmp_path / name, copy.deepcopy(model), example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded(x)), logits_of(opt(x)), atol=1e-6, rtol=0)
    assert torch.equal(loaded.generate(x, max_new_tokens=5, eos_token_id=[]),
                       opt.generate(x, max_new_tokens=5, eos_token_id=[]))
