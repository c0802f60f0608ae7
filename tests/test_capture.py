"""Capture: model -> FX graph on the export and Dynamo paths, faithful to the model, with clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import PATHS, ZOO, built, captured, example_ids, matched, sdpa_lm

from dscompile.capture import (
    CapturedGraph,
    capture_dynamo,
    capture_export,
    dtype_of,
    dynamo_weight_name,
    from_dynamo,
    from_fx,
    split_inputs,
)
from dscompile.errors import CaptureError
from dscompile.patterns import match_all

CAPTURES = [pytest.param(capture_export, id="export"), pytest.param(capture_dynamo, id="dynamo")]


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[return-value]


def _no_cache(model: nn.Module) -> dict[str, object]:
    return {"use_cache": False} if hasattr(model, "config") else {}


# --- Errors ---------------------------------------------------------------------------------------------------------


class _IntOnly(nn.Module):
    """Integer weights only, as a quantised checkpoint stores them."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.float()


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize(("model", "inputs", "message"), [
    pytest.param(lambda x: x, torch.zeros(1, 2), "expected a torch.nn.Module, got function", id="not-a-module"),
    pytest.param(nn.ReLU(), torch.zeros(1, 2), "the model has no parameters", id="no-parameters"),
    pytest.param(_IntOnly(), torch.zeros(1, 4), r"no floating-point parameters \(found torch.int8\); .* dequantize",
                 id="integer-only"),
    pytest.param(nn.Linear(2, 2).double(), torch.zeros(1, 2), r"unsupported parameter dtype\(s\) torch.float64",
                 id="float64"),
    pytest.param(nn.Linear(2, 2), None, "example inputs are required", id="no-inputs"),
    pytest.param(nn.Linear(2, 2), "abc", "example inputs must be a tensor, .* not str", id="string-inputs"),
])
def test_capture_refuses_with_a_message(capture: object, model: object, inputs: object, message: str) -> None:
    with pytest.raises(CaptureError, match=message):
        capture(model, inputs)  # type: ignore[operator]


def test_dynamic_export_says_when_inputs_do_not_fit_forward() -> None:
    with pytest.raises(CaptureError, match="example inputs do not fit Linear.forward"):
        capture_export(nn.Linear(2, 2), (torch.zeros(1, 2), torch.zeros(1, 2)), dynamic=True)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y if y.sum() > 0 else -y


def test_export_failure_names_the_model() -> None:
    with pytest.raises(CaptureError, match="torch.export could not capture _DataDependent"):
        capture_export(_DataDependent(), torch.randn(2, 4))


def test_dynamo_graph_with_wrong_inputs_is_refused() -> None:
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(CaptureError, match="1 placeholders but 2 example inputs"):
        from_dynamo(gm, [torch.zeros(1, 2), torch.zeros(1, 2)])


