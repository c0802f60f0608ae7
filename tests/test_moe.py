"""MoE: carving every FFN style of the zoo into shared and routed experts, the router and its balancing bias, both
execution formulations, the runtime (masked prefill, gathered decode), reports, healing and bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import compile_with_session, greedy_by_forward, ids, tiny_llama
from zoo import ZOO, built

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.ops import native
from dscompile.passes import moe_carve
from dscompile.passes.moe_ops import NATIVE, moe_ffn, neuron_activations
from dscompile.runtime.generate import prefill_logits

ALL_ACTIVE = {"moe": {"n_experts": 8, "n_shared": 2, "top_k": 6}}  # every routed expert chosen: the dense FFN
HALF = {"moe": {"n_experts": 16, "n_shared": 2, "top_k": 6}}


@pytest.mark.parametrize("name", list(ZOO))
def test_with_every_expert_active_the_carved_model_is_the_original(name):
    model, x, expect = built(name)
    compiled, session = compile_with_session(model, ALL_ACTIVE)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(compiled(x)), logits_of(model(x)), atol=1e-4, rtol=0)
    results = [p for g in session.graphs for p in g.passes if p.name == "moe"]
    assert sum(r.rewrites for r in results) == expect.layers and not any(r.skipped for r in results)
    assert sorted(session.diff().rewritten["ffn"]) == sorted(f.layer for f in session.matches().ffn)


def _experts(tokens=5, hidden=12, routed=6, width=4, shared=3, gated=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    block = lambda *lead: (r(*lead, hidden) if gated else None, r(*lead, hidden), r(*lead, hidden),  # noqa: E731
                           r(*lead) if gated and bias else None, r(*lead) if bias else None)
    shared_block = list(block(shared * width))
    shared_block[2] = shared_block[2].T.contiguous()  # nn.Linear layout
    experts = block(routed, width)
    down_t = experts[2].reshape(-1, hidden).T.contiguous()
    return r(2, tokens, hidden), tuple(shared_block), experts, down_t, r(routed, hidden), r(routed), r(hidden)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
def test_gathered_and_masked_compute_the_same_function(gated, activation):
    x, shared, experts, down_t, router, bias, down_bias = _experts(gated=gated)
    for rows in (x[:1, :1], x[:, :1], x):  # 1 and 2 tokens gather their experts; 10 tokens take the masked path
        for top_k in (1, 3, 6):
            masked = moe_ffn(rows, shared, experts, down_t, router, bias, down_bias, top_k, activation, False)
            gathered = moe_ffn(rows, shared, experts, down_t, router, bias, down_bias, top_k, activation, True)
            torch.testing.assert_close(gathered, masked, atol=1e-4, rtol=1e-5)
            if native.load():  # the native kernel where the gathered form serves, shared choices included
                with torch.no_grad():
                    fast = moe_ffn(rows, shared, experts, down_t, router, bias, down_bias, top_k, activation, NATIVE)
                torch.testing.assert_close(fast, masked, atol=1e-4, rtol=1e-5)
    # with every expert chosen it is the dense FFN over all neurons
    gate, up, down, gb, ub = (None if t is None else t.reshape(-1, *t.shape[2:]) for t in experts)
    cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
    rows = x.reshape(-1, 12)
    dense = neuron_activations(rows, cat(shared[0], gate), cat(shared[1], up), cat(shared[3], gb),
                               cat(shared[4], ub), activation) @ torch.cat([shared[2].T, down]) + down_bias
    torch.testing.assert_close(masked, dense.view(2, 5, 12), atol=1e-4, rtol=1e-5)
    # the choice is the router's: a bias that favours expert 0 makes every token use it
    favour = torch.full((6,), -1e4)
    favour[0] = 1e4
    one = moe_ffn(x, None, experts, down_t, router, favour, None, 1, activation, False)
    only = [t[:1] if t is not None else None for t in experts]
    torch.testing.assert_close(one, moe_ffn(x, None, only, down_t[:, :4], router[:1], favour[:1], None, 1, activation,
                                            False))


def test_router_weights_are_one_but_carry_gradient_for_healing():
    x, shared, experts, down_t, router, bias, down_bias = _experts()
    router = router.clone().requires_grad_()
    out = moe_ffn(x, shared, experts, down_t, router, bias, down_bias, 3, "silu", False)
    out.square().sum().backward()
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_balanced_clusters_are_equal_and_group_neurons_that_fire_together():
    # 4 planted groups of 5 neurons, each group active on its own quarter of the tokens
    tokens, groups, size = 400, 4, 5
    contrib = torch.rand(tokens, groups * size, generator=torch.Generator().manual_seed(0)) * 0.05
    truth = torch.randperm(groups * size, generator=torch.Generator().manual_seed(1)).view(groups, size)
    for g in range(groups):
        contrib[g * 100:(g + 1) * 100, truth[g]] += 1.0
    found = moe_carve.balanced_clusters(contrib, groups, size)
    assert found.shape == (groups, size) and sorted(found.reshape(-1).tolist()) == list(range(groups * size))
    assert sorted(tuple(sorted(r)) for r in found.tolist()) == sorted(tuple(sorted(r)) for r in truth.tolist())


def test_balancing_bias_brings_a_skewed_router_within_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    router = torch.randn(8, 16, generator=g)
    skew = torch.tensor([4.0, 3.0, 0, 0, 0, 0, 0, -3.0])
    before = moe_carve.expert_load(x, router, skew, 2)
    assert max(before) - 1 > 1.0
    bias, load = moe_carve.balance(x, router, skew, 2)
    assert max(load) - 1 <= moe_carve.MAXVIO_TARGET
    assert load == pytest.approx(moe_carve.expert_load(x, router, bias, 2))


def test_optimize_carves_from_calibration_and_generation_is_greedy_decoding_of_the_forward():
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, HALF, calibration=calibration, lower="eager")
    report = optimized.report().to_dict()
    layers = ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert sorted(report["moe_expert_load"]) == layers and sorted(report["moe_maxvio"]) == layers
    loads = report["moe_expert_load"].values()
    assert all(len(load) == 14 and sum(load) == pytest.approx(14, abs=1e-3) for load in loads)
    assert all(v <= moe_carve.MAXVIO_TARGET + 1e-6 for v in report["moe_maxvio"].values())
    assert report["moe_calibration_tokens"] == 1200
    # each FFN holds 3 * 64 * 128 weights; a token reads the shared 2/16 and 6 of the 14 routed experts
    ffn = 3 * 64 * 128
    unread = 2 * (ffn * 14 // 16 - ffn * 14 // 16 * 6 // 14)
    assert report["active_params_per_token"] <= report["params_after"] - unread
    x = ids(2, 12)
    with torch.no_grad():
        forward = logits_of(optimized(x))
        assert (forward - logits_of(model(x))).abs().max() > 1e-3  # lossy with experts left out...
    program = optimized.runtime().program
    assert program.decode_gm is not None
    torch.testing.assert_close(prefill_logits(program, x), forward[:, -1:], atol=1e-5, rtol=0)
    # ...and the runtime (masked prefill, gathered decode) generates what greedy decoding of the forward does
    out = optimized.generate(x, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 6))


def test_moe_composes_with_mla_in_absorb_mode():
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    profile = {"mla": {"kv_ratio": 0.5, "rope_mode": "absorb"}, **HALF}
    optimized = dscompile.optimize(model, profile, calibration=calibration, lower="eager")
    x = ids(1, 10)
    out = optimized.generate(x, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 5))
    assert [layer.latent for layer in optimized.runtime().program.layers] != [None, None]


def test_heal_trains_the_experts_and_router():
    model = tiny_llama()
    data = torch.randint(0, 128, (2, 2048), generator=torch.Generator().manual_seed(0))
    sparse = {"moe": {"n_experts": 16, "n_shared": 0, "top_k": 2}}
    optimized = dscompile.optimize(model, sparse, calibration=data, lower="eager")
    router = optimized.session.moe_plan.layers
    before = [c.router.detach().clone() for c in router.values()]
    report = dscompile.heal(optimized, data, max_steps=10, lr=1e-3, progress=False)
    assert report.steps == 10 and report.losses[-1] < report.losses[0]
    assert all(not torch.equal(b, c.router) for b, c in zip(before, router.values()))
    for carved in router.values():  # decode's gathered rows follow the trained (masked) down weights
        torch.testing.assert_close(carved.experts[2].reshape(-1, 64), carved.down_t.T, atol=0, rtol=0)
    x = ids(1, 10)
    out = optimized.generate(x, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 4))


def test_bad_expert_counts_and_thin_calibration(caplog):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"does not divide the FFN width 128.*nearest that do: .*16"):
        dscompile.optimize(model, {"moe": {"n_experts": 12, "n_shared": 2, "top_k": 4}},
                           calibration=torch.randint(0, 128, (1, 64)))
    with pytest.raises(ConfigError, match="top_k must be between 1 and the routed expert count 14"):
        dscompile.optimize(model, {"moe": {"n_experts": 16, "n_shared": 2, "top_k": 15}})
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        dscompile.optimize(model, HALF, calibration=torch.randint(0, 128, (1, 64)), lower="eager")
    assert "moe: calibrated on 64 tokens" in caplog.text


def test_an_ffn_whose_activation_is_not_reproduced_is_left_dense():
    model, x, _ = built("llama")
    ffn = dscompile.inspect(model, x).ffn[0]
    rows = torch.randn(20, ffn.hidden_size)
    a = neuron_activations(rows, ffn.gate.weight.tensor, ffn.up.weight.tensor, None, None, "silu")
    assert isinstance(moe_carve.dense_rows(ffn, rows, a), moe_carve.DenseRows)
    ffn.activation = "relu"
    assert "do not reproduce" in moe_carve.dense_rows(ffn, rows, a)
    ffn.activation = "softplus"
    assert "has no carved form" in moe_carve.unsupported_reason(ffn)


@pytest.mark.skipif(not native.load(), reason="native kernels need a C++ compiler")
def test_native_experts_serve_decode_steps_and_leave_training_to_autograd():
    """The decode lowering switches gathered FFNs to the native kernel; with autograd on the same call takes the
    gathered formulation, so gradients still reach the experts."""
    from dscompile.lower.decode_step import GATHERED, native_experts

    x, shared, experts, down_t, router, bias, down_bias = _experts()
    graph, root = torch.fx.Graph(), torch.nn.Module()
    inputs = graph.placeholder("x")

    def attr(tensor):  # weights are attributes in a program's graph, as rewrite_ffn registers them
        if tensor is None:
            return None
        name = f"w{len(root._buffers)}"
        root.register_buffer(name, tensor)
        return graph.get_attr(name)

    node = graph.call_function(moe_ffn, (inputs, tuple(map(attr, shared)), tuple(map(attr, experts)), attr(down_t),
                                         attr(router), attr(bias), attr(down_bias), 3, "silu", True, None))
    graph.output(node)
    gm = native_experts(torch.fx.GraphModule(root, graph))
    assert node.args[GATHERED] == NATIVE
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = gm(x[:, :1])
    assert "dscompile::moe_experts" in {e.key for e in prof.key_averages()}
    expected = moe_ffn(x[:, :1], shared, experts, down_t, router, bias, down_bias, 3, "silu", False)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    up = experts[1].clone().requires_grad_()
    trained = (experts[0], up, *experts[2:])
    moe_ffn(x[:, :1], shared, trained, down_t, router, bias, down_bias, 3, "silu", NATIVE).square().sum().backward()
    assert up.grad is not None and up.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.dscompile.moe_experts(x[0], torch.zeros(5, 1, dtype=torch.long), None, experts[1], experts[2], None,
                                        None, "swish")
