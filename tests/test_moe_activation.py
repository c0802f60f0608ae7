"""MoE routed by the experts' own activations (``MoEConfig(router="activation")``): each token keeps the experts
whose neurons contribute most, exactly; both formulations agree, every FFN style of the zoo stays exact with every
expert chosen, and optimize, the runtime, healing, save/load and the report all carry the routing."""

from __future__ import annotations

import pytest
import torch
from test_moe import _experts
from tiny import compile_with_session, greedy_by_forward, ids, tiny_llama
from zoo import built

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.heal import HEAL_LR_MOE
from dscompile.ops import native
from dscompile.passes.moe_ops import ACTIVATION, NATIVE, moe_ffn, neuron_activations
from dscompile.profile import MoEConfig
from dscompile.runtime.generate import prefill_logits

CALIBRATION = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))


def _by_hand(rows, experts, down_norms, top_k, activation):
    """The routed experts' output with each token's ``top_k`` experts by ``sum |a| * |down row|``, in plain loops."""
    gate, up, down, gate_bias, up_bias = experts
    out = torch.zeros(rows.shape[0], down.shape[-1])
    for t, row in enumerate(rows):
        a = [neuron_activations(row[None], None if gate is None else gate[e], up[e],
                                None if gate_bias is None else gate_bias[e], None if up_bias is None else up_bias[e],
                                activation)[0] for e in range(up.shape[0])]
        scores = torch.stack([(a[e].abs() * down_norms[e]).sum() for e in range(len(a))])
        for e in scores.topk(top_k).indices.tolist():
            out[t] += a[e] @ down[e]
    return out


@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("gated", [True, False])
def test_each_token_keeps_the_experts_that_contribute_most(width, gated):
    x, _, experts, down_t, _, _, _ = _experts(routed=24 // width, width=width, gated=gated)
    norms = experts[2].norm(dim=-1)
    bias = torch.zeros(experts[1].shape[0])
    rows = x.reshape(-1, x.shape[-1])
    for tokens in (1, 2, 10):  # 1 and 2 tokens gather the chosen down rows, 10 take the masked path
        for top_k in (1, 12 // width, 24 // width):
            args = (None, experts, down_t, norms, bias, None, top_k, "silu")
            masked = moe_ffn(rows[:tokens], *args, False, routing=ACTIVATION)
            gathered = moe_ffn(rows[:tokens], *args, True, routing=ACTIVATION)
            torch.testing.assert_close(gathered, masked, atol=1e-4, rtol=1e-5)
            if native.load():  # the native choice: with the chosen rows where gathered serves, else as a mask
                for form in (NATIVE, False):
                    counted = [torch.zeros(bias.shape[0], dtype=torch.long) for _ in range(2)]
                    with torch.no_grad():
                        fast = moe_ffn(rows[:tokens], *args, form, counted[0], routing=ACTIVATION)
                    moe_ffn(rows[:tokens], *args, False, counted[1], routing=ACTIVATION)
                    torch.testing.assert_close(fast, masked, atol=1e-4, rtol=1e-5)
                    assert torch.equal(counted[0], counted[1])
            torch.testing.assert_close(masked, _by_hand(rows[:tokens], experts, norms, top_k, "silu"), atol=1e-4,
                                       rtol=1e-5)
    # the bias shifts the choice: a large one on expert 0 makes every token keep it
    favour = bias.clone()
    favour[0] = 1e6
    counts = torch.zeros(bias.shape[0], dtype=torch.long)
    moe_ffn(rows, None, experts, down_t, norms, favour, None, 1, "silu", False, counts, routing=ACTIVATION)
    assert counts.tolist() == [rows.shape[0]] + [0] * (bias.shape[0] - 1)


def test_gradient_reaches_every_chosen_experts_rows():
    x, shared, experts, down_t, _, _, down_bias = _experts(routed=6, width=4)
    trained = [t.clone().requires_grad_() for t in experts[:2]]
    down_t = down_t.clone().requires_grad_()
    out = moe_ffn(x, shared, (*trained, *experts[2:]), down_t, experts[2].norm(dim=-1), torch.zeros(6), down_bias,
                  3, "silu", False, routing=ACTIVATION)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (*trained, down_t))


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3", "sdpa_lm"])
def test_with_every_expert_active_the_model_is_the_original(name):
    """Gated (Llama), plain GELU (GPT-2), fused gate/up (Phi-3) and a hand-written transformer."""
    model, x, expect = built(name)
    profile = {"moe": {"n_experts": 8, "n_shared": 2, "top_k": 6, "router": "activation"}}
    compiled, session = compile_with_session(model, profile)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(compiled(x)), logits_of(model(x)), atol=1e-4, rtol=0)
    assert sum(p.rewrites for g in session.graphs for p in g.passes if p.name == "moe") == expect.layers


def _error(optimized, model, x):
    with torch.no_grad():
        return (logits_of(optimized(x)) - logits_of(model(x))).abs().mean().item()


