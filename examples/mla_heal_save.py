"""MLA: halve the KV cache, heal briefly, save the result and load it back without calibrating again."""

from _setup import setup, show

import dscompile

model, tokenizer, calibration, prompt, args = setup(__doc__)
opt = dscompile.optimize(model, {"mla": {"kv_ratio": 0.5}}, calibration, tokenizer=tokenizer, lower="eager")
report = opt.report().to_dict()
print(f"KV bytes per token {report['kv_bytes_per_token_before']:,} -> {report['kv_bytes_per_token_after']:,}")
healed = dscompile.heal(opt, calibration, tokenizer=tokenizer, max_minutes=args.minutes, progress=False)
print(f"healed {healed.steps} steps, loss {healed.losses[0]:.4f} -> {healed.losses[-1]:.4f}")
opt.save(f"{args.out}/mla", source=args.model)
again = dscompile.load_optimized(f"{args.out}/mla", model, lower="eager")
first = opt.generate(prompt, max_new_tokens=16)
second = again.generate(prompt, max_new_tokens=16)
print("saved and loaded models agree:", bool((first == second).all()))
print(show(tokenizer, second))
