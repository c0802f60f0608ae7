"""The matchers on the zoo: every architecture, both capture paths, static and dynamic shapes.

Each zoo model records what a person reading its code would say it is (heads, KV heads, RoPE, window, fusions);
the matchers must say the same from the graph alone. Unit tests below cover the pieces the zoo cannot isolate:
near misses, the op table on both IRs, mask classification and RoPE base recovery.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import PATHS, ZOO, built, captured, matched, odd_lm

from dscompile.capture import CapturedGraph, capture_dynamo, capture_export, from_fx
from dscompile.patterns import match_all, ops
from dscompile.patterns.mask import MaskProbe, classify, read_masks
from dscompile.patterns.rope import base_from_tensor
from dscompile.patterns.walk import module_path

CASES = [pytest.param(name, path, dyn, id=f"{name}-{path}{'-dynamic' if dyn else ''}")
         for name in ZOO for path, dyn in PATHS]


@pytest.mark.parametrize(("name", "path", "dynamic"), CASES)
def test_every_layer_matches(name: str, path: str, dynamic: bool) -> None:
    ms, exp = matched(name, path, dynamic), built(name)[2]
    assert ms.counts() == {"attention": exp.layers, "ffn": exp.layers, "lm_head": 1}, ms.table()
    assert ms.near_misses == [], ms.table()
    # One match per layer: distinct layers, distinct anchors, in graph (= layer) order.
    for group in (ms.attention, ms.ffn):
        assert len({m.layer for m in group}) == exp.layers
        assert len({m.anchor for m in group}) == exp.layers
        assert [m.layer for m in group] == sorted((m.layer for m in group), key=_layer_index)


def _layer_index(layer: str) -> int:
    return next(int(p) for p in layer.split(".") if p.isdigit())


@pytest.mark.parametrize(("name", "path", "dynamic"), CASES)
def test_attention_properties(name: str, path: str, dynamic: bool) -> None:
    ms, exp = matched(name, path, dynamic), built(name)[2]
    for i, a in enumerate(ms.attention):
        got = (a.kind, a.n_heads, a.n_kv_heads, a.head_dim, a.v_head_dim, a.fused_qkv, a.qk_norm, a.causal, a.window)
        want = (exp.kind, exp.heads, exp.kv_heads, exp.head_dim, exp.head_dim, exp.fused_qkv, exp.qk_norm,
                exp.causal, exp.windows[i])
        assert got == want, a.to_dict()
        rope = (a.rope.style, a.rope.rotary_dim, a.rope.base) if a.rope else (None, None, None)
        assert rope == (exp.rope, exp.rope_dim, exp.rope_bases[i])
        # Projections are the model's: Q reads the hidden state, O writes it back, all under the layer's path.
        assert a.q.in_features == exp.hidden and a.o is not None and a.o.out_features == exp.hidden
        assert a.o.in_features == exp.heads * exp.head_dim
        if not exp.fused_qkv:
            assert (a.q.out_features, a.k.out_features, a.v.out_features) == (
                exp.heads * exp.head_dim, exp.kv_heads * exp.head_dim, exp.kv_heads * exp.head_dim)
        else:
            assert a.q.node is a.k.node is a.v.node
            assert a.q.out_features == (exp.heads + 2 * exp.kv_heads) * exp.head_dim
        assert all(p.weight.name.startswith(a.layer + ".") for p in (a.q, a.k, a.v, a.o))
        assert a.kv_width == exp.kv_heads * 2 * exp.head_dim
        assert a.anchor in a.nodes


@pytest.mark.parametrize(("name", "path", "dynamic"), CASES)
def test_ffn_properties(name: str, path: str, dynamic: bool) -> None:
    ms, exp = matched(name, path, dynamic), built(name)[2]
    for f in ms.ffn:
        got = (f.gated, f.activation, f.fused_gate_up, f.hidden_size, f.intermediate_size)
        assert got == (exp.gated, exp.activation, exp.fused_gate_up, exp.hidden, exp.intermediate), f.to_dict()
        assert (f.gate is not None) == exp.gated
        assert f.down.in_features == exp.intermediate and f.down.out_features == exp.hidden
        assert f.up.in_features == exp.hidden
        assert f.up.out_features == (2 if exp.fused_gate_up else 1) * exp.intermediate
        if exp.fused_gate_up:
            assert f.gate is not None and f.gate.node is f.up.node
        assert f.anchor in f.nodes


@pytest.mark.parametrize(("name", "path", "dynamic"), CASES)
def test_lm_head_properties(name: str, path: str, dynamic: bool) -> None:
    head, exp = matched(name, path, dynamic).lm_head[0], built(name)[2]
    got = (head.vocab_size, head.hidden_size, head.tied, head.sliced, head.softcap)
    assert got == (exp.vocab, exp.hidden, exp.tied, False, exp.softcap), head.to_dict()
    # Named after the module that computes the logits, even when Dynamo lifted the tied weight as the embedding.
    model = built(name)[0]
    module = dict(model.named_modules())[head.layer]
    assert isinstance(module, nn.Linear) and module.out_features == exp.vocab
    assert (head.tied_to is not None) == exp.tied


@pytest.mark.parametrize("path", ["export", "dynamo"])
@pytest.mark.parametrize("name", ["llama_eager", "mistral", "gemma2"])
def test_left_padding_is_neither_acausal_nor_a_window(name: str, path: str) -> None:
    model, ids, exp = built(name)
    pad = torch.ones_like(ids)
    pad[0, :3] = 0  # the probed batch row starts with three pads
    inputs = {"input_ids": ids, "attention_mask": pad}
    cg = capture_export(model, inputs) if path == "export" else capture_dynamo(model, inputs)[0]
    attention = match_all(cg).attention
    assert [(a.causal, a.window) for a in attention] == [(True, w) for w in exp.windows]


def test_matches_serialise() -> None:
    ms = matched("gemma3", "export", False)
    d = ms.to_dict()
    assert d["counts"] == {"attention": 2, "ffn": 2, "lm_head": 1}
    assert d["attention"][0]["rope"] == {"style": "rotate_half", "rotary_dim": 16, "base": 10000.0}
    assert d["attention"][0]["window"] == 4 and d["attention"][1]["window"] is None
    table = ms.table()
    assert "window=4" in table and "qk-norm" in table and "gelu_tanh" in table and "tied" in table
    assert str(ms) == "MatchSet(attention=2, ffn=2, lm_head=1, near_misses=0)"


# --- Near misses --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["export", "dynamo"])
def test_odd_model_gives_near_misses_with_reasons(path: str) -> None:
    model, ids = odd_lm()
    graphs = [capture_export(model, ids)] if path == "export" else capture_dynamo(model, ids)
    ms = match_all(graphs[0])
    assert ms.attention == [] and ms.ffn == []
    misses = {m.kind: m for m in ms.near_misses}
    assert set(misses) == {"attention", "ffn"}
    assert misses["attention"].layer == "attn"
    assert misses["attention"].reason == "q: expected one projection, found 0"
    assert misses["ffn"].layer == "mlp"
    assert misses["ffn"].reason == "activation is fed by 2 projections, expected 1"
    assert "miss:attention" in ms.table()
    assert ms.lm_head and ms.lm_head[0].layer == "head"


class _NoVocabHead(nn.Module):
    """A classifier over an embedding: no projection outputs the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.cls = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.cls(self.embed(ids))


