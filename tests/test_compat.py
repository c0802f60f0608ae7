"""Backward compatibility: a model compiled in place with the backend keeps its forward signature and output type,
and transformers' own ``generate`` still runs on it, giving the original's tokens under exact profiles."""

from __future__ import annotations

import pytest
import torch
from tiny import ids, tiny_llama

import dscompile


@pytest.mark.parametrize("profile", ["none", {"mla": {"kv_ratio": 0.999}}])
def test_transformers_generate_on_a_model_compiled_in_place(profile):
    reference = tiny_llama()
    x = ids(2, 6)
    with torch.no_grad():
        expected = reference.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
    from dscompile.session import CompileSession

    model, session = tiny_llama(), CompileSession()
    model.compile(backend="deepseek_opt", options={"profile": profile, "lower": "eager", "session": session})
    with torch.no_grad():
        got = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert not session.empty  # generate ran through the backend
    if profile != "none":
        assert sum(p.rewrites for g in session.graphs for p in g.passes if p.name == "mla") >= 2


def test_optimized_model_keeps_the_forward_signature_and_output_type():
    model = tiny_llama()
    opt = dscompile.optimize(model, "none", example_inputs=ids(), lower="eager")
    x = ids(1, 7)
    mask = torch.ones_like(x)
    with torch.no_grad():
        want = model(x, attention_mask=mask, labels=x)
        got = opt(x, attention_mask=mask, labels=x)
    assert type(got) is type(want)
    assert torch.allclose(got.logits, want.logits, atol=1e-5) and torch.allclose(got.loss, want.loss, atol=1e-5)
    assert opt.config is model.config
