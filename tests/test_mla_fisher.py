"""Loss sensitivity per attention output: the FX program's gradients are the model's own, and refinement on
weighted errors fits the channels the weights favour."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_mla_refine import _batches, _pair
from tiny import tiny_llama

from dscompile.passes.kv_cache import build_cached_program
from dscompile.passes.mla_fisher import channel_weights
from dscompile.passes.mla_refine import attention_output_errors, attention_sites, forced_sites, refine_program


def _hooked_channel_weights(model, windows):
    """The same weights from the nn.Module itself: squared loss gradients at every o_proj output, per channel."""
    kept = []
    hooks = [layer.self_attn.o_proj.register_forward_hook(lambda m, i, out: kept.append(out) or out.retain_grad())
             for layer in model.model.layers]
    total = [0.0] * len(hooks)
    try:
        for ids in windows:
            kept.clear()
            logits = model(ids).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
            for i, out in enumerate(kept):
                total[i] = total[i] + out.grad.pow(2).flatten(0, 1).sum(0)
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return [t / sum(w.numel() for w in windows) for t in total]


def test_channel_weights_are_the_models_squared_loss_gradients():
    model, windows = tiny_llama(layers=3), _batches()
    program = build_cached_program(model, logits="all")
    outputs = [site[1] for site in attention_sites(program)]
    weights = channel_weights(program, outputs, windows)
    expected = _hooked_channel_weights(model, windows)
    assert list(weights) == outputs and all(w.shape == (64,) for w in weights.values())
    for name, want in zip(outputs, expected):
        torch.testing.assert_close(weights[name], want, rtol=1e-4, atol=1e-10)
    assert all(float(w.max()) > 1.5 * float(w.min()) > 0 for w in weights.values())  # not flat: they weigh


def test_refinement_fits_the_channels_its_weights_favour_best():
    model, batches = tiny_llama(), _batches()
    teacher, plain = _pair(model, batches, 0.25)
    _, weighted = _pair(model, batches, 0.25)
    sites = forced_sites(plain, teacher)
    favoured = torch.zeros(64)
    favoured[:8] = 1.0  # only the first 8 channels of every attention output count
    weights = {o: favoured for o in sites[1]}
    refine_program(plain, teacher, batches, max_steps=40, lr=1e-2)
    refine_program(weighted, teacher, batches, max_steps=40, lr=1e-2, weights=weights)
    rest = {o: 1.0 - w for o, w in weights.items()}
    with torch.no_grad():
        on = {name: [torch.stack(attention_output_errors(s, teacher, batches[0], sites, w)).mean().item()
                     for s in (plain, weighted)] for name, w in (("favoured", weights), ("rest", rest))}
    assert on["favoured"][1] < 0.8 * on["favoured"][0], on  # the weighted fit is better where its weights are
    assert on["rest"][0] < on["rest"][1], on  # and the plain fit elsewhere