def test_lm_head_near_miss_without_vocab_projection() -> None:
    ms = match_all(capture_export(_NoVocabHead().eval(), torch.zeros(1, 4, dtype=torch.long)))
    assert ms.lm_head == []
    assert [(m.kind, m.reason) for m in ms.near_misses] == [
        ("lm_head", "no projection outputs the vocabulary (50)")]


class _HeadsMismatch(nn.Module):
    """SDPA over 3 query heads and 2 KV heads: not grouped-query attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(24, 24, bias=False)
        self.k = nn.Linear(24, 16, bias=False)
        self.v = nn.Linear(24, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 3, 8).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)[:, :3]
        v = self.v(x).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)[:, :3]
        return F.scaled_dot_product_attention(q, k, v)


def test_heads_not_multiple_of_kv_heads_is_a_near_miss() -> None:
    ms = match_all(capture_export(_HeadsMismatch().eval(), torch.randn(1, 5, 24)))
    assert ms.attention == []
    assert [m.reason for m in ms.near_misses if m.kind == "attention"] == ["heads 3 not a multiple of KV heads 2"]


class _SoftmaxOnly(nn.Module):
    """A softmax over a projection (a router or classifier), not attention scores."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).softmax(-1)


def test_softmax_without_score_matmul_is_a_near_miss() -> None:
    ms = match_all(capture_export(_SoftmaxOnly().eval(), torch.randn(2, 8)))
    assert [(m.kind, m.reason) for m in ms.near_misses] == [
        ("attention", "softmax is not fed by one Q @ K^T matmul")]


