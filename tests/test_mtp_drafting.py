"""Drafting with bfloat16 weights: the products read half the bytes, the heads stay as trained, the output exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_mtp import varied_llama
from tiny import ids

import dscompile
from dscompile.ops import native
from dscompile.passes import mtp_drafting
from dscompile.passes.mtp_drafting import StoredLinear, drafting_copy, stored_linear


def test_stored_linear_computes_in_float32_from_bfloat16_weights(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 64, generator=g), torch.randn(40, 64, generator=g).bfloat16(), torch.randn(40)
    expected = F.linear(x.double(), w.double(), b.double())
    got = stored_linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 40)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)  # float32 sums of the exact weights
    monkeypatch.setattr(native, "load", lambda: False)  # no native kernel: the weight is widened first
    assert torch.equal(stored_linear(x, w, b), F.linear(x, w.float(), b))
    assert torch.equal(stored_linear(x, w.float(), None), F.linear(x, w.float()))  # same dtype: a plain linear


def test_the_drafting_copy_reads_bfloat16_and_leaves_the_trained_heads_alone():
    model = varied_llama()
    opt = dscompile.optimize(model, {"mtp": {"depth": 3}}, example_inputs=ids(1, 8), lower="eager")
    heads = opt.mtp_heads()
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    twin = drafting_copy(heads)
    stored = [m for m in twin.heads.modules() if isinstance(m, StoredLinear)]
    assert stored and all(m.weight.dtype == torch.bfloat16 for m in stored)
    assert not any(isinstance(m, torch.nn.Linear) for m in twin.heads.modules())
    assert twin.draft_weight.dtype == torch.bfloat16 and heads.draft_weight.dtype == torch.float32
    assert twin.embedding is heads.embedding and twin.head_weight is heads.head_weight  # the model's, shared
    assert not any(isinstance(m, StoredLinear) for m in heads.heads.modules())
    assert all(torch.equal(v, before[k]) for k, v in heads.state_dict().items())
    g = torch.Generator().manual_seed(1)
    h, token = torch.randn(64, heads.hidden, generator=g), torch.randint(0, heads.vocab, (64,), generator=g)
    fast, fast_logits = twin.draft(h, token)
    full, full_logits = heads.draft(h, token)
    torch.testing.assert_close(fast_logits, full_logits, rtol=0.05, atol=0.05)  # weights rounded to 8 bits
    assert (fast == full).float().mean() > 0.9


def test_compiled_drafting_reads_bfloat16_where_the_native_kernels_run(monkeypatch):
    model = varied_llama()
    x = ids(1, 8, seed=16)
    compiled = dscompile.optimize(model, {"mtp": {"depth": 2}}, example_inputs=x).runtime()
    if native.load():
        assert compiled.drafting_heads().draft_weight.dtype == torch.bfloat16
        assert compiled.drafting_heads() is compiled.drafting_heads()  # one copy, until reset_compiled
        first = compiled.drafting_heads()
        compiled.reset_compiled()
        assert compiled.drafting_heads() is not first
    eager = dscompile.optimize(model, {"mtp": {"depth": 2}}, example_inputs=x, lower="eager").runtime()
    assert eager.drafting_heads() is eager.drafter  # eager steps would widen the weights every call
    monkeypatch.setattr(mtp_drafting.native, "load", lambda: False)
    assert not mtp_drafting.can_draft_in_bfloat16(torch.device("cpu"))
    assert not mtp_drafting.can_draft_in_bfloat16(torch.device("meta"))