@pytest.mark.parametrize(("inputs", "expected"), [
    pytest.param(torch.ones(1, 2), ((1,), {}), id="tensor"),
    pytest.param((torch.ones(1, 2), 3), ((1, 3), {}), id="tuple"),
    pytest.param([torch.ones(1, 2)], ((1,), {}), id="list"),
    pytest.param({"input_ids": torch.ones(1, 2)}, ((), {"input_ids": 1}), id="dict"),
])
def test_split_inputs(inputs: object, expected: tuple[tuple[object, ...], dict[str, object]]) -> None:
    args, kwargs = split_inputs(inputs)
    summary = (tuple(1 if isinstance(a, torch.Tensor) else a for a in args),
               {k: 1 for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    assert summary == expected


# --- Faithfulness ---------------------------------------------------------------------------------------------------

CASES = [pytest.param(name, path, dyn, id=f"{name}-{path}{'-dynamic' if dyn else ''}")
         for name in ZOO for path, dyn in PATHS]


@pytest.mark.parametrize(("name", "path", "dynamic"), CASES)
def test_graph_computes_what_the_model_computes(name: str, path: str, dynamic: bool) -> None:
    model, ids, exp = built(name)
    graphs = captured(name, path, dynamic)
    assert len(graphs) == 1, "the zoo's models run in one graph, without breaks"
    cg = graphs[0]
    assert cg.source == path and cg.runnable()
    with torch.no_grad():
        want = _logits(model(ids, **_no_cache(model)))
        outs = cg.gm(*cg.inputs)
    got = next(o for o in outs if isinstance(o, torch.Tensor) and o.shape == (*ids.shape, exp.vocab))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("name", "path", "dynamic"), CASES)
def test_weights_are_named_as_in_the_model(name: str, path: str, dynamic: bool) -> None:
    model = built(name)[0]
    cg = captured(name, path, dynamic)[0]
    names = {w.name for w in cg.weights.values()}
    assert {n for n, _ in model.named_parameters()} <= names
    assert cg.param_count() == sum(p.numel() for p in model.parameters())  # tied weights once
    assert cg.param_bytes() >= 4 * cg.param_count()
    for ref in cg.weights.values():
        assert ref.shape == tuple(ref.tensor.shape) and ref.node in cg.placeholders()
    assert dtype_of(cg) == torch.float32


@pytest.mark.parametrize("name", list(ZOO))
def test_dynamic_export_runs_at_other_shapes(name: str) -> None:
    model, _, exp = built(name)
    ep = captured(name, "export", True)[0].exported
    assert ep is not None
    other = example_ids(exp.vocab, batch=3, seq=6, seed=7)
    with torch.no_grad():
        got = _logits(ep.module()(other, **_no_cache(model)))
        want = _logits(model(other, **_no_cache(model)))
    torch.testing.assert_close(got if isinstance(got, torch.Tensor) else got[0], want)


def test_static_and_dynamic_capture_differ_in_symbols() -> None:
    def symbolic(cg: CapturedGraph) -> bool:
        return any(isinstance(d, torch.SymInt) for n in cg.placeholders()
                   for d in getattr(n.meta.get("val", n.meta.get("example_value")), "shape", ()))

    assert not symbolic(captured("llama", "export", False)[0])
    assert symbolic(captured("llama", "export", True)[0])
    assert symbolic(captured("llama", "dynamo", True)[0])
    # Dynamo hands sizes of dynamic dims as SymInt inputs; captured inputs hold their example ints instead.
    assert any(type(v) is int for v in captured("llama", "dynamo", True)[0].inputs)


def test_hf_models_are_captured_without_a_kv_cache() -> None:
    model, ids, _ = built("llama")
    ep = captured("llama", "export", False)[0].exported
    assert ep is not None
    with pytest.raises(ValueError, match="use_cache"):
        ep.module()(ids)  # the program was exported with use_cache=False as an input
    assert len(captured("llama", "dynamo", False)[0].gm.graph.find_nodes(op="output")[0].args[0]) == 1


# --- CapturedGraph helpers ------------------------------------------------------------------------------------------


def test_run_records_node_values() -> None:
    cg = captured("sdpa_lm", "export", False)[0]
    attn = matched("sdpa_lm", "export", False).attention[0]
    values = cg.run([attn.anchor, attn.q.node])
    assert set(values) == {attn.anchor.name, attn.q.node.name}
    assert values[attn.anchor.name].shape == (2, 4, 8, 16)  # batch, heads, positions, head_dim
    assert values[attn.q.node.name].shape == (2, 8, 64)


def test_snapshot_is_independent_of_later_rewrites() -> None:
    cg = captured("sdpa_lm", "dynamo", False)[0]
    snap = cg.snapshot()
    before = len(cg.graph.nodes)
    node = next(n for n in snap.graph.nodes if n.op == "call_function")
    with snap.graph.inserting_after(node):
        snap.graph.call_function(torch.relu, (node,))
    assert len(snap.graph.nodes) == before + 1 and len(cg.graph.nodes) == before
    assert snap.weights.keys() == cg.weights.keys()
    assert all(snap.weights[k].tensor is cg.weights[k].tensor for k in cg.weights)
    assert all(snap.weights[k].node.graph is snap.graph for k in snap.weights)


class _Functional(nn.Module):
    """Weights read as attributes: a symbolically traced graph holds them as ``get_attr`` nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3))
        self.w2 = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, self.w1)), self.w2)


def test_from_fx_reads_attribute_weights() -> None:
    cg = from_fx(torch.fx.symbolic_trace(_Functional()), [torch.randn(2, 3)])
    assert cg.source == "fx" and sorted(w.name for w in cg.weights.values()) == ["w1", "w2"]
    assert cg.param_count() == 3 * 4 + 4 * 2 and cg.runnable()


def test_dynamo_names_root_level_weights() -> None:
    cg = capture_dynamo(_Functional(), torch.randn(2, 3))[0]
    assert sorted(w.name for w in cg.weights.values()) == ["w1", "w2"]


@pytest.mark.parametrize(("placeholder", "expected"), [
    ("l_self_modules_model_modules_layers_modules_0_modules_q_proj_parameters_weight_",
     "model.layers.0.q_proj.weight"),
    ("l_self_modules_rotary_emb_buffers_inv_freq_", "rotary_emb.inv_freq"),
    ("l_fn_parameters_weight_", "weight"),
    ("l_self_parameters_w1_", "w1"),
    ("l_self_buffers_freqs_cis_", "freqs_cis"),
    # transformers >= 5.24 wraps forward, so Dynamo sees the model as the wrapper's first argument
    ("l_args_0_modules_model_modules_embed_tokens_parameters_weight_", "model.embed_tokens.weight"),
    ("l_args_1_", None),
    ("l_input_ids_", None),
    ("s0", None),
])
def test_dynamo_weight_name(placeholder: str, expected: str | None) -> None:
    assert dynamo_weight_name(placeholder) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_capture_and_match(dtype: torch.dtype) -> None:
    model, ids, _ = sdpa_lm()
    model = model.to(dtype)
    cg = capture_export(model, ids)
    assert dtype_of(cg) == dtype
    ms = match_all(cg)
    assert ms.counts() == {"attention": 2, "ffn": 2, "lm_head": 1}
    assert ms.attention[0].rope is not None and ms.attention[0].rope.base == pytest.approx(20000.0, rel=1e-2)