class _BidirectionalEager(nn.Module):
    """Eager attention with no mask at all: an encoder, which the matchers must report as not causal."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48, bias=False)
        self.o = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, 2, 8).transpose(1, 2) for y in self.qkv(x).split(16, dim=-1))
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("path", ["export", "dynamo"])
def test_unmasked_eager_attention_is_not_causal(path: str) -> None:
    model, x = _BidirectionalEager().eval(), torch.randn(2, 6, 16)
    cg = capture_export(model, x) if path == "export" else capture_dynamo(model, x)[0]
    (a,) = match_all(cg).attention
    assert (a.kind, a.causal, a.window, a.n_heads, a.n_kv_heads, a.fused_qkv) == ("eager", False, None, 2, 2, True)


# --- The op table on both IRs ---------------------------------------------------------------------------------------


def _classes(cg: CapturedGraph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in cg.graph.nodes:
        cls = ops.op_class(node)
        if cls is not None:
            counts[cls] = counts.get(cls, 0) + 1
    return counts


@pytest.mark.parametrize(("path", "linear_target"), [("export", torch.ops.aten.linear.default),
                                                    ("dynamo", torch._C._nn.linear)])
def test_op_table_reads_both_irs(path: str, linear_target: object) -> None:
    cg = captured("sdpa_lm", path, False)[0]
    counts = _classes(cg)
    # Per layer q, k, v, o, gate_up, down; then the head. SDPA and linear stay whole on both paths.
    assert counts[ops.LINEAR] == 2 * 6 + 1
    assert counts[ops.SDPA] == 2 and counts[ops.SILU] == 2 and counts[ops.EMBEDDING] == 1
    assert counts[ops.COS] == 1 and counts[ops.SIN] == 1 and counts[ops.RMS_NORM] == 2 * 2 + 1
    linears = [n for n in cg.graph.nodes if ops.op_class(n) == ops.LINEAR]
    assert {n.target for n in linears} == {linear_target}
    assert {ops.op_label(n) for n in linears} == {"linear"}


@pytest.mark.parametrize("path", ["export", "dynamo"])
def test_op_table_sees_eager_attention_pieces(path: str) -> None:
    counts = _classes(captured("nanogpt", path, False)[0])
    assert counts[ops.SOFTMAX] == 2 and counts[ops.MASKED_FILL] == 2 and counts[ops.GELU] == 2
    assert counts[ops.LAYER_NORM] == 5 and counts[ops.MATMUL] == 4  # Q @ K^T and P @ V per layer
    assert ops.SDPA not in counts


class _Spellings(nn.Module):
    """Method calls, modules and operators, the way a symbolically traced graph spells them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.lin(x)).view(2, 4).transpose(0, 1).float()
        return (y * 2 + 1).softmax(-1) @ y.t()


