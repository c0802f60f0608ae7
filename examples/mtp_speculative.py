"""MTP: train draft heads from the model's own continuations, then decode speculatively (same tokens, fewer steps)."""

from _setup import setup, show

import dscompile

model, tokenizer, calibration, prompt, args = setup(__doc__)
opt = dscompile.optimize(model, {"mtp": {"depth": 2}}, example_inputs=prompt, lower="eager")
trained = dscompile.train_mtp(opt, calibration, tokenizer=tokenizer, max_minutes=args.minutes, prompts=32,
                              new_tokens=32, progress=False)
print(f"held-out agreement by depth {[round(a, 3) for a in trained.acceptance]}, "
      f"expected {trained.tokens_per_step:.2f} tokens per step")
out = opt.generate(prompt, max_new_tokens=24)
stats = opt.monitor.last
print(stats)
print(show(tokenizer, out))
