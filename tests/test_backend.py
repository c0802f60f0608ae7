"""The deepseek_opt backend: option validation, exactness of profile none, lowering targets, pass contract."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import ids, tiny_llama

from dscompile import ConfigError, UnsupportedError, deepseek_opt, diff
from dscompile.backend import BackendOptions
from dscompile.capture import from_fx
from dscompile.passes import manager
from dscompile.passes.base import PassContext, PassResult, pass_uuid
from dscompile.patterns import ops
from dscompile.session import CompileSession


def _compile(model, **options):
    session = CompileSession()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deepseek_opt", options={"session": session, **options})
    return compiled, session


def test_profile_none_equals_eager_with_inductor():
    model, x = tiny_llama(), ids(2, 9)
    compiled, session = _compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=0)
    (graph,) = session.graphs
    assert graph.lower == "inductor"
    assert graph.matches.counts() == {"attention": 2, "ffn": 2, "lm_head": 1}
    assert graph.diff().unchanged


def test_dynamic_true_recompiles_nothing_and_stays_exact():
    model = tiny_llama()
    session = CompileSession()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deepseek_opt", dynamic=True,
                             options={"session": session, "lower": "eager"})
    with torch.no_grad():
        for shape in ((2, 5), (3, 11)):  # batch 1 would be specialised by Dynamo
            x = ids(*shape)
            torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=0)
    assert len(session.graphs) == 1
    assert session.matches().counts()["attention"] == 2


def test_backend_is_found_without_importing_dscompile():
    code = textwrap.dedent("""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        out = torch.compile(model, backend="deepseek_opt", options={"lower": "eager"})(torch.ones(2, 4))
        assert out.shape == (2, 4)
        print("imported" if "dscompile" in sys.modules else "missing")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("imported")


def test_unknown_option_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown deepseek_opt option.*profil.*valid options: profile, lower"):
        BackendOptions.parse({"profil": "none"})
    with pytest.raises(ConfigError, match="valid targets: inductor, eager, tensorrt"):
        BackendOptions.parse({"lower": "tvm"})
    with pytest.raises(ConfigError, match="fallback must be True or False"):
        BackendOptions.parse({"fallback": "yes"})


def test_unknown_profile_fails_through_torch_compile():
    model = tiny_llama()
    compiled = torch.compile(model, backend="deepseek_opt", options={"profile": "turbo"})
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown profile 'turbo'; presets: none"):
        compiled(ids())


def test_rewrite_that_is_not_implemented_is_refused_before_work(monkeypatch):
    monkeypatch.setattr(manager, "REGISTRY", {})
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedError, match="MLA rewrite"):
        deepseek_opt(gm, [torch.ones(1, 2)], options={"profile": "mla"})


def test_tensorrt_without_torch_tensorrt(caplog):
    pytest.importorskip("torch")  # torch_tensorrt is never in the CPU environment
    assert "torch_tensorrt" not in sys.modules
    model, x = tiny_llama(), ids()
    compiled, _ = _compile(model, lower="tensorrt")
    with pytest.raises(Exception, match="needs torch_tensorrt"):
        compiled(x)
    compiled, _ = _compile(model, lower="tensorrt", fallback=True)
    with caplog.at_level(logging.WARNING, logger="dscompile"), torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=0)
    assert "running the graph in PyTorch instead" in caplog.text


def test_model_with_nothing_to_match_compiles_unchanged_and_says_why(caplog):
    model = torch.nn.Sequential(torch.nn.Conv1d(8, 8, 3), torch.nn.Tanh())
    compiled, session = _compile(model, lower="eager")
    x = torch.randn(3, 8, 5)
    with caplog.at_level(logging.INFO, logger="dscompile"):
        torch.testing.assert_close(compiled(x), model(x))
    assert "no attention, FFN or LM head matched" in caplog.text
    assert session.graphs[0].diff().unchanged


def _scale_k(gm, ctx: PassContext) -> PassResult:
    """A test rewrite: multiply every key projection's output by 1.0 (changes the graph, not the numbers)."""
    for attn in ctx.matches.attention:
        k = attn.k.node
        with gm.graph.inserting_after(k):
            mul = gm.graph.call_function(torch.mul, (k, 1.0))
        k.replace_all_uses_with(mul, delete_user_cb=lambda n, new=mul: n is not new)
    gm.recompile()
    return PassResult("mla", gm, rewrites=len(ctx.matches.attention))


def _explode(gm, ctx):
    for node in gm.graph.find_nodes(op="call_function", target=torch.nn.functional.embedding):  # damage, then fail
        with gm.graph.inserting_after(node):
            neg = gm.graph.call_function(torch.neg, (node,))
        node.replace_all_uses_with(neg, delete_user_cb=lambda n, new=neg: n is not new)
    raise RuntimeError("boom")


def test_pass_runs_and_diff_shows_what_it_changed(monkeypatch):
    monkeypatch.setattr(manager, "REGISTRY", {"mla": _scale_k})
    model, x = tiny_llama(), ids()
    compiled, session = _compile(model, profile="mla", lower="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=0)
    d = session.diff()
    assert d.op_changes == {ops.MUL: 2}
    assert len(d.rewritten["attention"]) == 2 and not d.rewritten["ffn"]
    assert "rewritten: model.layers.0.self_attn" in str(d)
    assert session.graphs[0].passes[0].rewrites == 2


def test_failing_pass_leaves_graph_untouched(monkeypatch, caplog):
    monkeypatch.setattr(manager, "REGISTRY", {"mla": _explode})
    model, x = tiny_llama(), ids()
    compiled, session = _compile(model, profile="mla", lower="eager")
    with caplog.at_level(logging.WARNING, logger="dscompile"), torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=0)
    assert "pass mla failed and was skipped" in caplog.text
    result = session.graphs[0].passes[0]
    assert result.skipped == ["pass failed: boom"] and result.rewrites == 0
    assert session.diff().unchanged


def test_pass_uuid_is_stable_and_distinguishes_passes():
    assert pass_uuid(_scale_k) == pass_uuid(_scale_k)
    assert pass_uuid(_scale_k) != pass_uuid(_explode)
    assert len(pass_uuid(print)) == 16


def test_diff_of_plain_graph_modules():
    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, 5))

        def forward(self, x):
            return torch.relu(torch.nn.functional.linear(x, self.w))

    gm = torch.fx.symbolic_trace(Proj())
    d = diff(gm, gm)
    assert d.unchanged and d.to_dict()["unchanged"] is True
    assert from_fx(gm, []).param_bytes() == 20 * 4 and d.param_bytes_before == 80
    with pytest.raises(TypeError, match="CapturedGraph or GraphModule"):
        diff("a", gm)  # type: ignore[arg-type]