def test_optimize_routes_by_activation_and_generation_is_greedy_decoding_of_the_forward():
    model = tiny_llama()
    neurons = {"n_experts": 128, "n_shared": 0, "top_k": 64}  # one neuron per expert, half of them per token
    exact = dscompile.optimize(model, {"moe": {**neurons, "router": "activation"}}, calibration=CALIBRATION,
                               lower="eager")
    fitted = dscompile.optimize(model, {"moe": neurons}, calibration=CALIBRATION, lower="eager")
    x = ids(2, 12)
    assert 0 < _error(exact, model, x) < _error(fitted, model, x) / 2  # the exact choice loses far less
    carved = list(exact.session.moe_plan.layers.values())
    assert all(c.routing == ACTIVATION and c.router.shape == (128, 1) and not c.router_bias.any() for c in carved)
    report = exact.report().to_dict()
    ffn = 3 * 64 * 128  # a token reads every gate and up row and half the down rows, plus the router's norms and
    # its (zero) bias: one each per expert
    assert report["params_before"] - report["active_params_per_token"] == 2 * (ffn // 3 // 2 - 2 * 128)
    assert len(report["moe_expert_load"]["model.layers.0.mlp"]) == 128
    program = exact.runtime().program
    with torch.no_grad():
        forward = logits_of(exact(x))
    torch.testing.assert_close(prefill_logits(program, x), forward[:, -1:], atol=1e-5, rtol=0)
    out = exact.generate(x, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(exact, x, 6))
    report_load = exact.report().to_dict()["moe_expert_load"]
    assert report_load == {exact.session.moe_plan.names[k]: [round(v, 4) for v in c.load]
                           for k, c in exact.session.moe_plan.layers.items()}


def test_heal_save_and_load_keep_the_routing(tmp_path):
    model = tiny_llama()
    profile = {"moe": {"n_experts": 32, "n_shared": 4, "top_k": 8, "router": "activation"}}
    data = torch.randint(0, 128, (2, 2048), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, profile, calibration=data, lower="eager")
    report = dscompile.heal(optimized, data, max_steps=8, lr=1e-3, progress=False)
    assert report.losses[-1] < report.losses[0]
    assert dscompile.heal(optimized, data, max_steps=1, progress=False).lr == HEAL_LR_MOE  # the experts' own rate
    for carved in optimized.session.moe_plan.layers.values():  # decode's gathered rows follow the trained weights
        torch.testing.assert_close(carved.experts[2].reshape(-1, 64), carved.down_t.T, atol=0, rtol=0)
    x = ids(1, 10)
    out = optimized.generate(x, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out, greedy_by_forward(optimized, x, 5))
    optimized.save(str(tmp_path / "saved"))
    loaded = dscompile.load_optimized(tmp_path / "saved", model)
    assert loaded.profile.moe == MoEConfig(32, 4, 8, "activation")
    assert all(c.routing == ACTIVATION for c in loaded.session.moe_plan.layers.values())
    assert torch.equal(loaded.generate(x, max_new_tokens=5, eos_token_id=[]), out)
    with pytest.raises(ConfigError, match="cannot offload experts routed by 'activation'"):
        optimized.offload_experts(8)


def test_an_unknown_router_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="moe.router must be one of 'linear', 'activation', got 'softmax'"):
        dscompile.optimize(tiny_llama(), {"moe": {"router": "softmax"}})


def test_exports_to_onnx_runtime_and_generates_there_what_pytorch_does(tmp_path):
    """The activation choice (every routed neuron, a top-k over the experts' scores) in onnxruntime's prefill and
    decode graphs: the same greedy tokens at batch 1 and with left padding at batch 2."""
    from test_onnx_runtime import assert_same_generation

    profile = {"moe": {"n_experts": 128, "n_shared": 0, "top_k": 64, "router": "activation"}}
    opt = dscompile.optimize(tiny_llama(), profile, CALIBRATION, example_inputs=ids(), lower="eager")
    checks = dscompile.export_onnx_runtime(opt, tmp_path / "moe")
    assert {c.graph for c in checks} == {"prefill", "decode"}
    assert_same_generation(opt, tmp_path / "moe")


def test_half_precision_experts_keep_the_dtype_and_the_choice():
    model = tiny_llama().to(torch.bfloat16)
    profile = {"moe": {"n_experts": 128, "n_shared": 0, "top_k": 96, "router": "activation"}}
    opt = dscompile.optimize(model, profile, calibration=CALIBRATION, lower="eager")
    created = {p.dtype for name, p in opt.runtime().program.gm.named_parameters() if name.startswith("moe_")}
    assert created == {torch.bfloat16}
    x = ids(2, 12)
    with torch.no_grad():
        got, want = logits_of(opt(x)).float(), logits_of(model(x)).float()
    assert (got - want).abs().max() <= 0.1 * want.abs().max()  # three quarters of each token's neurons kept
    assert torch.equal(opt.generate(x, max_new_tokens=4, eos_token_id=[]), greedy_by_forward(opt, x, 4))
