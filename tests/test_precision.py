"""Half precision on CPU: every pass builds its tensors in the model's dtype (calibration math in fp32), exact
rewrites stay within the dtype's rounding of the original, and speculation stays lossless."""

from __future__ import annotations

import pytest
import torch
from test_compose import EXACT, LOSSY, calibration
from test_mtp import varied_llama
from tiny import ids

import dscompile
from dscompile.evaluate import logits_of


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_rewrites_in_half_precision_stay_near_the_original(dtype):
    model = varied_llama().to(dtype)
    opt = dscompile.optimize(model, EXACT, calibration(128), example_inputs=ids(), lower="eager")
    created = {name: p.dtype for name, p in opt.runtime().program.gm.named_parameters()
               if name.startswith(("mla_", "moe_"))}
    assert created and set(created.values()) == {dtype}
    x = ids(2, 9)
    with torch.no_grad():
        got, want = logits_of(opt(x)).float(), logits_of(model(x)).float()
    # full rank and every expert: what differs is the order of half-precision roundings, not the function
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_lossy_rewrites_and_speculation_in_bfloat16():
    model = varied_llama().to(torch.bfloat16)
    opt = dscompile.optimize(model, LOSSY, calibration(128), example_inputs=ids(), lower="eager")
    runtime = opt.runtime()
    assert runtime.program.dtype == torch.bfloat16
    x = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    got = opt.generate(x, max_new_tokens=16, eos_token_id=[])
    assert all(c.dtype in (torch.bfloat16, torch.long) for c in runtime.program.new_caches(1, 8))
    drafter, runtime.drafter = runtime.drafter, None
    try:
        plain = opt.generate(x, max_new_tokens=16, eos_token_id=[])
    finally:
        runtime.drafter = drafter
    assert torch.equal(got, plain)
