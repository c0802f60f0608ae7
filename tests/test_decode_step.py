"""The CPU decode-step lowering: decode-sized attention becomes the native kernel, and StaticStep compiles a graph
once per input signature without Dynamo, reading its weights in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dscompile.lower.decode_attention import DecodeAttentionPass
from dscompile.lower.decode_step import DecodeStepPasses, StaticStep, signature
from dscompile.lower.thin_matmul import THIN_ROWS, ThinMatmulPass
from dscompile.ops import native


class CachedAttention(torch.nn.Module):
    """One GQA attention over a cache under an additive mask, as the kv_cache pass writes it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(32, 32)
        self.o = torch.nn.Linear(32, 32, bias=False)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q(x).view(batch, tokens, 4, 8).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(batch, tokens, 32))


def _inputs(batch: int, tokens: int, slots: int = 48):
    g = torch.Generator().manual_seed(tokens)
    keep = torch.ones(batch, 1, tokens, slots, dtype=torch.bool)
    keep[..., slots - 10:] = False
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return (torch.randn(batch, tokens, 32, generator=g), torch.randn(batch, 2, slots, 8, generator=g),
            torch.randn(batch, 2, slots, 8, generator=g), mask)


def _ops_run(step, inputs) -> set[str]:
    with torch.profiler.profile() as prof:
        step(*inputs)
    return {event.key for event in prof.key_averages()}


@pytest.mark.skipif(not native.load(), reason="native kernels need a C++ compiler")
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_sized_attention_runs_the_native_kernel_and_matches(tokens):
    model = CachedAttention()
    inputs = _inputs(2, tokens)
    gm = torch.export.export(model, inputs).module()
    step = StaticStep(gm)
    with torch.no_grad():
        torch.testing.assert_close(step(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
        names = _ops_run(step, inputs)
    assert "dscompile::decode_attention" in names and "dscompile::thin_linear" in names
    assert not any("flash_attention" in name for name in names), names


@pytest.mark.skipif(not native.load(), reason="native kernels need a C++ compiler")
def test_prefill_sized_attention_keeps_the_flash_kernel():
    model = CachedAttention()
    inputs = _inputs(1, THIN_ROWS + 1)
    step = StaticStep(torch.export.export(model, inputs).module())
    with torch.no_grad():
        torch.testing.assert_close(step(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
        names = _ops_run(step, inputs)
    assert "dscompile::decode_attention" not in names


def test_static_step_compiles_once_per_signature_and_reads_weights_in_place():
    model = CachedAttention()
    inputs = _inputs(2, 1)
    gm = torch.export.export(model, inputs).module()
    step = StaticStep(gm)
    with torch.no_grad():
        step(*inputs)
        step(*_inputs(2, 1))  # new tensors, same signature
        assert step.compiles == 1
        x, k, v, mask = _inputs(2, 1)
        step(x, k.transpose(2, 3).contiguous().transpose(2, 3), v, mask)  # other strides: another signature
        assert step.compiles == 2
        dict(gm.named_parameters())["o.weight"].mul_(2)  # training in place (healing) needs no recompile
        torch.testing.assert_close(step(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)
    assert step.compiles == 2


def test_signature_tells_shapes_strides_aliasing_and_grad_mode_apart():
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    assert signature([a, b]) == signature([a.clone(), b.clone()])
    assert signature([a, b]) != signature([a, a])
    assert signature([a, b]) != signature([a.t().contiguous().t(), b])
    assert signature([a, 1]) != signature([a, 2])
    with torch.enable_grad():
        training = signature([a, b])
    with torch.no_grad():
        assert signature([a, b]) != training


def test_the_decode_passes_key_on_both_passes():
    passes = DecodeStepPasses([DecodeAttentionPass(native_kernels=False), ThinMatmulPass(native_kernels=False)])
    assert passes.uuid() == (passes.passes[0].uuid(), passes.passes[1].uuid())
    assert passes.uuid() != DecodeStepPasses([DecodeAttentionPass(native_kernels=True),
                                              ThinMatmulPass(native_kernels=False)]).uuid()
