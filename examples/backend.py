"""The torch.compile backend on an unmodified model: profile none is exact, and the report says what matched."""

import torch
from _setup import setup

import dscompile
from dscompile.evaluate import logits_of

model, tokenizer, calibration, prompt, args = setup(__doc__)
compiled = torch.compile(model, backend="deepseek_opt", options={"profile": "none", "lower": "eager"})
with torch.no_grad():
    diff = (logits_of(compiled(prompt)) - logits_of(model(prompt))).abs().max().item()
print(f"profile none: max |logit difference| {diff:.2e}")
print(dscompile.inspect(model, prompt).table())