def test_op_table_methods_modules_and_operators() -> None:
    gm = torch.fx.symbolic_trace(_Spellings())
    modules = dict(gm.named_modules())
    by_target = {str(n.target): n for n in gm.graph.nodes}
    assert ops.op_class(by_target["lin"], modules) == ops.LINEAR
    assert ops.op_class(by_target["act"], modules) == ops.GELU
    assert ops.op_class(by_target["lin"]) is None  # a module call needs the module table
    assert ops.op_class(by_target["view"]) == ops.VIEW
    assert ops.op_class(by_target["transpose"]) == ops.TRANSPOSE
    assert ops.op_class(by_target["float"]) == ops.CAST
    assert ops.op_class(by_target["softmax"]) == ops.SOFTMAX
    node_mul = next(n for n in gm.graph.nodes if n.target is operator.mul)
    node_matmul = next(n for n in gm.graph.nodes if n.target is operator.matmul)
    assert ops.op_class(node_mul) == ops.MUL and ops.op_class(node_matmul) == ops.MATMUL
    assert ops.is_op(node_mul, ops.ADD, ops.MUL) and not ops.is_op(node_mul, ops.ADD) and not ops.is_op(3, ops.MUL)
    placeholder = next(iter(gm.graph.nodes))
    assert ops.op_class(placeholder) is None and ops.op_label(placeholder) == "placeholder"
    assert ops.op_label(node_mul) == "mul" and ops.op_label(by_target["view"]) == "view"


def test_op_table_overloads_and_registration() -> None:
    aten = torch.ops.aten
    assert ops._TABLE[aten.mul.Tensor] == ops.MUL and ops._TABLE[aten.mul.Scalar] == ops.MUL
    assert ops._TABLE[aten.scaled_dot_product_attention.default] == ops.SDPA
    assert aten.linear.default in ops.targets_of(ops.LINEAR)

    def my_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w.t()

    assert my_linear not in ops.targets_of(ops.LINEAR)
    ops.register(ops.LINEAR, my_linear)
    try:
        assert my_linear in ops.targets_of(ops.LINEAR)
    finally:
        del ops._TABLE[my_linear]


# --- Mask classification --------------------------------------------------------------------------------------------


def _band(q: int, k: int, window: int | None = None) -> torch.Tensor:
    rows = torch.arange(q).unsqueeze(1) + (k - q)
    cols = torch.arange(k).unsqueeze(0)
    allowed = cols <= rows
    if window is not None:
        allowed &= cols > rows - window
    return allowed


@pytest.mark.parametrize(("allowed", "expected"), [
    pytest.param(_band(6, 6), (True, None), id="causal"),
    pytest.param(torch.ones(6, 6, dtype=torch.bool), (False, None), id="bidirectional"),
    pytest.param(_band(8, 8, 3), (True, 3), id="window"),
    pytest.param(_band(2, 7), (True, None), id="causal-with-cache-offset"),
    pytest.param(_band(3, 9, 4), (True, 4), id="window-with-cache-offset"),
    pytest.param(_band(6, 6) & (torch.arange(6) >= 2), (True, None), id="left-padding-is-not-a-window"),
    pytest.param(torch.zeros(4, 4, dtype=torch.bool), (True, None), id="all-masked"),
    pytest.param(_band(5, 5).T, (False, None), id="anti-causal"),
])
def test_classify(allowed: torch.Tensor, expected: tuple[bool, int | None]) -> None:
    assert classify(allowed) == expected


def test_classify_accepts_float_and_int_matrices() -> None:
    assert classify(_band(5, 5).float()) == (True, None)
    assert classify(_band(5, 5, 2).int()) == (True, 2)


