"""ONNX: export the optimized runtime (latent cache as explicit inputs and outputs) and decode it in onnxruntime."""

import torch
from _setup import setup, show

import dscompile

model, tokenizer, calibration, prompt, args = setup(__doc__)
opt = dscompile.optimize(model, {"mla": {"kv_ratio": 0.5}}, calibration, tokenizer=tokenizer, lower="eager")
checks = dscompile.export_onnx_runtime(opt, f"{args.out}/onnx")
for c in checks:
    print(f"onnxruntime {c.graph} {c.shape}: max abs diff {c.max_abs_diff:.2e}")
ours = opt.generate(prompt, max_new_tokens=16)
theirs = dscompile.onnx_generate(f"{args.out}/onnx", prompt, max_new_tokens=16)
print("onnxruntime decodes the same tokens:", torch.equal(ours, theirs))
print(show(tokenizer, theirs))