class _Masks(nn.Module):
    """Returns the same sliding-window mask in all three polarities the matchers read."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.arange(x.shape[1])
        allow = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
        additive = torch.zeros_like(allow, dtype=torch.float32).masked_fill(~allow, float("-inf"))
        return allow, ~allow, additive


def test_read_masks_in_each_polarity() -> None:
    gm = torch.fx.symbolic_trace(_Masks())
    cg = from_fx(gm, [torch.randn(1, 7)])
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    probes = [MaskProbe(out[0], "allow"), MaskProbe(out[1], "block"), MaskProbe(out[2], "additive")]
    read = read_masks(cg, probes)
    assert [read[p.node.name] for p in probes] == [(True, 3)] * 3


def test_read_masks_survives_a_graph_it_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    gm = torch.fx.symbolic_trace(_Masks())
    cg = from_fx(gm, [torch.randn(1, 7)])
    cg.inputs = ["not a tensor"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert read_masks(cg, [MaskProbe(out[0], "allow")]) == {}
    assert "could not interpret the graph" in caplog.text
    assert read_masks(cg, []) == {}


# --- RoPE base recovery ---------------------------------------------------------------------------------------------


def _inv_freq(base: float, rotary: int) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)


def _angles(base: float, rotary: int, positions: int = 16) -> torch.Tensor:
    return torch.outer(torch.arange(positions, dtype=torch.float64), _inv_freq(base, rotary))


_FORMS = {
    "inv_freq": lambda b, r: _inv_freq(b, r).float(),
    "freqs_cis": lambda b, r: torch.polar(torch.ones(16, r // 2), _angles(b, r).float()),
    "cos_table": lambda b, r: torch.cat([_angles(b, r)] * 2, dim=-1).cos().float(),
    "sin_table": lambda b, r: torch.cat([_angles(b, r)] * 2, dim=-1).sin().float(),
    "half_cos_table_4d": lambda b, r: _angles(b, r).cos().float()[None, None],
}


@pytest.mark.parametrize("form", list(_FORMS))
@pytest.mark.parametrize(("base", "rotary"), [(10000.0, 8), (10000.0, 64), (500000.0, 128), (1000000.0, 32)])
def test_rope_base_recovery(form: str, base: float, rotary: int) -> None:
    got = base_from_tensor(_FORMS[form](base, rotary), rotary)
    assert got is not None and got == pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize("tensor", [
    pytest.param(torch.randn(64, 16), id="random-matrix"),
    pytest.param(torch.randn(8), id="random-vector"),
    pytest.param(torch.ones(8), id="norm-weight"),
    pytest.param(torch.tensor(3.0), id="scalar"),
    pytest.param(torch.arange(8), id="integer"),
    pytest.param(None, id="none"),
])
def test_rope_base_refuses_what_is_not_a_frequency_table(tensor: torch.Tensor | None) -> None:
    assert base_from_tensor(tensor, 16) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("base", "rotary"), [(10000.0, 16), (500000.0, 128), (1000000.0, 64)])
def test_rope_base_from_half_precision_inv_freq(dtype: torch.dtype, base: float, rotary: int) -> None:
    # model.to(bfloat16) rounds inv_freq too; fitting every angle keeps the base within a fraction of a percent.
    got = base_from_tensor(_inv_freq(base, rotary).to(dtype), rotary)
    assert got is not None and got == pytest.approx(base, rel=5e-3)


def test_rope_base_needs_a_rotary_width_of_four() -> None:
    assert base_from_tensor(_inv_freq(10000.0, 2).float(), 2) is None


# --- Module paths ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stack_path", "expected"), [
    ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("L['self']._modules['lm_head']", "lm_head"),
    ("L['fn'].blocks.1.mlp", "blocks.1.mlp"),
    ("model.layers.3", "model.layers.3"),
    ("L['self']", None),
    ("L['args'].0.lm_head", "lm_head"),  # transformers >= 5.24: the model is a wrapper's first argument
    ("L['args'][0].model.layers[2]", "model.layers.2"),
])
def test_module_path(stack_path: str, expected: str | None) -> None:
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    assert module_path(node) is None
    node.meta["nn_module_stack"] = {"outer": ("", object), "inner": (stack_path, object)}
    assert module_path(node) == expected
